"""Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2) as Hugging Face defines it.

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

from dpo_jax.models import attention
from dpo_jax.models.attention import Ids
from dpo_jax.models.config import LORA_TARGETS, ModelConfig

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


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [E/2], with Hugging Face's linear and Llama-3 scaling."""
    e = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
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


def apply_rope(x_BxTxNxE: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
    """Rotate-half RoPE (the Hugging Face layout: first half / second half of each head)."""
    freqs_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb_BxTxE = jnp.concatenate([freqs_BxTxE2, freqs_BxTxE2], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb_BxTxE), jnp.sin(emb_BxTxE)
    x = x_BxTxNxE.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxE.dtype)


def segment_positions(segment_ids_BxT: Array) -> Array:
    """Positions that restart at 0 at each new segment of a packed row."""
    t = jnp.arange(segment_ids_BxT.shape[1])
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    start_BxT = jax.lax.cummax(jnp.where(is_start, t, 0), axis=1)
    return t - start_BxT


def weight(variable, dtype) -> Array:
    """A parameter's value in ``dtype``; an int8 base weight (a ``qwix.QArray``: int8 values, a float scale per
    channel) is dequantized first."""
    x = variable.get_value()
    return (qwix.dequantize(x) if isinstance(x, qwix.QArray) else x).astype(dtype)


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
        y = dense(x, weight(self.kernel, x.dtype))
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
    def __init__(self, d: int, eps: float):
        self.weight = nnx.Param(jnp.ones((d,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)  # HF order: cast, then scale


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, e, std = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.initializer_range
        self.q_proj = Linear(d, h * e, bias=cfg.qkv_bias, std=std, rngs=rngs, cfg=cfg, name="q_proj")
        self.k_proj = Linear(d, k * e, bias=cfg.qkv_bias, std=std, rngs=rngs, cfg=cfg, name="k_proj")
        self.v_proj = Linear(d, k * e, bias=cfg.qkv_bias, std=std, rngs=rngs, cfg=cfg, name="v_proj")
        self.o_proj = Linear(h * e, d, bias=cfg.o_bias, std=std, rngs=rngs, cfg=cfg, name="o_proj")
        self.shape = (h, k, e)
        self.config = cfg

    def __call__(self, x_BxTxD, positions_BxT, ids, inv_freq, kv=None, dropout_keys_BxT=None):
        """``ids``: (query ``Ids``, key ``Ids``) the mask is made of; ``kv``: optional (cache_k_BxSxKxE,
        cache_v_BxSxKxE, index) to write into and attend over."""
        h, k, e = self.shape
        b, t, _ = x_BxTxD.shape
        keys = dropout_keys_BxT
        q_BxTxHxE = apply_rope(self.q_proj(x_BxTxD, keys).reshape(b, t, h, e), positions_BxT, inv_freq)
        k_BxTxKxE = apply_rope(self.k_proj(x_BxTxD, keys).reshape(b, t, k, e), positions_BxT, inv_freq)
        v_BxTxKxE = self.v_proj(x_BxTxD, keys).reshape(b, t, k, e)
        new_kv = None
        if kv is not None:
            cache_k, cache_v, index = kv
            k_BxTxKxE = jax.lax.dynamic_update_slice_in_dim(cache_k, k_BxTxKxE.astype(cache_k.dtype), index, axis=1)
            v_BxTxKxE = jax.lax.dynamic_update_slice_in_dim(cache_v, v_BxTxKxE.astype(cache_v.dtype), index, axis=1)
            new_kv = (k_BxTxKxE, v_BxTxKxE)
        q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, k, h // k, e)
        cfg = self.config
        out_BxTxKxGxE = attention.attend(
            q_BxTxKxGxE, k_BxTxKxE.astype(q_BxTxHxE.dtype), v_BxTxKxE.astype(x_BxTxD.dtype), *ids,
            window=cfg.sliding_window, implementation=cfg.attention, block=cfg.attention_block,
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

    def __call__(self, x_BxTxD, dropout_keys_BxT=None):
        keys = dropout_keys_BxT
        return self.down_proj(swiglu(self.gate_proj(x_BxTxD, keys), self.up_proj(x_BxTxD, keys)), keys)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxTxD, positions_BxT, ids, inv_freq, kv=None, dropout_keys_BxT=None):
        """``dropout_keys_BxT``: this layer's, per token (each projection folds in its own index)."""
        keys = dropout_keys_BxT
        attn, new_kv = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT, ids, inv_freq, kv, keys)
        x_BxTxD = x_BxTxD + attn
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD), keys), new_kv


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), jnp.float32) * std)
        )

    def lm_head_weight(self) -> Array:
        """[D, V] in the compute dtype: the input embedding transposed when tied."""
        dtype = jnp.dtype(self.config.dtype)
        return weight(self.embed_tokens, dtype).T if self.lm_head is None else weight(self.lm_head, dtype)

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
          return_logits: False skips the LM head (use ``lm_head_weight()`` with the chunked log-probs).
          dropout_keys_BxT: a training step's typed key per token: LoRA dropout at ``config.lora_dropout`` (None:
            none, as in eval and sampling); each layer and projection folds in its own index.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t = tokens_BxT.shape
        valid_BxT = jnp.ones((b, t), bool) if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
        if positions_BxT is None:
            if segment_ids_BxT is not None:
                positions_BxT = segment_positions(segment_ids_BxT)
            elif attention_mask_BxT is not None:
                positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0)
            else:
                positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
        inv_freq = rope_inv_freq(cfg)

        if cache is None:  # the mask is made of each token's ids, per block (never a [T, S] array)
            slots_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            ids = Ids(slots_BxT, valid_BxT, segment_ids_BxT, branch_ids_BxT, positions_BxT)
            ids = (ids, ids)
        else:
            if segment_ids_BxT is not None or branch_ids_BxT is not None:
                raise ValueError("segment_ids / branch_ids are not supported together with a KV cache")
            kv_mask_BxS = jax.lax.dynamic_update_slice_in_dim(cache.mask_BxS, valid_BxT, cache.index, axis=1)
            q_slots_BxT = jnp.broadcast_to(cache.index + jnp.arange(t, dtype=jnp.int32), (b, t))
            s = cache.mask_BxS.shape[1]
            k_slots_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            ids = (Ids(q_slots_BxT, valid_BxT), Ids(k_slots_BxS, kv_mask_BxS))  # the window counts slots here

        x_BxTxD = embed(self.embed_tokens, tokens_BxT, dtype)
        graphdef, layer_state = nnx.split(self.layers)

        dropout = dropout_keys_BxT is not None and cfg.lora_rank > 0 and cfg.lora_dropout > 0

        def layer_fn(x_BxTxD, layer_state, kv, layer=None):
            keys = fold_keys(dropout_keys_BxT, layer) if dropout else None
            return nnx.merge(graphdef, layer_state)(x_BxTxD, positions_BxT, ids, inv_freq, kv, keys)

        if cfg.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=_REMAT[cfg.remat])

        if cache is None:
            if cfg.scan_layers:
                xs = (layer_state, jnp.arange(cfg.num_layers))
                x_BxTxD, _ = jax.lax.scan(lambda x, xs: (layer_fn(x, xs[0], None, xs[1])[0], None), x_BxTxD, xs)
            else:
                for i in range(cfg.num_layers):
                    x_BxTxD, _ = layer_fn(x_BxTxD, jax.tree.map(lambda a, i=i: a[i], layer_state), None, i)
            new_cache = None
        else:

            def body(x, xs):
                st, ck, cv = xs
                x, (ck, cv) = layer_fn(x, st, (ck, cv, cache.index))
                return x, (ck, cv)

            x_BxTxD, (k_new, v_new) = jax.lax.scan(body, x_BxTxD, (layer_state, cache.k_LxBxSxKxE, cache.v_LxBxSxKxE))
            new_cache = KVCache(k_new, v_new, kv_mask_BxS, cache.index + t)

        hidden_BxTxD = self.norm(x_BxTxD)
        logits = jnp.dot(hidden_BxTxD, self.lm_head_weight()) if return_logits else None
        return DecoderOutput(logits, hidden_BxTxD, new_cache)


def init_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))
