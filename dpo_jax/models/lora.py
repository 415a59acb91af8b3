"""LoRA policies: adapters (``nnx.LoRAParam``) on a frozen base, the base with adapters off as the reference.

A LoRA run trains the adapters alone: the train state, its optimizer moments and its checkpoints hold the
adapter tree; the base is one frozen tree beside it, shared by every member of a population. The reference is
the base with the adapters off (B = 0, so x A B = 0 exactly): no second copy of the weights. Exports: the merged
model (W + (alpha / r) A B) as a Hugging Face folder, and the adapter alone in PEFT's layout.

Projections are ``[in, out]`` kernels here, ``[out, in]`` in torch: PEFT's ``lora_A.weight`` [r, in] is A^T and
``lora_B.weight`` [out, r] is B^T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from dpo_jax.models.config import LORA_TARGETS, ModelConfig
from dpo_jax.models.llama import Decoder
from dpo_jax.models.paths import path_str

ALL = "all-linear"  # PEFT's name for every linear projection of the blocks (not the LM head)


def targets(value) -> tuple[str, ...]:
    """``lora.targets`` as projection names: ``"all-linear"``, ``"q_proj,v_proj"`` or a tuple."""
    if isinstance(value, str):
        value = LORA_TARGETS if value == ALL else tuple(t.strip() for t in value.split(",") if t.strip())
    bad = [t for t in value if t not in LORA_TARGETS]
    if bad or not value:
        raise ValueError(f"{ALL!r} or comma-separated names among {', '.join(LORA_TARGETS)}")
    return tuple(value)


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base) of a LoRA model's state."""
    return nnx.split_state(params, nnx.LoRAParam, ...)


def compose(adapters, base):
    """The whole model state from its two parts (no copy: the same arrays)."""
    return nnx.merge_state(base, adapters)


def whole(params, base):
    """The whole model state of trained ``params``: composed with the frozen ``base`` in a LoRA run (``base``
    None: ``params`` are the whole model)."""
    return params if base is None else compose(params, base)


def off(adapters):
    """Adapters that change nothing: every B zero (the reference's)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path_str(path).endswith("lora_b") else x, adapters
    )


def adapted(pure: dict) -> list[tuple[tuple, dict]]:
    """(path, the projection's dict) of every adapted projection of a pure-dict state."""
    found = []

    def walk(node, prefix):
        if isinstance(node, dict):
            if "lora" in node:
                found.append((prefix, node))
                return
            for k, v in node.items():
                walk(v, (*prefix, k))

    walk(pure, ())
    return found


def fold(params: nnx.State, cfg: ModelConfig) -> nnx.State:
    """The state with each adapter merged into its kernel (W + (alpha / r) A B, in float32, then the kernel's
    dtype) and B set to zero: the same function, the adapters off."""
    pure = nnx.to_pure_dict(params)
    scale = cfg.lora_alpha / cfg.lora_rank
    for path, lin in adapted(pure):
        a, b = lin["lora"]["lora_a"], lin["lora"]["lora_b"]
        w = lin["kernel"]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        if _is_q(w):  # an int8 base: requantized, the same channels as ``cast_base`` gave it
            axes = _channels("/".join(map(str, (*path, "kernel"))), w.qvalue.ndim)
            lin["kernel"] = quantize(qwix.dequantize(w) + delta, axes)
        else:
            lin["kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        lin["lora"]["lora_b"] = jnp.zeros_like(b)
    out = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(out, pure)
    return out


def _channels(path: str, ndim: int) -> tuple[int, ...]:
    """The axes that keep their own int8 scale: each layer's output channels (each expert's, in a mixture), each
    embedding row, each head column (a vocabulary entry)."""
    if "layers" in path:
        return (0, 1, ndim - 1) if ndim == 4 else (0, ndim - 1)  # [L, E, in, out]: per layer, expert, output
    return (0,) if path.endswith("embed_tokens") else (ndim - 1,)


def quantize(x, axes) -> qwix.QArray:
    """Symmetric int8 with an absmax float32 scale per channel (``axes``), by qwix."""
    return qwix.quantize(jnp.asarray(x, jnp.float32), "int8", channelwise_axes=axes)


def _is_q(x) -> bool:
    return isinstance(x, qwix.QArray)


def dequantized(tree):
    """``tree`` with every int8 weight back in float32 (what the model computes with)."""
    return jax.tree.map(lambda x: qwix.dequantize(x) if _is_q(x) else x, tree, is_leaf=_is_q)


def cast_base(params: nnx.State, dtype: str) -> nnx.State:
    """The base's kernels, embeddings and head stored in ``dtype`` (the model casts them to the compute dtype;
    ``int8``: qwix ``QArray``s, dequantized at use; biases stay float32); adapters and norms stay float32."""
    if dtype == "float32":
        return params
    adapters, base = split(params)

    def cast(path, x):
        p = path_str(path)
        if "norm" in p or x.ndim < 2:
            return x
        if dtype != "int8":
            return x.astype(jnp.dtype(dtype))
        return x if p.endswith("bias") else quantize(x, _channels(p, x.ndim))  # biases stay float32

    return compose(adapters, jax.tree_util.tree_map_with_path(cast, base))


def attach(model, *, rank: int, alpha: float, target_names, dropout: float = 0.0, seed: int = 0):
    """``model`` (a plain ``Decoder``) with new adapters on ``target_names``: the same function until trained.
    Only the adapters are initialised (the rest of the random init is dead code to XLA)."""
    cfg = model.config.replace(
        lora_rank=rank, lora_alpha=float(alpha), lora_targets=tuple(target_names), lora_dropout=float(dropout)
    )
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=seed))))
    adapters = jax.jit(lambda: split(nnx.split(Decoder(cfg, rngs=nnx.Rngs(params=seed)))[1])[0])()
    return nnx.merge(graphdef, compose(adapters, nnx.state(model)))


def attach_config(model, lo, seed: int):
    """``attach`` as a config's ``lora`` section says (``all-linear`` on a mixture of experts: the attention's
    projections, its only linear layers; named MLP projections there are an error)."""
    names = targets(lo.targets)
    if model.config.num_experts and lo.targets == ALL:
        names = tuple(n for n in names if n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    return attach(model, rank=lo.rank, alpha=lo.alpha, target_names=names, dropout=lo.dropout, seed=seed)


def detach(model):
    """The plain ``Decoder`` of a LoRA model with the adapters merged into its kernels (an int8 base dequantized
    first: the float32 function the policy computes)."""
    cfg = model.config.replace(lora_rank=0, lora_targets=(), lora_dropout=0.0)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, split(fold(dequantized(nnx.state(model)), model.config))[1])
