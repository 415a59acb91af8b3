"""Attention over a mask built from token ids: the reference einsum, a blockwise (flash-style) implementation whose
memory is linear in the row, its row functions (which the context axis's strategies in ``dpo_jax.models.context``
run on each device), and the merge of partial attentions (``dpo_jax.models.kernels`` chooses among them and the
platforms' kernels).

Shape letters: B batch, T query tokens, S key slots, K key/value heads, G = H // K query heads per KV head, E head
width, Q query block, C key block (chunk), NQ / NC blocks of a row.

Who may attend to whom is never an array [T, S]: it is a function of each token's ids (``Ids``), evaluated per
block. A query sees a key when the key's slot is not after its own (causal), the key is a real token, both are in
the same segment (packed rows), the key is in the shared prefix or the query's own branch (shared-prompt rows:
a completion sees the prompt and itself), and, with a sliding window, the key is within ``window`` positions
(positions when given: a shared row's rejected tokens continue from the prompt's end).

``blockwise`` is a ``jax.custom_vjp``: the forward keeps the output and the log-sum-exp of every query (O(T));
the backward recomputes each block's probabilities. Key blocks that no query of a block can see (after its last
query: causal; before the start of its earliest segment; padding; beyond a sliding window) are skipped, in the
forward and backward, from the blocks' slot (and position) ranges (so rows in the ring's balanced order, whose
slots have a gap, are skipped alike).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MASKED = float(np.finfo(np.float32).min)  # the einsum path's additive mask: finite, so padding rows stay finite


class Ids(NamedTuple):
    """What the mask is made of, per token. Queries and keys each have one (the same for self-attention)."""

    slot: Array  # [B, N] int32: the token's place in the row (or the KV cache)
    valid: Array  # [B, N] bool: a real token (keys: may be attended to)
    segment: Array | None = None  # [B, N] int32: packed sequences (0 = padding)
    branch: Array | None = None  # [B, N] int32: 0 = shared prefix, 1, 2, ... = completions after it
    position: Array | None = None  # [B, N] int32: RoPE positions (the window's distance when given)

    def pad(self, n: int) -> Ids:
        """Padded to ``n`` tokens with invalid ones (slots continue, so the causal rule stays monotone)."""
        extra = n - self.slot.shape[1]
        if extra == 0:
            return self
        b = self.slot.shape[0]
        tail = self.slot[:, -1:] + 1 + jnp.arange(extra)[None]
        cat = lambda x, fill: None if x is None else jnp.concatenate([x, jnp.full((b, extra), fill, x.dtype)], 1)  # noqa: E731
        return Ids(jnp.concatenate([self.slot, tail], 1), cat(self.valid, False), cat(self.segment, 0),
                   cat(self.branch, 0), cat(self.position, 0))  # fmt: skip


def allowed(q: Ids, k: Ids, window: int | None) -> Array:
    """[B, T, S] bool from the ids (the einsum path's mask, and each block's in ``blockwise``)."""
    ok = (k.slot[:, None, :] <= q.slot[:, :, None]) & k.valid[:, None, :]
    if q.segment is not None:
        ok &= q.segment[:, :, None] == k.segment[:, None, :]
    if q.branch is not None:
        ok &= (k.branch[:, None, :] == 0) | (k.branch[:, None, :] == q.branch[:, :, None])
    if window is not None:
        if q.position is not None and k.position is not None:
            ok &= q.position[:, :, None] - k.position[:, None, :] < window
        else:
            ok &= q.slot[:, :, None] - k.slot[:, None, :] < window
    return ok


def einsum_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window: int | None, softcap=None):
    """The reference: every score of the row at once ([B, K, G, T, S] float32), an additive mask."""
    e = q_BxTxKxGxE.shape[-1]
    dtype = q_BxTxKxGxE.dtype
    scores = jnp.einsum("btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE.astype(dtype)).astype(jnp.float32) * (e**-0.5)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    bias = jnp.where(allowed(q, k, window), 0.0, MASKED)[:, None, None, :, :]
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE.astype(dtype))


# --- Blockwise --------------------------------------------------------------------------------------------------


def _take(x, start, size, axis=0):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def block_ids(ids: Ids, start, size) -> Ids:
    return Ids(*(None if x is None else _take(x, start, size) for x in ids))


def _block_mask(q: Ids, k: Ids, window) -> Array:
    """[Q, C] of one row's blocks (the ids without their batch axis)."""
    add = lambda x: None if x is None else x[None]  # noqa: E731
    return allowed(Ids(*map(add, q)), Ids(*map(add, k)), window)[0]


_BIG = int(np.iinfo(np.int32).max)


def query_blocks(q: Ids, qb: int, nq: int, window) -> tuple[Array, Array, Array]:
    """[NQ] per query block of one row: the earliest key slot any real query may see (its segment's start), the
    latest real query's slot, (with a window) the nearest real query's position, and the range of its segment ids."""
    t = jnp.arange(q.slot.shape[0])
    contiguous = jnp.concatenate([jnp.zeros(1, bool), q.slot[1:] == q.slot[:-1] + 1])
    starts = jnp.zeros_like(contiguous)
    if q.segment is not None:
        starts = contiguous & jnp.concatenate([jnp.zeros(1, bool), q.segment[1:] != q.segment[:-1]])
    run = jax.lax.cummax(jnp.where(starts | ~contiguous, t, 0))  # each token's last segment start or gap
    earliest = jnp.where(starts, q.slot, 0)[run]
    lo = jnp.where(q.valid, earliest, _BIG).reshape(nq, qb).min(axis=1)
    hi = jnp.where(q.valid, q.slot, -1).reshape(nq, qb).max(axis=1)
    at = q.slot if q.position is None else q.position
    near = None if window is None else jnp.where(q.valid, at, _BIG).reshape(nq, qb).min(axis=1)
    return lo, hi, near, *_segment_range(q, qb, nq)


def _segment_range(ids: Ids, b: int, n: int):
    """[N] the least and greatest segment id of each block's real tokens (None without segments)."""
    if ids.segment is None:
        return None, None
    return (jnp.where(ids.valid, ids.segment, _BIG).reshape(n, b).min(axis=1),
            jnp.where(ids.valid, ids.segment, -1).reshape(n, b).max(axis=1))  # fmt: skip


def key_blocks(k: Ids, kb: int, nk: int, window) -> tuple[Array, Array, Array]:
    """[NC] per key block of one row: its earliest and latest real key's slot, (with a window) the furthest real
    key's position, and the range of its segment ids."""
    lo = jnp.where(k.valid, k.slot, _BIG).reshape(nk, kb).min(axis=1)
    hi = jnp.where(k.valid, k.slot, -1).reshape(nk, kb).max(axis=1)
    at = k.slot if k.position is None else k.position
    far = None if window is None else jnp.where(k.valid, at, -1).reshape(nk, kb).max(axis=1)
    return lo, hi, far, *_segment_range(k, kb, nk)


def meets(query_blocks, key_blocks, window) -> Array:
    """[..., NQ, NC] which key blocks a query block may see, from the two blocks' summaries: slot ranges (causal,
    segment starts), positions (a window), and segment-id ranges (a key block none of whose ids a query block holds:
    the segment start bound fails where a chunk begins inside a segment)."""
    lo_q, hi_q, near_q, seg_lo_q, seg_hi_q = query_blocks
    lo_k, hi_k, far_k, seg_lo_k, seg_hi_k = key_blocks
    needs = (lo_k[..., None, :] <= hi_q[..., :, None]) & (hi_k[..., None, :] >= lo_q[..., :, None])
    if window is not None:
        needs &= far_k[..., None, :] > near_q[..., :, None] - window
    if seg_lo_q is not None and seg_lo_k is not None:
        needs &= (seg_lo_k[..., None, :] <= seg_hi_q[..., :, None]) & (seg_hi_k[..., None, :] >= seg_lo_q[..., :, None])
    return needs


def _needs(q: Ids, k: Ids, qb: int, kb: int, nq: int, nk: int, window=None) -> Array:
    """[NQ, NC]: which key blocks a query block may see, from slot ranges: a key block is needed when its earliest
    real key is not after the block's latest real query (causal) and its latest real key is not before the
    earliest key any of its queries may see (their segments' starts); with a window, when its furthest real key
    (in positions, as the mask counts them) is within the window of the block's nearest real query. Slots need not
    be contiguous (a ring's balanced chunks hold two pieces of the row): a segment's start is known where its id
    changes between adjacent slots; after a gap in the slots (or at the chunk's start) it is not, and 0 stands in
    for it."""
    if window is not None and (q.position is None) != (k.position is None):  # the mask counts slots then
        q, k = q._replace(position=None), k._replace(position=None)
    return meets(query_blocks(q, qb, nq, window), key_blocks(k, kb, nk, window), window)


def block_bounds(q: Ids, k: Ids, qb: int, kb: int, nq: int, nk: int, window=None) -> tuple[Array, Array]:
    """[NQ] first and last key block each query block reads (last < first: none); blocks between that ``_needs``
    rules out are read and masked (with contiguous slots there are none)."""
    needs = _needs(q, k, qb, kb, nq, nk, window)
    seen = needs.any(axis=1)
    lo = jnp.where(seen, jnp.argmax(needs, axis=1), 0)
    hi = jnp.where(seen, nk - 1 - jnp.argmax(needs[:, ::-1], axis=1), -1)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _scores(q_QxKxGxE, k_CxKxE, scale, softcap):
    """[K, G, Q, C] float32 scores, and tanh of the uncapped ones / softcap (for the backward) when capped."""
    s = jnp.einsum("qkge,cke->kgqc", q_QxKxGxE, k_CxKxE.astype(q_QxKxGxE.dtype), preferred_element_type=jnp.float32)
    s = s * scale
    if not softcap:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def row_forward(q_TxKxGxE, k_SxKxE, v_SxKxE, q: Ids, k: Ids, window, qb, kb, softcap):
    """One row: output [T, K, G, E] and log-sum-exp [T, K, G] (+inf for a query that sees nothing)."""
    t, kh, g, e = q_TxKxGxE.shape
    nq, nk = t // qb, k_SxKxE.shape[0] // kb
    scale = e**-0.5
    lo, hi = block_bounds(q, k, qb, kb, nq, nk, window)
    dtype = q_TxKxGxE.dtype

    def one_query_block(i):
        q_i, qi = _take(q_TxKxGxE, i * qb, qb), block_ids(q, i * qb, qb)

        def body(j, carry):
            m, denom, acc = carry
            kj, vj, kid = _take(k_SxKxE, j * kb, kb), _take(v_SxKxE, j * kb, kb), block_ids(k, j * kb, kb)
            s, _ = _scores(q_i, kj, scale, softcap)
            s = jnp.where(_block_mask(qi, kid, window)[None, None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - shift[..., None])
            corr = jnp.exp(m - shift)
            denom = denom * corr + p.sum(axis=-1)
            pv = jnp.einsum("kgqc,cke->kgqe", p.astype(dtype), vj.astype(dtype), preferred_element_type=jnp.float32)
            return m_new, denom, acc * corr[..., None] + pv

        init = (jnp.full((kh, g, qb), -jnp.inf), jnp.zeros((kh, g, qb)), jnp.zeros((kh, g, qb, e)))
        m, denom, acc = jax.lax.fori_loop(lo[i], hi[i] + 1, body, init)
        seen = denom > 0
        out = acc / jnp.where(seen, denom, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf)
        return out.transpose(2, 0, 1, 3).astype(dtype), lse.transpose(2, 0, 1)

    out, lse = jax.lax.map(one_query_block, jnp.arange(nq))
    return out.reshape(t, kh, g, e), lse.reshape(t, kh, g)


def row_backward(q_TxKxGxE, k_SxKxE, v_SxKxE, q: Ids, k: Ids, out, lse, dout, window, qb, kb, softcap):
    """One row's gradients, key block by key block (dk, dv of a block stay in the carry; dq accumulates)."""
    t, kh, g, e = q_TxKxGxE.shape
    s_len = k_SxKxE.shape[0]
    nq, nk = t // qb, s_len // kb
    scale = e**-0.5
    needs = _needs(q, k, qb, kb, nq, nk, window)  # [NQ, NC]
    any_q = needs.any(axis=0)
    first_q = jnp.where(any_q, jnp.argmax(needs, axis=0), 0)
    last_q = jnp.where(any_q, nq - 1 - jnp.argmax(needs[::-1], axis=0), -1)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [T, K, G]
    dtype = q_TxKxGxE.dtype

    def one_key_block(dq, j):
        kj, vj, kid = _take(k_SxKxE, j * kb, kb), _take(v_SxKxE, j * kb, kb), block_ids(k, j * kb, kb)

        def body(i, carry):
            dq, dk, dv = carry
            q_i, qi = _take(q_TxKxGxE, i * qb, qb), block_ids(q, i * qb, qb)
            do_i = _take(dout, i * qb, qb).astype(dtype)
            lse_i = _take(lse, i * qb, qb).transpose(1, 2, 0)  # [K, G, Q]
            d_i = _take(delta, i * qb, qb).transpose(1, 2, 0)
            s, tanh = _scores(q_i, kj, scale, softcap)
            p = jnp.where(_block_mask(qi, kid, window)[None, None], jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("kgqc,qkge->cke", p.astype(dtype), do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("qkge,cke->kgqc", do_i, vj.astype(dtype), preferred_element_type=jnp.float32)
            ds = p * (dp - d_i[..., None])
            if softcap:
                ds = ds * (1.0 - tanh * tanh)
            ds = (ds * scale).astype(dtype)
            dq_i = jnp.einsum("kgqc,cke->qkge", ds, kj.astype(dtype), preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _take(dq, i * qb, qb) + dq_i, i * qb, axis=0)
            dk = dk + jnp.einsum("kgqc,qkge->cke", ds, q_i, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((kb, kh, e), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(first_q[j], last_q[j] + 1, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros((t, kh, g, e), jnp.float32), jnp.arange(nk))
    return dq, dk.reshape(s_len, kh, e), dv.reshape(s_len, kh, e)


# The window is a primal argument (an int32 array, or None): Gemma 3's per-layer windows are traced values of the
# layer scan, which a custom VJP's non-differentiable arguments may not be. Its cotangent is float0.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blockwise(q, k, v, q_ids, k_ids, window, qb, kb, softcap):
    row = functools.partial(row_forward, window=window, qb=qb, kb=kb, softcap=softcap)
    return jax.vmap(row)(q, k, v, q_ids, k_ids)[0]


def _blockwise_fwd(q, k, v, q_ids, k_ids, window, qb, kb, softcap):
    out, lse = jax.vmap(functools.partial(row_forward, window=window, qb=qb, kb=kb, softcap=softcap))(
        q, k, v, q_ids, k_ids
    )
    return out, (q, k, v, q_ids, k_ids, window, out, lse)


def _blockwise_bwd(qb, kb, softcap, residuals, dout):
    q, k, v, q_ids, k_ids, window, out, lse = residuals
    row = functools.partial(row_backward, window=window, qb=qb, kb=kb, softcap=softcap)
    dq, dk, dv = jax.vmap(row)(q, k, v, q_ids, k_ids, out, lse, dout)
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (q_ids, k_ids, window))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window: int | None, *, block: int = 512,
                        softcap: float | None = None) -> Array:  # fmt: skip
    """Attention whose memory is O(T x block): queries in blocks of ``block``, keys in blocks of ``block``, an
    online softmax; rows padded up to whole blocks with invalid tokens. Equal to ``einsum_attention`` wherever a
    query sees at least one key (a padding query, which sees none, gives 0 here)."""
    t, s = q_BxTxKxGxE.shape[1], k_BxSxKxE.shape[1]
    qb, kb = min(block, ceil_to(t, 8)), min(block, ceil_to(s, 8))
    tp, sp = ceil_to(t, qb), ceil_to(s, kb)
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    window = None if window is None else jnp.asarray(window, jnp.int32)
    out = _blockwise(pad(q_BxTxKxGxE, tp), pad(k_BxSxKxE, sp), pad(v_BxSxKxE, sp), q.pad(tp), k.pad(sp),
                     window, qb, kb, softcap)  # fmt: skip
    return out[:, :t]


# --- Merging partial attentions -------------------------------------------------------------------------------


def merge(out_a, lse_a, out_b, lse_b):
    """Two partial attentions of the same queries over disjoint keys, as one (the online softmax across chunks).
    ``lse`` is -inf for a query that saw nothing yet; outputs are float32."""
    m = jnp.maximum(lse_a, lse_b)
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(lse_a - shift), jnp.exp(lse_b - shift)
    total = wa + wb
    out = (out_a * wa[..., None] + out_b * wb[..., None]) / jnp.where(total > 0, total, 1.0)[..., None]
    return out, jnp.where(total > 0, shift + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def ceil_to(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-n // m) * m
