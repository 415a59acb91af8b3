"""Token and sequence log-probabilities, a memory-efficient LM-head variant, and exact token KL.

Shape letters: B batch, T tokens, V vocabulary, D model width, N = B*T flattened tokens,
C tokens per chunk, W vocabulary entries per chunk.

Alignment convention: ``logits[:, t]`` scores ``targets[:, t]``. ``next_token_targets`` builds targets and
mask from token ids and a completion-only loss mask (logits at t predict token t + 1).
All outputs are float32 whatever the input dtype (bfloat16 logits are upcast before the log-softmax).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array
f32 = jnp.float32


def next_token_targets(tokens_BxT: Array, loss_mask_BxT: Array) -> tuple[Array, Array]:
    """Shift ids and mask left by one: position t is scored on token t + 1; the last position is masked."""
    targets_BxT = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, 1)))
    mask_BxT = jnp.pad(loss_mask_BxT[:, 1:], ((0, 0), (0, 1))).astype(bool)
    return targets_BxT, mask_BxT


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """log softmax(logits)[target] per position, computed in float32."""
    logits_BxTxV = logits_BxTxV.astype(f32)
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_BxT - lse_BxT


def masked_sums(token_logps_BxT: Array, mask_BxT: Array) -> tuple[Array, Array]:
    """Per-sequence sums of masked token log-probs and the token counts."""
    mask_BxT = mask_BxT.astype(bool)
    sums_B = jnp.sum(jnp.where(mask_BxT, token_logps_BxT, 0.0), axis=-1)
    return sums_B, jnp.sum(mask_BxT, axis=-1).astype(f32)


def sequence_logprobs(logits_BxTxV: Array, targets_BxT: Array, mask_BxT: Array) -> tuple[Array, Array]:
    """Completion-only log-probs from full logits: ``(sums_B, counts_B)``; means are ``sums / counts``."""
    safe_targets_BxT = jnp.where(mask_BxT.astype(bool), targets_BxT, 0)  # padding ids may be out of range
    return masked_sums(token_logprobs(logits_BxTxV, safe_targets_BxT), mask_BxT)


def sequence_mean_logprobs(sums_B: Array, counts_B: Array) -> Array:
    """Length-averaged log-probs; an empty sequence gives 0."""
    return sums_B / jnp.maximum(counts_B, 1.0)


# --- Memory-efficient LM head: log-probs from hidden states without the [B, T, V] logits. -----------------------


def _vocab_slices(vocab: int, chunk: int) -> tuple[int, int]:
    """Number of full vocabulary chunks and the size of the remainder chunk."""
    return vocab // chunk, vocab % chunk


# The head weight is [D, V] (``vocab_axis=1``, an untied ``lm_head``) or [V, D] (``vocab_axis=0``: a tied input
# embedding used as it is stored, so no [D, V] transposed copy is made, and its gradient accumulates in the
# embedding's own layout). W: a vocabulary chunk of either layout.


def _contract(a, b, a_dim: int, b_dim: int) -> Array:
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=f32)


def _chunk_logits(h_CxD, w, vocab_axis):
    """[C, W] = h @ w over D, whichever axis of ``w`` is the vocabulary."""
    return _contract(h_CxD, w, 1, 1 - vocab_axis)


def _grad_h(dlogits_CxW, w, vocab_axis):
    """[C, D] = dlogits @ w^T."""
    return _contract(dlogits_CxW, w.astype(f32), 1, vocab_axis)


def _grad_w(h_CxD, dlogits_CxW, vocab_axis):
    """d logits / d w in ``w``'s layout: [D, W] or [W, D]."""
    h_CxD = h_CxD.astype(f32)
    return _contract(h_CxD, dlogits_CxW, 0, 0) if vocab_axis else _contract(dlogits_CxW, h_CxD, 0, 0)


def _vocab_tail(w, start, vocab_axis):
    return w[:, start:] if vocab_axis else w[start:]


def _lse_over_vocab(h_CxD: Array, w: Array, vocab_chunk: int, vocab_axis: int = 1) -> Array:
    """Online (streaming) logsumexp of h @ w over vocabulary chunks."""
    n_full, rem = _vocab_slices(w.shape[vocab_axis], vocab_chunk)

    def update(carry, logits_CxW):
        m_C, s_C = carry
        m_new_C = jnp.maximum(m_C, jnp.max(logits_CxW, axis=-1))
        s_C = s_C * jnp.exp(m_C - m_new_C) + jnp.sum(jnp.exp(logits_CxW - m_new_C[:, None]), axis=-1)
        return m_new_C, s_C

    def body(carry, i):
        w_W = jax.lax.dynamic_slice_in_dim(w, i * vocab_chunk, vocab_chunk, axis=vocab_axis)
        return update(carry, _chunk_logits(h_CxD, w_W, vocab_axis)), None

    c = h_CxD.shape[0]
    carry = (jnp.full((c,), -jnp.inf, f32), jnp.zeros((c,), f32))
    carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full))
    if rem:
        carry = update(carry, _chunk_logits(h_CxD, _vocab_tail(w, n_full * vocab_chunk, vocab_axis), vocab_axis))
    m_C, s_C = carry
    return m_C + jnp.log(s_C)


def _target_logits(h_CxD: Array, w: Array, t_C: Array, vocab_axis: int) -> Array:
    w_t = jnp.take(w, t_C, axis=vocab_axis)  # [D, C] or [C, D]
    spec = "cd,dc->c" if vocab_axis else "cd,cd->c"
    return jnp.einsum(spec, h_CxD, w_t, preferred_element_type=f32)


def _token_chunks(x, c):
    return x.reshape(x.shape[0] // c, c, *x.shape[1:])


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_token_logprobs(h_NxD, w, t_N, token_chunk, vocab_chunk, vocab_axis):
    logps_N, _ = _chunked_fwd(h_NxD, w, t_N, token_chunk, vocab_chunk, vocab_axis)
    return logps_N


def _chunked_fwd(h_NxD, w, t_N, token_chunk, vocab_chunk, vocab_axis):
    def per_chunk(args):
        h_CxD, t_C = args
        lse_C = _lse_over_vocab(h_CxD, w, vocab_chunk, vocab_axis)
        return _target_logits(h_CxD, w, t_C, vocab_axis) - lse_C, lse_C

    logps, lse = jax.lax.map(per_chunk, (_token_chunks(h_NxD, token_chunk), _token_chunks(t_N, token_chunk)))
    return logps.reshape(-1), (h_NxD, w, t_N, lse.reshape(-1))


def _chunked_bwd(token_chunk, vocab_chunk, vocab_axis, residuals, g_N):
    """d logp_n / d logits_nv = onehot(t_n)_v - softmax_nv, recomputed chunk by chunk."""
    h_NxD, w, t_N, lse_N = residuals
    n_full, rem = _vocab_slices(w.shape[vocab_axis], vocab_chunk)

    def token_chunk_body(gw, args):
        h_CxD, t_C, lse_C, g_C = args

        def vocab_piece(gh_CxD, w_W, start):
            logits_CxW = _chunk_logits(h_CxD, w_W, vocab_axis)
            p_CxW = jnp.exp(logits_CxW - lse_C[:, None])
            onehot_CxW = (t_C[:, None] == start + jnp.arange(logits_CxW.shape[1])[None, :]).astype(f32)
            dlogits_CxW = g_C[:, None] * (onehot_CxW - p_CxW)
            return gh_CxD + _grad_h(dlogits_CxW, w_W, vocab_axis), _grad_w(h_CxD, dlogits_CxW, vocab_axis)

        def vocab_body(carry, i):
            gh_CxD, gw = carry
            start = i * vocab_chunk
            w_W = jax.lax.dynamic_slice_in_dim(w, start, vocab_chunk, axis=vocab_axis)
            gh_CxD, gw_W = vocab_piece(gh_CxD, w_W, start)
            old_W = jax.lax.dynamic_slice_in_dim(gw, start, vocab_chunk, axis=vocab_axis)
            return (gh_CxD, jax.lax.dynamic_update_slice_in_dim(gw, old_W + gw_W, start, axis=vocab_axis)), None

        gh_CxD = jnp.zeros(h_CxD.shape, f32)
        (gh_CxD, gw), _ = jax.lax.scan(vocab_body, (gh_CxD, gw), jnp.arange(n_full))
        if rem:
            start = n_full * vocab_chunk
            gh_CxD, gw_R = vocab_piece(gh_CxD, _vocab_tail(w, start, vocab_axis), start)
            gw = gw.at[:, start:].add(gw_R) if vocab_axis else gw.at[start:].add(gw_R)
        return gw, gh_CxD

    chunks = tuple(_token_chunks(x, token_chunk) for x in (h_NxD, t_N, lse_N, g_N.astype(f32)))
    gw, gh = jax.lax.scan(token_chunk_body, jnp.zeros(w.shape, f32), chunks)
    return gh.reshape(h_NxD.shape).astype(h_NxD.dtype), gw.astype(w.dtype), None


_chunked_token_logprobs.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_logprobs(
    hidden_BxTxD: Array,
    lm_head_DxV: Array,
    targets_BxT: Array,
    *,
    token_chunk: int = 1024,
    vocab_chunk: int = 8192,
    vocab_axis: int = 1,
) -> Array:
    """``token_logprobs(hidden @ lm_head, targets)`` without materialising the logits, value or gradient.

    Tokens are processed ``token_chunk`` at a time and the vocabulary ``vocab_chunk`` at a time (a streaming
    logsumexp), so the largest temporary is [token_chunk, vocab_chunk]. The backward pass recomputes each logits
    chunk instead of storing it. Matmuls run in the inputs' dtype and accumulate in float32. ``vocab_axis=0``
    takes the head as [V, D] (a tied embedding as stored).
    """
    b, t, d = hidden_BxTxD.shape
    if lm_head_DxV.shape[1 - vocab_axis] != d:
        raise ValueError(f"lm_head must have D={d} on axis {1 - vocab_axis}; got {lm_head_DxV.shape}")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1; got {token_chunk}, {vocab_chunk}")
    n = b * t
    c = min(token_chunk, n)
    pad = -n % c
    h_NxD = jnp.pad(hidden_BxTxD.reshape(n, d), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets_BxT.reshape(n).astype(jnp.int32), (0, pad))
    w = min(vocab_chunk, lm_head_DxV.shape[vocab_axis])
    logps_N = _chunked_token_logprobs(h_NxD, lm_head_DxV, t_N, c, w, vocab_axis)
    return logps_N[:n].reshape(b, t)


def chunked_sequence_logprobs(
    hidden_BxTxD: Array,
    lm_head_DxV: Array,
    targets_BxT: Array,
    mask_BxT: Array,
    *,
    token_chunk: int = 1024,
    vocab_chunk: int = 8192,
) -> tuple[Array, Array]:
    """``sequence_logprobs`` from final hidden states and the LM-head weight: ``(sums_B, counts_B)``."""
    safe_targets_BxT = jnp.where(mask_BxT.astype(bool), targets_BxT, 0)
    token_logps_BxT = chunked_token_logprobs(
        hidden_BxTxD, lm_head_DxV, safe_targets_BxT, token_chunk=token_chunk, vocab_chunk=vocab_chunk
    )
    return masked_sums(token_logps_BxT, mask_BxT)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _materialised_token_logprobs(h_NxD, w, t_N, vocab_axis):
    logps_N, _ = _materialised_fwd(h_NxD, w, t_N, vocab_axis)
    return logps_N


def _materialised_fwd(h_NxD, w, t_N, vocab_axis):
    logits_NxV = _chunk_logits(h_NxD, w, vocab_axis)
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    target_N = jnp.take_along_axis(logits_NxV, t_N[:, None], axis=-1)[:, 0]
    return target_N - lse_N, (h_NxD, w, t_N, logits_NxV, lse_N)


def _materialised_bwd(vocab_axis, residuals, g_N):
    """d logp_n / d logits_nv = onehot(t_n)_v - softmax_nv, in one pass over the kept logits (autodiff takes three:
    the softmax, the scatter of the target term, their sum)."""
    h_NxD, w, t_N, logits_NxV, lse_N = residuals
    onehot_NxV = t_N[:, None] == jnp.arange(logits_NxV.shape[1])[None, :]
    d_NxV = jnp.where(onehot_NxV, g_N[:, None], 0.0) - g_N[:, None] * jnp.exp(logits_NxV - lse_N[:, None])
    gh_NxD = _contract(d_NxV.astype(h_NxD.dtype), w, 1, vocab_axis).astype(h_NxD.dtype)
    d_NxV = d_NxV.astype(w.dtype)
    gw = _contract(h_NxD, d_NxV, 0, 0) if vocab_axis else _contract(d_NxV, h_NxD, 0, 0)
    return gh_NxD, gw.astype(w.dtype), None


_materialised_token_logprobs.defvjp(_materialised_fwd, _materialised_bwd)


def _capped_token_logprobs(h_NxD: Array, w: Array, t_N: Array, cap: float, token_chunk: int, vocab_axis: int) -> Array:
    """Log-probs under soft-capped logits cap * tanh(h @ w / cap) (Gemma), token chunk by token chunk, each chunk's
    logits recomputed in the backward pass (autodiff through the tanh)."""
    n = h_NxD.shape[0]
    c = min(token_chunk, n)
    pad = -n % c

    @jax.checkpoint
    def per_chunk(args):
        h_CxD, t_C = args
        logits_CxV = cap * jnp.tanh(_chunk_logits(h_CxD, w, vocab_axis) / cap)
        return jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits_CxV, axis=-1)

    chunks = (_token_chunks(jnp.pad(h_NxD, ((0, pad), (0, 0))), c), _token_chunks(jnp.pad(t_N, (0, pad)), c))
    return jax.lax.map(per_chunk, chunks).reshape(-1)[:n]


def head_token_logprobs(
    h_NxD: Array,
    lm_head: Array,
    targets_N: Array,
    *,
    token_chunk: int = 1024,
    vocab_chunk: int = 8192,
    max_logits_mb: float = 256.0,
    softcap: float | None = None,
    vocab_axis: int = 1,
) -> Array:
    """Log-probs [N] of ``targets`` under ``h @ lm_head`` for a compact buffer of scored hidden states.

    ``lm_head`` is [D, V], or [V, D] with ``vocab_axis=0`` (a tied embedding as stored). When the [N, V] float32
    logits fit in ``max_logits_mb`` they are materialised once and kept for the backward pass (three matmuls in
    all); above it the chunked head streams them (never more than [token_chunk, vocab_chunk] at a time, at the
    price of recomputing them in the backward pass).
    """
    n, v = h_NxD.shape[0], lm_head.shape[vocab_axis]
    t_N = targets_N.astype(jnp.int32)
    if softcap:
        return _capped_token_logprobs(h_NxD, lm_head, t_N, softcap, token_chunk, vocab_axis)
    if n * v * 4 <= max_logits_mb * 2**20:
        return _materialised_token_logprobs(h_NxD, lm_head, t_N, vocab_axis)
    return chunked_token_logprobs(
        h_NxD[None], lm_head, t_N[None], token_chunk=token_chunk, vocab_chunk=vocab_chunk, vocab_axis=vocab_axis
    )[0]


def head_log_sum_sq_probs(
    h_NxD: Array, lm_head: Array, *, token_chunk: int = 1024, vocab_chunk: int = 8192, max_logits_mb: float = 256.0,
    softcap: float | None = None, vocab_axis: int = 1,
) -> Array:  # fmt: skip
    """log sum_v softmax(h @ lm_head)_v^2 per row [N] = lse(2 * logits) - 2 lse(logits), without gradient (WPO's
    alignment term), materialised or streamed like ``head_token_logprobs`` (materialised when soft-capped)."""
    h_NxD, w = jax.lax.stop_gradient(h_NxD), jax.lax.stop_gradient(lm_head)
    n, v = h_NxD.shape[0], w.shape[vocab_axis]
    if n * v * 4 <= max_logits_mb * 2**20 or softcap:
        logits_NxV = _chunk_logits(h_NxD, w, vocab_axis)
        if softcap:
            logits_NxV = softcap * jnp.tanh(logits_NxV / softcap)
        return jax.nn.logsumexp(2.0 * logits_NxV, axis=-1) - 2.0 * jax.nn.logsumexp(logits_NxV, axis=-1)
    c = min(token_chunk, n)
    pad = -n % c
    chunk = min(vocab_chunk, v)

    def per_chunk(h_CxD):  # (2h) @ w = 2 logits: one streaming logsumexp each
        return _lse_over_vocab(2.0 * h_CxD, w, chunk, vocab_axis) - 2.0 * _lse_over_vocab(h_CxD, w, chunk, vocab_axis)

    out = jax.lax.map(per_chunk, _token_chunks(jnp.pad(h_NxD, ((0, pad), (0, 0))), c))
    return out.reshape(-1)[:n]


# --- KL ------------------------------------------------------------------------------------------------------------


def token_kl(policy_logits_BxTxV: Array, reference_logits_BxTxV: Array, mask_BxT: Array) -> Array:
    """Exact per-token KL(pi || pi_ref) over the full vocabulary, zero where masked."""
    logp_BxTxV = jax.nn.log_softmax(policy_logits_BxTxV.astype(f32), axis=-1)
    logq_BxTxV = jax.nn.log_softmax(reference_logits_BxTxV.astype(f32), axis=-1)
    kl_BxT = jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - logq_BxTxV), axis=-1)
    return jnp.where(mask_BxT.astype(bool), kl_BxT, 0.0)


def chunked_token_kl(
    policy_logits, reference_logits, hp_NxD: Array, hq_NxD: Array, mask_N: Array, *, vocab_size: int,
    max_logits_mb: float = 256.0,
) -> Array:  # fmt: skip
    """``token_kl`` [N] from hidden states, in chunks of tokens whose logits [C, V] take at most ``max_logits_mb``
    (``policy_logits`` / ``reference_logits``: hidden [C, D] -> logits [C, V]), so that a 262k vocabulary never
    holds [N, V] (eval's KL over thousands of scored entries). No gradient."""
    n, d = hp_NxD.shape
    c = max(1, min(n, int(max_logits_mb * 2**20 // (4 * vocab_size))))
    pad = -n % c

    def chunks(x):
        return _token_chunks(jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)), c)

    def one(args):
        hp_CxD, hq_CxD, m_C = args
        return token_kl(policy_logits(hp_CxD), reference_logits(hq_CxD), m_C)

    kl = jax.lax.map(one, (chunks(jax.lax.stop_gradient(hp_NxD)), chunks(jax.lax.stop_gradient(hq_NxD)),
                           chunks(mask_N)))  # fmt: skip
    return kl.reshape(-1)[:n]
