"""Batched generation with a KV cache: one jit-compiled prefill + decode loop.

Shape letters: B batch, P prompt tokens (left-padded), N new tokens, V vocabulary.

Prompts are left-padded so every row's last prompt token sits in the last column; positions count real
tokens only. Sampling applies temperature, then top-k, then top-p (nucleus). ``temperature == 0`` is greedy.
Each sampled token also carries its log-prob under the *unmodified* policy (temperature 1, no truncation),
which sampled KL estimates E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] and on-policy pairs need, and under the
distribution actually sampled from.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models.llama import Decoder, KVCache

Array = jax.Array


class SampleOutput(NamedTuple):
    tokens_BxN: Array  # pad_id after a row has finished
    mask_BxN: Array  # True for generated tokens, up to and including EOS
    logps_BxN: Array  # log pi(token) under the policy itself (0 where masked)
    sampling_logps_BxN: Array  # log-prob under the temperature / top-k / top-p distribution sampled from


def process_logits(logits_BxV: Array, temperature: float, top_k: int, top_p: float | Array) -> Array:
    """Temperature, top-k and top-p filtering; removed entries become -inf. With top-k, top-p's cumulative mass is
    taken over the k largest (``lax.top_k`` sorts only them; their probabilities are normalised over every token
    left, so ties with the k-th are kept or removed with it, exactly as a sort of the whole vocabulary would); without
    it, the vocabulary is sorted only when ``top_p < 1``."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k > 0:
        # the k largest read back through their indices: XLA:CPU lowers a top_k whose indices go unused to a sort of
        # the whole vocabulary (~100x slower than its top-k kernel, most of a sampled decode step)
        top_BxK = jnp.take_along_axis(logits_BxV, jax.lax.top_k(logits_BxV, top_k)[1], axis=1)
        logits_BxV = jnp.where(logits_BxV < top_BxK[:, -1:], -jnp.inf, logits_BxV)
        lse_Bx1 = jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
        return _nucleus(logits_BxV, top_BxK, jnp.exp(top_BxK - lse_Bx1), top_p)

    def sorted_nucleus(x_BxV):
        sorted_BxV = jnp.sort(x_BxV, axis=-1)[:, ::-1]
        return _nucleus(x_BxV, sorted_BxV, jax.nn.softmax(sorted_BxV, axis=-1), top_p)

    return jax.lax.cond(jnp.asarray(top_p) < 1.0, sorted_nucleus, lambda x_BxV: x_BxV, logits_BxV)


def _nucleus(logits_BxV: Array, sorted_BxS: Array, probs_BxS: Array, top_p) -> Array:
    """Keep the smallest prefix of the descending ``sorted`` values whose mass reaches ``top_p``: a token stays if
    the mass before it is < top_p."""
    mass_before_BxS = jnp.cumsum(probs_BxS, axis=-1) - probs_BxS
    kept_BxS = mass_before_BxS < top_p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxS, sorted_BxS, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def inverse_cdf(logits_BxV: Array, u_B: Array) -> Array:
    """[B] tokens drawn from softmax(logits) by one uniform ``u`` in [0, 1) a row: the first token whose cumulative
    probability reaches (1 - u) of the total (> 0, so never a removed token). One random number a row, where
    ``jax.random.categorical`` draws a Gumbel variable for every token of the vocabulary (most of a sampled decode
    step on a CPU)."""
    probs_BxV = jnp.exp(logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True))
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    target_Bx1 = (1.0 - u_B[:, None]) * cdf_BxV[:, -1:]
    return jnp.minimum(jnp.sum(cdf_BxV < target_Bx1, axis=-1), logits_BxV.shape[-1] - 1)


def _pick(key, logits_BxV, temperature, top_k, top_p):
    """Token, its policy log-prob and its sampling log-prob; ``key``: one for the batch, or one per row [B, 2]."""
    policy_logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    if temperature == 0.0:
        token_B = jnp.argmax(logits_BxV, axis=-1)
        sampling_logp_B = jnp.zeros(token_B.shape, jnp.float32)  # a point mass
    else:
        processed_BxV = process_logits(logits_BxV, temperature, top_k, top_p)
        if key.ndim == 2:  # a key per row: a row's tokens do not depend on the other rows of its call
            u_B = jax.vmap(lambda k: jax.random.uniform(k, ()))(key)
        else:
            u_B = jax.random.uniform(key, processed_BxV.shape[:1])
        token_B = inverse_cdf(processed_BxV, u_B)
        sampling_logp_B = jnp.take_along_axis(jax.nn.log_softmax(processed_BxV, -1), token_B[:, None], -1)[:, 0]
    logp_B = jnp.take_along_axis(policy_logp_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logp_B, sampling_logp_B


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "eos_ids", "pad_id"))
def _generate(
    graphdef, state, prompt_BxP, prompt_mask_BxP, key, top_p, *, max_new_tokens, temperature, top_k, eos_ids, pad_id
):
    model = nnx.merge(graphdef, state)
    b, p = prompt_BxP.shape
    n = max_new_tokens
    valid_BxP = prompt_mask_BxP.astype(bool)
    positions_BxP = jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
    cache = KVCache.init(model.config, b, p + n)
    # the prefill's logits at the last position only: [B, V], not [B, P, V]
    # longrope: the factors of the longest row this call can make, for the prefill and every step (transformers
    # instead switches at the original context, recomputing its cache; the two agree on rows that stay on one side)
    cfg = model.config
    long = cfg.rope_type == "longrope" and p + n > cfg.rope_original_max_position
    out = model(prompt_BxP, positions_BxT=positions_BxP, attention_mask_BxT=valid_BxP, cache=cache, return_logits=False,
                rope_long=long)  # fmt: skip
    last_BxV = model.logits(out.hidden_BxTxD[:, -1])
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def cond(carry):
        i, *_, done_B, _, _ = carry
        return (i < n) & ~jnp.all(done_B)

    def body(carry):
        i, cache, logits_BxV, pos_B, done_B, key, buffers = carry
        if key.ndim == 2:
            sub = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, i)
        else:
            key, sub = jax.random.split(key)
        token_B, logp_B, slogp_B = _pick(sub, logits_BxV, temperature, top_k, top_p)
        live_B = ~done_B
        token_B = jnp.where(live_B, token_B, pad_id)
        buffers = tuple(
            jax.lax.dynamic_update_slice_in_dim(buf, val[:, None], i, axis=1)
            for buf, val in zip(
                buffers, (token_B, live_B, jnp.where(live_B, logp_B, 0.0), jnp.where(live_B, slogp_B, 0.0)), strict=True
            )
        )
        done_B = done_B | jnp.isin(token_B, eos)
        step = model(token_B[:, None], positions_BxT=pos_B[:, None], attention_mask_BxT=live_B[:, None], cache=cache,
                     rope_long=long)  # fmt: skip
        return i + 1, step.cache, step.logits_BxTxV[:, -1], pos_B + 1, done_B, key, buffers

    buffers = (
        jnp.full((b, n), pad_id, jnp.int32),
        jnp.zeros((b, n), bool),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), jnp.float32),
    )
    init = (
        jnp.int32(0),
        out.cache,
        last_BxV,
        jnp.sum(valid_BxP, axis=1),
        jnp.zeros((b,), bool),
        key,
        buffers,
    )
    *_, buffers = jax.lax.while_loop(cond, body, init)
    return SampleOutput(*buffers)


def row_bytes(cfg, prompt_length: int, max_new_tokens: int) -> int:
    """An upper estimate of the device memory one sampled row takes in ``generate``: its KV cache, the prefill's
    attention scores and MLP activations, and the decode step's vocabulary-sized temporaries (logits, their
    log-softmax, the filtered, sorted and summed copies: about 10 float32 vectors of the vocabulary in XLA's memory
    analysis on CPU, counted as 12)."""
    slots = prompt_length + max_new_tokens
    act = jnp.dtype(cfg.dtype).itemsize
    cache = 2 * cfg.num_layers * slots * cfg.num_kv_heads * cfg.head_dim * act
    scores = 2 * cfg.num_heads * prompt_length * slots * 4  # float32 scores and their softmax
    mlp = prompt_length * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
    vocab = 12 * cfg.vocab_size * 4
    return cache + scores + mlp + vocab


def rows_per_call(cfg, prompt_length: int, max_new_tokens: int, *, rows: int, group: int, budget_mb: float) -> int:
    """Rows of one ``generate`` call: as many as ``budget_mb`` of device memory holds (``row_bytes``), at most
    the ``rows`` needed, a multiple of ``group`` (a prompt's samples stay in one call) and at least one group."""
    fit = int(budget_mb * 2**20 // row_bytes(cfg, prompt_length, max_new_tokens))
    need = -(-rows // group) * group
    return max(min(fit, need) // group, 1) * group


def ended(tokens_BxN, mask_BxN, eos_ids) -> np.ndarray:
    """[B] whether each sampled row ended with an EOS (False: cut off at ``max_new_tokens``)."""
    tokens, mask = np.asarray(tokens_BxN), np.asarray(mask_BxN).astype(bool)
    return (np.isin(tokens, np.asarray(eos_ids)) & mask).any(axis=1)


def generate(
    model: Decoder,
    prompt_BxP: Array,
    prompt_mask_BxP: Array,
    *,
    key: Array | int = 0,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: tuple[int, ...] | None = None,
    pad_id: int | None = None,
) -> SampleOutput:
    """Sample ``max_new_tokens`` per row from left-padded prompts (``prompt_mask`` 1 = real token).

    ``eos_ids`` defaults to the model config's EOS ids; a row stops after its first EOS. ``key`` seeds the
    sampling (an int or a PRNG key), or each row's sampling with a [B, 2] array of keys (a row's tokens then do not
    depend on which other rows share the call). The loop exits early once every row has finished.
    """
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    cfg = model.config
    eos = tuple(cfg.eos_ids if eos_ids is None else eos_ids)
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_BxP, jnp.int32),
        jnp.asarray(prompt_mask_BxP),
        key,
        jnp.float32(top_p),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        eos_ids=eos,
        pad_id=int(pad),
    )
