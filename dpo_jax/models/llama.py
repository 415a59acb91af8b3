"""Flax NNX decoder for the Llama lineage as Hugging Face defines it: Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 3,
OLMo 2, Phi-3, and the mixtures of experts Qwen3-MoE and Mixtral (``dpo_jax.models.moe``), one decoder whose
``ModelConfig`` family fields switch what differs (``dpo_jax.models.families`` lists them).

Shape letters: B batch, T query tokens, S key slots (T, or the KV-cache length), D model width, H query heads,
K key/value heads, G = H // K query heads per KV head, E head width, F MLP width, V vocabulary, L layers.

Parameters are float32 and stored with a leading layer axis [L, ...] (one layout whether or not the forward
scans), kernels as [in, out]. Compute runs in ``config.dtype``; RMSNorm, RoPE and softmax run in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dpo_jax.models import context, kernels
from dpo_jax.models.attention import Ids
from dpo_jax.models.config import LORA_TARGETS, ModelConfig
from dpo_jax.models.moe import MoE, weight

Array = jax.Array


class KVCache(NamedTuple):
    """Key/value cache for decoding: slots [0, index) are written; ``mask_BxS`` marks the valid ones."""

    k_LxBxSxKxE: Array
    v_LxBxSxKxE: Array
    mask_BxS: Array
    index: Array  # int32 scalar: the next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(zeros, zeros, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


class DecoderOutput(NamedTuple):
    logits_BxTxV: Array | None
    hidden_BxTxD: Array  # after the final norm: the LM head's input
    cache: KVCache | None
    router: dict | None = None  # mixtures of experts: per-layer router statistics [L, ...] (``moe.router_stats``)


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False, factors: tuple[float, ...] = ()) -> np.ndarray:
    """Rotary inverse frequencies [E'/2] (E' = the rotated part of a head), with Hugging Face's linear, Llama-3 and
    longrope (``factors``) scaling; ``local``: a sliding layer's own unscaled base (Gemma 3)."""
    e = int(cfg.head_dim * cfg.rope_fraction)
    theta = cfg.local_rope_theta if local and cfg.local_rope_theta else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    if local and cfg.local_rope_theta:
        return inv.astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "longrope":
        inv = inv / np.asarray(factors or cfg.rope_short_factor, np.float64)
    elif cfg.rope_type == "llama3":
        old = cfg.rope_original_max_position
        low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def layer_inv_freq(cfg: ModelConfig, positions_BxT: Array, long: bool | None = None) -> Array:
    """[L, E'/2] each layer's frequencies. Longrope takes its long factors when the batch's furthest position is past
    the original context (as transformers does, for the whole batch), or as ``long`` says."""
    local = [t == "sliding" for t in cfg.layer_types] or [False] * cfg.num_layers
    per_layer = lambda **kw: jnp.asarray(np.stack([rope_inv_freq(cfg, local=lo, **kw) for lo in local]))  # noqa: E731
    if cfg.rope_type != "longrope":
        return per_layer()
    if long is None:
        long = jnp.max(positions_BxT) + 1 > cfg.rope_original_max_position
    return jnp.where(long, per_layer(factors=cfg.rope_long_factor), per_layer(factors=cfg.rope_short_factor))


def apply_rope(x_BxTxNxE: Array, positions_BxT: Array, inv_freq, scale: float = 1.0) -> Array:
    """Rotate-half RoPE (the Hugging Face layout: first half / second half of each head's rotated part, which is
    the first 2 * len(inv_freq) entries of it); ``scale`` multiplies cos and sin (longrope's attention factor)."""
    freqs_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb_BxTxE = jnp.concatenate([freqs_BxTxE2, freqs_BxTxE2], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb_BxTxE) * scale, jnp.sin(emb_BxTxE) * scale
    x = x_BxTxNxE.astype(jnp.float32)
    rot = emb_BxTxE.shape[-1]
    x, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return jnp.concatenate([x * cos + rotated * sin, rest], axis=-1).astype(x_BxTxNxE.dtype)


def segment_positions(segment_ids_BxT: Array) -> Array:
    """Positions that restart at 0 at each new segment of a packed row."""
    t = jnp.arange(segment_ids_BxT.shape[1])
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    start_BxT = jax.lax.cummax(jnp.where(is_start, t, 0), axis=1)
    return t - start_BxT


def embed(table, tokens_BxT: Array, dtype) -> Array:
    """Rows of the embedding table (of an int8 one: only the rows taken are dequantized)."""
    x = table.get_value()
    if isinstance(x, qwix.QArray):  # per-row scales [V, 1]
        rows = jnp.take(x.qvalue, tokens_BxT, axis=0).astype(x.scale.dtype) * jnp.take(x.scale, tokens_BxT, axis=0)
        return rows.astype(dtype)
    return jnp.take(x, tokens_BxT, axis=0).astype(dtype)


def fold_keys(keys: Array, data) -> Array:
    """``fold_in(key, data)`` for each key of an array of typed keys (the same ``data``)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys.reshape(-1), data).reshape(keys.shape)


@jax.custom_vjp
def dense(x_BxTxD: Array, w_DxF: Array) -> Array:
    """x @ w over the last axis. Its backward forms the weight gradient as (x^T, written out row by row) @ dy: left
    to itself, XLA on CPU may instead transpose the larger dy (a column-order copy several times slower)."""
    return jnp.dot(x_BxTxD, w_DxF)


def _dense_fwd(x, w):
    return dense(x, w), (x, w)


def _dense_bwd(residuals, dy):
    x, w = residuals
    d, f = w.shape
    x_DxN = jax.lax.optimization_barrier(x.reshape(-1, d).T)
    return jnp.dot(dy, w.T), jnp.dot(x_DxN, dy.reshape(-1, f)).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Module):
    """x W + b, plus (alpha / r) x A B when the config adapts this projection (``nnx.LoRA``: A [in, r] uniform as
    PEFT's Kaiming init, B [r, out] zeros, so a new adapter changes nothing; its variables are ``nnx.LoRAParam``).
    Given dropout keys (one per token), the adapter's input is dropped at ``config.lora_dropout`` as PEFT does
    (x W is not): each token's mask is drawn from its own key, so it does not depend on where the token sits."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, std: float, rngs: nnx.Rngs, cfg=None, name=""):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * std)
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None
        self.lora, self.lora_scale = nnx.data(None), 0.0
        if cfg is not None and cfg.lora_rank and name in cfg.lora_targets:
            self.lora = nnx.LoRA(
                d_in, cfg.lora_rank, d_out, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, rngs=rngs,
                a_initializer=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            )  # fmt: skip
            self.lora_scale = cfg.lora_alpha / cfg.lora_rank
            self.dropout, self.dropout_id = cfg.lora_dropout, LORA_TARGETS.index(name)

    def __call__(self, x_BxTxD: Array, dropout_keys_BxT: Array | None = None) -> Array:
        x = x_BxTxD
        y = checkpoint_name(dense(x, weight(self.kernel, x.dtype)), "dense")  # saved by model.remat=dots*
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora is not None:
            if dropout_keys_BxT is not None and self.dropout > 0:  # a mask of its own for each projection
                keep = 1.0 - self.dropout
                keys_N = fold_keys(dropout_keys_BxT, self.dropout_id).reshape(-1)
                kept = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[-1:]))(keys_N).reshape(x.shape)
                x = jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
            y = y + (self.lora(x) * self.lora_scale).astype(x.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, scaled by (offset + w): Llama casts the normed value, then scales; Gemma and OLMo 2
    scale in float32, then cast (``scale_f32``). Gemma's w starts at 0 (offset 1)."""

    def __init__(self, d: int, eps: float, offset: float = 0.0, scale_f32: bool = False):
        self.weight = nnx.Param(jnp.full((d,), 1.0 - offset, jnp.float32))
        self.eps, self.offset, self.scale_f32 = eps, offset, scale_f32

    @classmethod
    def of(cls, cfg: ModelConfig, d: int) -> RMSNorm:
        return cls(d, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_scale_f32)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...] + self.offset if self.offset else self.weight[...]
        if self.scale_f32:
            return (normed * w).astype(x.dtype)
        return w.astype(x.dtype) * normed.astype(x.dtype)  # HF order: cast, then scale


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, e, std = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.initializer_range
        self.q_proj = Linear(d, h * e, bias=cfg.qkv_bias, std=std, rngs=rngs, cfg=cfg, name="q_proj")
        self.k_proj = Linear(d, k * e, bias=cfg.qkv_bias, std=std, rngs=rngs, cfg=cfg, name="k_proj")
        self.v_proj = Linear(d, k * e, bias=cfg.qkv_bias, std=std, rngs=rngs, cfg=cfg, name="v_proj")
        self.o_proj = Linear(h * e, d, bias=cfg.o_bias, std=std, rngs=rngs, cfg=cfg, name="o_proj")
        if cfg.qk_norm != "none":  # Qwen3 / Gemma 3: over each head; OLMo 2: over the whole projection
            self.q_norm = RMSNorm.of(cfg, e if cfg.qk_norm == "head" else h * e)
            self.k_norm = RMSNorm.of(cfg, e if cfg.qk_norm == "head" else k * e)
        self.shape = (h, k, e)
        self.config = cfg

    def __call__(self, x_BxTxD, positions_BxT, ids, inv_freq, kv=None, dropout_keys_BxT=None, window=None):
        """``ids``: (query ``Ids``, key ``Ids``) the mask is made of; ``kv``: optional (cache_k_BxSxKxE,
        cache_v_BxSxKxE, index) to write into and attend over; ``window``: this layer's sliding window (None: full;
        a traced scalar when the layers differ)."""
        h, k, e = self.shape
        b, t, _ = x_BxTxD.shape
        keys, cfg = dropout_keys_BxT, self.config
        q, kk = self.q_proj(x_BxTxD, keys), self.k_proj(x_BxTxD, keys)
        if cfg.qk_norm == "full":
            q, kk = self.q_norm(q), self.k_norm(kk)
        q, kk = q.reshape(b, t, h, e), kk.reshape(b, t, k, e)
        if cfg.qk_norm == "head":
            q, kk = self.q_norm(q), self.k_norm(kk)
        if cfg.query_scale is not None:  # the kernels scale scores by e ** -0.5: fold the rest into q
            q = q * jnp.asarray(cfg.query_scale * e**0.5, q.dtype)
        rope_scale = cfg.rope_attention_factor
        q_BxTxHxE = apply_rope(q, positions_BxT, inv_freq, rope_scale)
        k_BxTxKxE = apply_rope(kk, positions_BxT, inv_freq, rope_scale)
        v_BxTxKxE = self.v_proj(x_BxTxD, keys).reshape(b, t, k, e)
        new_kv = None
        if kv is not None:
            cache_k, cache_v, index = kv
            k_BxTxKxE = jax.lax.dynamic_update_slice_in_dim(cache_k, k_BxTxKxE.astype(cache_k.dtype), index, axis=1)
            v_BxTxKxE = jax.lax.dynamic_update_slice_in_dim(cache_v, v_BxTxKxE.astype(cache_v.dtype), index, axis=1)
            new_kv = (k_BxTxKxE, v_BxTxKxE)
        q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, k, h // k, e)
        out_BxTxKxGxE = kernels.attend(
            q_BxTxKxGxE, k_BxTxKxE.astype(q_BxTxHxE.dtype), v_BxTxKxE.astype(x_BxTxD.dtype), *ids,
            window=window, implementation=cfg.attention,
            block=cfg.attention_block, softcap=cfg.attn_softcap, rows=kv is None, context=cfg.context_attention,
        )  # fmt: skip
        return self.o_proj(out_BxTxKxGxE.reshape(b, t, h * e), keys), new_kv


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up, Llama's MLP activation. Its backward keeps only the two inputs and writes both input
    gradients out in row order before the weight gradients read them (left to itself, XLA on CPU recomputes the
    activation's derivative inside the column-order copy a weight gradient's matmul makes: several times slower)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
    gate, up = residuals
    s = jax.nn.sigmoid(gate)
    d_gate = g * up * (s * (1 + gate * (1 - s)))  # d silu(x) / dx = s (1 + x (1 - s))
    return jax.lax.optimization_barrier((d_gate, g * gate * s))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, std=std, rngs=rngs, cfg=cfg, name="gate_proj")
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, std=std, rngs=rngs, cfg=cfg, name="up_proj")
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, std=std, rngs=rngs, cfg=cfg, name="down_proj")

        self.activation = cfg.mlp_activation
        self.chunk = cfg.mlp_chunk

    def __call__(self, x_BxTxD, dropout_keys_BxT=None):
        b, t, d = x_BxTxD.shape
        if not self.chunk or t <= self.chunk:
            return self._tokens(x_BxTxD, dropout_keys_BxT)
        # A tiled MLP: chunks of the row one after another, each recomputed in the backward, so only one chunk's
        # [B, C, intermediate] activations live at a time (the MLP is per token: the same values)
        c = self.chunk
        n = -(-t // c)

        def chunks(a):  # [B, T, ...] -> [N, B, C, ...], the last chunk padded by repeating the last token
            a = jnp.concatenate([a, jnp.repeat(a[:, -1:], n * c - t, axis=1)], axis=1) if n * c > t else a
            return a.reshape(b, n, c, *a.shape[2:]).swapaxes(0, 1)

        keys = None if dropout_keys_BxT is None else chunks(dropout_keys_BxT)
        one = jax.checkpoint(lambda x, k: self._tokens(x, k), policy=jax.checkpoint_policies.nothing_saveable)
        out_NxBxCxD = jax.lax.map(lambda xk: one(*xk), (chunks(x_BxTxD), keys))
        return out_NxBxCxD.swapaxes(0, 1).reshape(b, n * c, d)[:, :t]

    def _tokens(self, x_BxTxD, keys):
        gate, up = self.gate_proj(x_BxTxD, keys), self.up_proj(x_BxTxD, keys)
        if self.activation == "gelu_tanh":  # Gemma's GeGLU
            return self.down_proj(jax.nn.gelu(gate, approximate=True) * up, keys)
        return self.down_proj(swiglu(gate, up), keys)


class Block(nnx.Module):
    """Attention and MLP (or mixture of experts) with residuals; where the norms sit is ``config.norm_layout``:
    pre (Llama: before each), post (OLMo 2: on each output), sandwich (Gemma 3: both). Names as in Hugging Face."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, layout = cfg.hidden_size, cfg.norm_layout
        self.layout = layout
        if layout != "post":
            self.input_layernorm = RMSNorm.of(cfg, d)
        self.post_attention_layernorm = RMSNorm.of(cfg, d)  # Llama's applies before the MLP, despite its name
        if layout == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm.of(cfg, d)
        if layout != "pre":
            self.post_feedforward_layernorm = RMSNorm.of(cfg, d)
        self.self_attn = Attention(cfg, rngs)
        self.mlp = MoE(cfg, rngs) if cfg.num_experts else MLP(cfg, rngs)

    def __call__(self, x_BxTxD, positions_BxT, ids, inv_freq, kv=None, dropout_keys_BxT=None, window=None,
                 router_logits=False):  # fmt: skip
        """(x, new_kv, router statistics or None); ``dropout_keys_BxT``: this layer's, per token (each projection
        folds in its own index)."""
        keys, layout = dropout_keys_BxT, self.layout
        h = x_BxTxD if layout == "post" else self.input_layernorm(x_BxTxD)
        attn, new_kv = self.self_attn(h, positions_BxT, ids, inv_freq, kv, keys, window)
        if layout != "pre":
            attn = self.post_attention_layernorm(attn)
        x_BxTxD = x_BxTxD + attn
        h = x_BxTxD
        if layout == "pre":
            h = self.post_attention_layernorm(x_BxTxD)
        elif layout == "sandwich":
            h = self.pre_feedforward_layernorm(x_BxTxD)
        stats = None
        if isinstance(self.mlp, MoE):
            out, stats = self.mlp(h, ids[0].valid, router_logits=router_logits)
        else:
            out = self.mlp(h, keys)
        if layout != "pre":
            out = self.post_feedforward_layernorm(out)
        return x_BxTxD + out, new_kv, stats


_POLICIES = jax.checkpoint_policies
# The projections run through ``dense`` (a custom VJP), whose matmul a dots policy cannot see: its output is named
# and saved by name beside the dots the policy sees (attention's einsums).
_REMAT = {
    "full": _POLICIES.nothing_saveable,
    "dots": _POLICIES.save_from_both_policies(_POLICIES.checkpoint_dots, _POLICIES.save_only_these_names("dense")),
    "dots_no_batch": _POLICIES.save_from_both_policies(
        _POLICIES.dots_with_no_batch_dims_saveable, _POLICIES.save_only_these_names("dense")
    ),
}


class Decoder(nnx.Module):
    """Token ids -> final hidden states and (optionally) logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        std = cfg.initializer_range
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32) * std
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return Block(cfg, rngs)

        self.layers = make_layers(rngs)  # parameters stacked along a leading [L] axis
        self.norm = RMSNorm.of(cfg, cfg.hidden_size)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), jnp.float32) * std)
        )

    def lm_head_weight(self) -> Array:
        """[D, V] in the compute dtype: the input embedding transposed when tied."""
        w, vocab_axis = self.lm_head_as_stored()
        return w.T if vocab_axis == 0 else w

    def lm_head_as_stored(self) -> tuple[Array, int]:
        """(the LM head in the compute dtype, its vocabulary axis): the tied input embedding [V, D] as stored (no
        transposed copy, its gradient in its own layout), else the head [D, V]."""
        dtype = jnp.dtype(self.config.dtype)
        return (weight(self.embed_tokens, dtype), 0) if self.lm_head is None else (weight(self.lm_head, dtype), 1)

    def __call__(
        self,
        tokens_BxT: Array,
        *,
        positions_BxT: Array | None = None,
        segment_ids_BxT: Array | None = None,
        branch_ids_BxT: Array | None = None,
        attention_mask_BxT: Array | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
        dropout_keys_BxT: Array | None = None,
        router_logits: bool = False,
        rope_long: bool | None = None,
    ) -> DecoderOutput:
        """Run the decoder.

        Args:
          tokens_BxT: token ids.
          positions_BxT: RoPE positions; default: from ``segment_ids`` (restart per segment), else from the
            attention mask (``cumsum - 1``, right for left padding), else ``arange``.
          segment_ids_BxT: packed sequences; tokens attend only within their segment.
          branch_ids_BxT: a shared prompt (0) followed by completions (1, 2, ...) in one segment: a completion's
            tokens see the prompt and themselves, not the other completions (pass its ``positions``, which
            continue from the prompt's end for every branch).
          attention_mask_BxT: 1 for real tokens, 0 for padding (keys that must not be attended to).
          cache: a ``KVCache`` to write these tokens into (at ``cache.index``) and attend over.
          return_logits: False skips the LM head (use ``lm_head_as_stored()`` with the chunked log-probs).
          dropout_keys_BxT: a training step's typed key per token: LoRA dropout at ``config.lora_dropout`` (None:
            none, as in eval and sampling); each layer and projection folds in its own index.
          router_logits: a mixture of experts also returns every layer's router logits [L, B, T, E] (eval's drift).
          rope_long: longrope's factor set (default: from this call's furthest position, as transformers).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t = tokens_BxT.shape
        valid_BxT = jnp.ones((b, t), bool) if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
        if positions_BxT is None:
            positions_BxT = _default_positions(valid_BxT, segment_ids_BxT, attention_mask_BxT is not None)
        inv_freq_LxE2 = layer_inv_freq(cfg, positions_BxT, rope_long)
        windows = cfg.windows  # uniform: a static window; Gemma 3's alternate: a traced one per layer (full = 2^30)
        window_L = None if len(set(windows)) == 1 else jnp.asarray([w or 2**30 for w in windows], jnp.int32)

        ring = context.context_mesh() if cache is None else None
        if ring is not None:  # context parallelism: the layers run the row in the ring's balanced order
            tokens_BxT, valid_BxT, segment_ids_BxT, branch_ids_BxT, positions_BxT, dropout_keys_BxT = _balanced(
                ring, cfg.attention_block, tokens_BxT, valid_BxT, segment_ids_BxT, branch_ids_BxT, positions_BxT,
                dropout_keys_BxT)  # fmt: skip
        if cache is None:  # the mask is made of each token's ids, per block (never a [T, S] array)
            ids = _row_ids(ring, valid_BxT, segment_ids_BxT, branch_ids_BxT, positions_BxT)
        else:
            if segment_ids_BxT is not None or branch_ids_BxT is not None:
                raise ValueError("segment_ids / branch_ids are not supported together with a KV cache")
            ids = _cache_ids(cache, valid_BxT)
            kv_mask_BxS = ids[1].valid

        x_BxTxD = embed(self.embed_tokens, tokens_BxT, dtype)
        if cfg.embed_scale != 1.0:  # Gemma: the scale rounded to the compute dtype, as transformers does
            x_BxTxD = x_BxTxD * jnp.asarray(cfg.embed_scale, dtype)
        graphdef, layer_state = nnx.split(self.layers)

        dropout = dropout_keys_BxT is not None and cfg.lora_rank > 0 and cfg.lora_dropout > 0

        def layer_fn(x_BxTxD, layer_state, kv, layer):
            keys = fold_keys(dropout_keys_BxT, layer) if dropout else None
            window = windows[0] if window_L is None else window_L[layer]
            block = nnx.merge(graphdef, layer_state)
            return block(x_BxTxD, positions_BxT, ids, inv_freq_LxE2[layer], kv, keys, window, router_logits)

        if cfg.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=_REMAT[cfg.remat])

        layer_L = jnp.arange(cfg.num_layers)
        if cache is None:
            if cfg.scan_layers:

                def scan_body(x, xs):
                    x, _, stats = layer_fn(x, xs[0], None, xs[1])
                    return x, stats

                x_BxTxD, router = jax.lax.scan(scan_body, x_BxTxD, (layer_state, layer_L))
            else:
                per_layer = []
                for i in range(cfg.num_layers):
                    x_BxTxD, _, stats = layer_fn(x_BxTxD, jax.tree.map(lambda a, i=i: a[i], layer_state), None, i)
                    per_layer.append(stats)
                router = None if per_layer[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
            new_cache = None
        else:

            def body(x, xs):
                st, ck, cv, layer = xs
                x, (ck, cv), _ = layer_fn(x, st, (ck, cv, cache.index), layer)
                return x, (ck, cv)

            xs = (layer_state, cache.k_LxBxSxKxE, cache.v_LxBxSxKxE, layer_L)
            x_BxTxD, (k_new, v_new) = jax.lax.scan(body, x_BxTxD, xs)
            new_cache, router = KVCache(k_new, v_new, kv_mask_BxS, cache.index + t), None

        if ring is not None:
            x_BxTxD, router = _in_row_order(ring, t, x_BxTxD, router)
        hidden_BxTxD = self.norm(x_BxTxD)
        logits = self.logits(hidden_BxTxD) if return_logits else None
        return DecoderOutput(logits, hidden_BxTxD, new_cache, router)

    def logits(self, hidden_BxTxD: Array) -> Array:
        """The LM head on final hidden states (soft-capped when the config says so)."""
        w, vocab_axis = self.lm_head_as_stored()  # a tied embedding contracted as stored: no [D, V] copy
        logits = jax.lax.dot_general(hidden_BxTxD, w, (((hidden_BxTxD.ndim - 1,), (1 - vocab_axis,)), ((), ())))
        cap = self.config.final_softcap
        return cap * jnp.tanh(logits / cap) if cap else logits


def _default_positions(valid_BxT: Array, segment_ids_BxT: Array | None, masked: bool) -> Array:
    """RoPE positions when none are given: restarting per segment, else from the attention mask (``cumsum - 1``,
    right for left padding; ``masked``), else ``arange``."""
    if segment_ids_BxT is not None:
        return segment_positions(segment_ids_BxT)
    if masked:
        return jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(valid_BxT.shape[1]), valid_BxT.shape)


def _row_ids(ring, valid_BxT, segment_ids_BxT, branch_ids_BxT, positions_BxT) -> tuple[Ids, Ids]:
    """(query ids, key ids) of whole rows: slots in order, or in the ring's balanced order under a context axis."""
    b, tp = valid_BxT.shape
    slots = np.arange(tp) if ring is None else context.balanced_order(tp, ring.shape["context"])
    ids = Ids(jnp.broadcast_to(jnp.asarray(slots, jnp.int32), (b, tp)), valid_BxT, segment_ids_BxT, branch_ids_BxT,
              positions_BxT)  # fmt: skip
    return ids, ids


def _cache_ids(cache: KVCache, valid_BxT: Array) -> tuple[Ids, Ids]:
    """(query ids, key ids) of tokens written into ``cache`` at its index: the keys are the cache's slots, their
    validity the cache's mask with these tokens' (a window counts slots here)."""
    b, t = valid_BxT.shape
    kv_mask_BxS = jax.lax.dynamic_update_slice_in_dim(cache.mask_BxS, valid_BxT, cache.index, axis=1)
    q_slots_BxT = jnp.broadcast_to(cache.index + jnp.arange(t, dtype=jnp.int32), (b, t))
    s = cache.mask_BxS.shape[1]
    k_slots_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return Ids(q_slots_BxT, valid_BxT), Ids(k_slots_BxS, kv_mask_BxS)


def _balanced(mesh, block: int, *rows_BxT):
    """Per-token arrays (None passes through) padded to the ring's length (padding: invalid tokens) and put in its
    balanced order (``context.balanced_order``)."""
    n = mesh.shape["context"]
    t = next(x for x in rows_BxT if x is not None).shape[1]
    tp = context.ring_layout(t, n, block)[1]

    def one(x):
        if x is None:
            return None
        if tp > t:
            tail = jnp.broadcast_to(x[:, -1:], (x.shape[0], tp - t, *x.shape[2:]))
            key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)  # dropout keys: any; the rest 0 (valid: False)
            x = jnp.concatenate([x, tail if key else jnp.zeros_like(tail)], axis=1)
        return context.rebalance(x, mesh)

    return tuple(map(one, rows_BxT))


def _in_row_order(mesh, t: int, x_BxTxD, router):
    """The final hidden states (and a mixture's router logits) back from the ring's balanced order to the row's
    order and length."""
    x_BxTxD = context.rebalance(x_BxTxD, mesh, inverse=True)[:, :t]
    if router is not None and "logits" in router:
        router = {**router, "logits": context.rebalance(router["logits"], mesh, inverse=True, dim=2)[:, :, :t]}
    return x_BxTxD, router


def init_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))
