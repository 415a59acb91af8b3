"""Mixture of experts (Qwen3-MoE, Mixtral): top-k routing, experts as grouped matmuls, router statistics.

Shape letters: N tokens, D model width, F expert width, E experts, K experts per token, L layers.

Routing is Hugging Face's: softmax of the router logits in float32, the top K, renormalised to sum to 1 when
``norm_topk_prob`` (Mixtral always). ``grouped`` sorts the N * K (token, expert) assignments by expert and runs each
projection as one ``jax.lax.ragged_dot`` over the groups (the work of K dense MLPs); ``dense`` runs every expert on
every token and weights the outputs (E MLPs: the reference, and faster for a few tiny experts). ``blocked`` (the
default) pads each expert's group to whole blocks of rows and scans the blocks through their experts: on XLA:CPU,
whose ``ragged_dot`` is a slow loop, the fastest of the three (``python experiments/moe_step.py``).

Each layer returns its router statistics over real tokens: the summed routing probabilities and top-K counts per
expert (what transformers' ``load_balancing_loss_func`` is made of) and, on request, the logits (eval's drift).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.custom_batching import custom_vmap

from dpo_jax.models.config import ModelConfig

Array = jax.Array
f32 = jnp.float32


def weight(variable, dtype) -> Array:
    """A parameter's value in ``dtype``; an int8 base weight (a ``qwix.QArray``: int8 values, a float scale per
    channel) is dequantized first."""
    x = variable.get_value()
    return (qwix.dequantize(x) if isinstance(x, qwix.QArray) else x).astype(dtype)


def route(logits_NxE: Array, k: int, renormalise: bool) -> tuple[Array, Array, Array]:
    """(probabilities [N, E] float32, top-K weights [N, K], top-K experts [N, K])."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(f32), axis=-1)
    top_w_NxK, top_i_NxK = jax.lax.top_k(probs_NxE, k)
    if renormalise:
        top_w_NxK = top_w_NxK / jnp.sum(top_w_NxK, axis=-1, keepdims=True)
    return probs_NxE, top_w_NxK, top_i_NxK


def _all_batched(axis_size, in_batched, *args):
    """A ``custom_vmap`` rule's arguments, each with the batch on axis 0 (the unbatched broadcast to it)."""
    return [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched, strict=True)]


@custom_vmap
def _ragged(x_MxA, w_ExAxB, sizes_E):
    return jax.lax.ragged_dot(x_MxA, w_ExAxB, sizes_E)


@_ragged.def_vmap
def _ragged_vmap(axis_size, in_batched, *args):  # one level of vmap (a population's members)
    return jax.vmap(jax.lax.ragged_dot)(*_all_batched(axis_size, in_batched, *args)), True


def _raw_grads(x_MxA, w_ExAxB, sizes_E, dy_MxB):
    _, vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes_E), x_MxA, w_ExAxB)
    return vjp(dy_MxB)


_ragged_grads = custom_vmap(_raw_grads)


@_ragged_grads.def_vmap
def _ragged_grads_vmap(axis_size, in_batched, *args):
    return jax.vmap(_raw_grads)(*_all_batched(axis_size, in_batched, *args)), (True, True)


@jax.custom_vjp
def ragged_dot(x_MxA: Array, w_ExAxB: Array, sizes_E: Array) -> Array:
    """``jax.lax.ragged_dot`` that a ``vmap`` may batch on any of its arguments (a population's members, an
    unbatched reference): JAX's own batching rule takes only all three batched on axis 0, so the unbatched ones are
    broadcast to it, in the forward and in the backward."""
    return _ragged(x_MxA, w_ExAxB, sizes_E)


def _ragged_fwd(x, w, sizes):
    return _ragged(x, w, sizes), (x, w, sizes)


def _ragged_bwd(res, dy):
    x, w, sizes = res
    dx, dw = _ragged_grads(x, w, sizes, dy)
    return dx, dw, None


ragged_dot.defvjp(_ragged_fwd, _ragged_bwd)


def grouped_experts(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD) -> Array:
    """sum_k w_nk MLP_{i_nk}(x_n) [N, D]: assignments sorted by expert, each projection one ``ragged_dot``."""
    n, k = top_i_NxK.shape
    flat_M = top_i_NxK.reshape(-1)  # M = N * K assignments
    order_M = jnp.argsort(flat_M, stable=True)
    token_M = order_M // k
    sizes_E = jnp.bincount(flat_M, length=gate_ExDxF.shape[0]).astype(jnp.int32)
    x_MxD = jnp.take(x_NxD, token_M, axis=0)
    h_MxF = jax.nn.silu(ragged_dot(x_MxD, gate_ExDxF, sizes_E)) * ragged_dot(x_MxD, up_ExDxF, sizes_E)
    y_MxD = ragged_dot(h_MxF, down_ExFxD, sizes_E)
    y_MxD = y_MxD * jnp.take(top_w_NxK.reshape(-1), order_M)[:, None].astype(y_MxD.dtype)
    return jax.ops.segment_sum(y_MxD, token_M, num_segments=n)


def blocked_experts(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD, *, block: int = 256) -> Array:
    """The same sum as ``grouped_experts``, with each expert's group of assignments padded to whole blocks of
    ``block`` rows: a scan over the blocks runs each through its expert's MLP (blocks past the used ones are
    skipped). The work of k dense MLPs plus the groups' padding; no ragged kernel needed (XLA:CPU's is a loop)."""
    n, k = top_i_NxK.shape
    e, d, _ = gate_ExDxF.shape
    m = n * k
    b = max(8, min(block, -(-m // 8) * 8))
    flat_M = top_i_NxK.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)
    sorted_e_M = jnp.take(flat_M, order_M)
    sizes_E = jnp.bincount(flat_M, length=e)
    padded_E = -(-sizes_E // b) * b
    start_E, padded_start_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
    slot_M = padded_start_E[sorted_e_M] + jnp.arange(m) - start_E[sorted_e_M]  # each sorted assignment's row
    blocks = -(-(m + e * (b - 1)) // b)  # the most the padded groups can take
    x_PxD = jnp.zeros((blocks * b, d), x_NxD.dtype).at[slot_M].set(jnp.take(x_NxD, order_M // k, axis=0))
    used = jnp.sum(padded_E) // b
    expert_B = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(blocks) * b, side="right"), e - 1)

    def one_block(_, xs):
        i, x_bxD = xs
        ex = expert_B[i]

        def mlp(x):
            h = jax.nn.silu(x @ gate_ExDxF[ex]) * (x @ up_ExDxF[ex])
            return h @ down_ExFxD[ex]

        return None, jax.lax.cond(i < used, mlp, jnp.zeros_like, x_bxD)

    _, y_BxbxD = jax.lax.scan(one_block, None, (jnp.arange(blocks), x_PxD.reshape(blocks, b, d)))
    y_MxD = jnp.take(y_BxbxD.reshape(blocks * b, d), slot_M, axis=0)
    y_MxD = y_MxD * jnp.take(top_w_NxK.reshape(-1), order_M)[:, None].astype(y_MxD.dtype)
    return jax.ops.segment_sum(y_MxD, order_M // k, num_segments=n)


def dense_experts(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD) -> Array:
    """The same sum with every expert run on every token (weight 0 where not chosen)."""
    e = gate_ExDxF.shape[0]
    h_ExNxF = jax.nn.silu(jnp.einsum("nd,edf->enf", x_NxD, gate_ExDxF)) * jnp.einsum("nd,edf->enf", x_NxD, up_ExDxF)
    y_ExNxD = jnp.einsum("enf,efd->end", h_ExNxF, down_ExFxD)
    w_NxE = jnp.sum(jax.nn.one_hot(top_i_NxK, e, dtype=top_w_NxK.dtype) * top_w_NxK[..., None], axis=1)
    return jnp.einsum("end,ne->nd", y_ExNxD, w_NxE.astype(y_ExNxD.dtype))


class MoE(nnx.Module):
    """A router [D, E] (Hugging Face's ``gate``) and E SwiGLU experts, their weights stacked [E, ...]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, e, std = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts, cfg.initializer_range
        normal = lambda *shape: nnx.Param(jax.random.normal(rngs.params(), shape, f32) * std)  # noqa: E731
        self.router = normal(d, e)
        self.gate_proj, self.up_proj, self.down_proj = normal(e, d, f), normal(e, d, f), normal(e, f, d)
        self.k, self.renormalise, self.impl = cfg.experts_per_token, cfg.norm_topk_prob, cfg.moe_impl

    def __call__(self, x_BxTxD: Array, valid_BxT: Array, *, router_logits: bool = False) -> tuple[Array, dict]:
        b, t, d = x_BxTxD.shape
        dtype = x_BxTxD.dtype
        x_NxD = x_BxTxD.reshape(b * t, d)
        logits_NxE = jnp.dot(x_NxD, weight(self.router, dtype))
        probs_NxE, top_w_NxK, top_i_NxK = route(logits_NxE, self.k, self.renormalise)
        experts = {"grouped": grouped_experts, "blocked": blocked_experts, "dense": dense_experts}[self.impl]
        weights = tuple(weight(w, dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        y_NxD = experts(x_NxD, top_w_NxK.astype(dtype), top_i_NxK, *weights)
        stats = router_stats(probs_NxE, top_i_NxK, valid_BxT.reshape(-1))
        if router_logits:
            stats["logits"] = logits_NxE.astype(f32).reshape(b, t, -1)
        return y_NxD.reshape(b, t, d), stats


def router_stats(probs_NxE: Array, top_i_NxK: Array, valid_N: Array) -> dict:
    """One layer's sums over real tokens: routing probabilities [E], top-K assignments [E], tokens []."""
    v = valid_N.astype(f32)[:, None]
    counts_NxE = jnp.sum(jax.nn.one_hot(top_i_NxK, probs_NxE.shape[-1], dtype=f32), axis=1)
    return {"probs": jnp.sum(probs_NxE * v, axis=0), "counts": jnp.sum(counts_NxE * v, axis=0), "tokens": jnp.sum(v)}


def add_stats(a: dict | None, b: dict | None) -> dict | None:
    """Router statistics of two forwards pooled (the same layers; logits are not pooled)."""
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] for k in ("probs", "counts", "tokens")}


def aux_loss(stats_L: dict) -> Array:
    """Switch-Transformer load balancing as transformers' ``load_balancing_loss_func``: E * sum_e f_e P_e, f_e the
    fraction of the top-K assignments and P_e the mean routing probability of expert e, over all layers' tokens."""
    rows = jnp.maximum(jnp.sum(stats_L["tokens"]), 1.0)
    f_E = jnp.sum(stats_L["counts"], axis=0) / rows
    p_E = jnp.sum(stats_L["probs"], axis=0) / rows
    return p_E.shape[0] * jnp.sum(f_E * p_E)


def expert_load(stats_L: dict) -> Array:
    """[L, E] each layer's share of the top-K assignments per expert (1 / E each when balanced)."""
    counts_LxE = stats_L["counts"]
    return counts_LxE / jnp.maximum(jnp.sum(counts_LxE, axis=-1, keepdims=True), 1.0)


def routing_kl(policy_logits_LxBxTxE: Array, reference_logits_LxBxTxE: Array, valid_BxT: Array) -> tuple[Array, Array]:
    """Router drift: (sum over real tokens of KL(policy routing || reference routing), averaged over layers; tokens)."""
    logp = jax.nn.log_softmax(policy_logits_LxBxTxE.astype(f32), axis=-1)
    logq = jax.nn.log_softmax(reference_logits_LxBxTxE.astype(f32), axis=-1)
    kl_BxT = jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1), axis=0)
    v = valid_BxT.astype(f32)
    return jnp.sum(kl_BxT * v), jnp.sum(v)
