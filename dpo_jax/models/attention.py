"""Attention over a mask built from token ids: the reference einsum, a blockwise (flash-style) implementation whose
memory is linear in the row, and the ring and all-gather strategies over a context axis (``dpo_jax.models.kernels``
chooses among them and the platforms' kernels).

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


def _block_ids(ids: Ids, start, size) -> Ids:
    return Ids(*(None if x is None else _take(x, start, size) for x in ids))


def _block_mask(q: Ids, k: Ids, window) -> Array:
    """[Q, C] of one row's blocks (the ids without their batch axis)."""
    add = lambda x: None if x is None else x[None]  # noqa: E731
    return allowed(Ids(*map(add, q)), Ids(*map(add, k)), window)[0]


_BIG = int(np.iinfo(np.int32).max)


def _query_blocks(q: Ids, qb: int, nq: int, window) -> tuple[Array, Array, Array]:
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


def _key_blocks(k: Ids, kb: int, nk: int, window) -> tuple[Array, Array, Array]:
    """[NC] per key block of one row: its earliest and latest real key's slot, (with a window) the furthest real
    key's position, and the range of its segment ids."""
    lo = jnp.where(k.valid, k.slot, _BIG).reshape(nk, kb).min(axis=1)
    hi = jnp.where(k.valid, k.slot, -1).reshape(nk, kb).max(axis=1)
    at = k.slot if k.position is None else k.position
    far = None if window is None else jnp.where(k.valid, at, -1).reshape(nk, kb).max(axis=1)
    return lo, hi, far, *_segment_range(k, kb, nk)


def _meets(query_blocks, key_blocks, window) -> Array:
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
    return _meets(_query_blocks(q, qb, nq, window), _key_blocks(k, kb, nk, window), window)


def _bounds(q: Ids, k: Ids, qb: int, kb: int, nq: int, nk: int, window=None) -> tuple[Array, Array]:
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


def _fwd_row(q_TxKxGxE, k_SxKxE, v_SxKxE, q: Ids, k: Ids, window, qb, kb, softcap):
    """One row: output [T, K, G, E] and log-sum-exp [T, K, G] (+inf for a query that sees nothing)."""
    t, kh, g, e = q_TxKxGxE.shape
    nq, nk = t // qb, k_SxKxE.shape[0] // kb
    scale = e**-0.5
    lo, hi = _bounds(q, k, qb, kb, nq, nk, window)
    dtype = q_TxKxGxE.dtype

    def one_query_block(i):
        q_i, qi = _take(q_TxKxGxE, i * qb, qb), _block_ids(q, i * qb, qb)

        def body(j, carry):
            m, denom, acc = carry
            kj, vj, kid = _take(k_SxKxE, j * kb, kb), _take(v_SxKxE, j * kb, kb), _block_ids(k, j * kb, kb)
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


def _bwd_row(q_TxKxGxE, k_SxKxE, v_SxKxE, q: Ids, k: Ids, out, lse, dout, window, qb, kb, softcap):
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
        kj, vj, kid = _take(k_SxKxE, j * kb, kb), _take(v_SxKxE, j * kb, kb), _block_ids(k, j * kb, kb)

        def body(i, carry):
            dq, dk, dv = carry
            q_i, qi = _take(q_TxKxGxE, i * qb, qb), _block_ids(q, i * qb, qb)
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
    return jax.vmap(functools.partial(_fwd_row, window=window, qb=qb, kb=kb, softcap=softcap))(q, k, v, q_ids, k_ids)[0]


def _blockwise_fwd(q, k, v, q_ids, k_ids, window, qb, kb, softcap):
    out, lse = jax.vmap(functools.partial(_fwd_row, window=window, qb=qb, kb=kb, softcap=softcap))(
        q, k, v, q_ids, k_ids
    )
    return out, (q, k, v, q_ids, k_ids, window, out, lse)


def _blockwise_bwd(qb, kb, softcap, residuals, dout):
    q, k, v, q_ids, k_ids, window, out, lse = residuals
    row = functools.partial(_bwd_row, window=window, qb=qb, kb=kb, softcap=softcap)
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


# --- Ring attention (context parallelism) -----------------------------------------------------------------------


def merge(out_a, lse_a, out_b, lse_b):
    """Two partial attentions of the same queries over disjoint keys, as one (the online softmax across chunks).
    ``lse`` is -inf for a query that saw nothing yet; outputs are float32."""
    m = jnp.maximum(lse_a, lse_b)
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(lse_a - shift), jnp.exp(lse_b - shift)
    total = wa + wb
    out = (out_a * wa[..., None] + out_b * wb[..., None]) / jnp.where(total > 0, total, 1.0)[..., None]
    return out, jnp.where(total > 0, shift + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def _shift(axis: str, n: int, by: int):
    """Every device sends what it holds ``by`` places along the ring (negative: the other way)."""
    perm = [(i, (i + by) % n) for i in range(n)]
    return lambda tree: jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)


def _rounds(q_ids: Ids, k_ids: Ids, window, axis: str, n: int, blk: int) -> Array:
    """How many rounds of the two-way ring bring every chunk a query of any device may see: the furthest such chunk,
    counted the shorter way round (at most n // 2), the most over the devices (one count for all: ``pmax``). From
    the blocks' slot (and, with a window, position) ranges: every device's key blocks are gathered (a few int32 per
    block)."""
    b, t = q_ids.slot.shape
    nb = t // blk
    queries = jax.vmap(lambda q: _query_blocks(q, blk, nb, window))(q_ids)  # [B, NB] each
    keys = jax.vmap(lambda k: _key_blocks(k, blk, nb, window))(k_ids)
    every = jax.tree.map(lambda x: jax.lax.all_gather(x, axis), keys)  # [n, B, NB] each
    sees = jax.vmap(lambda kb: _meets(queries, kb, window).any())(every)  # [n]: a chunk some query here may see
    d = jax.lax.axis_index(axis)
    c = jnp.arange(n)
    away = jnp.minimum((d - c) % n, (c - d) % n)
    return jax.lax.pmax(jnp.max(jnp.where(sees, away, 0)), axis)


def _ring_fwd_local(q, k, v, q_ids, k_ids, window, axis, n, qb, kb, softcap):
    """This device's queries against every chunk they may see, passed round the ring both ways (round r brings the
    chunks of devices i - r and i + r; at r = n / 2 they are one), for as many rounds as ``_rounds`` says: output
    [B, T, K, G, E] and log-sum-exp [B, T, K, G] (+inf: a query that sees nothing, as ``_fwd_row``)."""
    row = jax.vmap(functools.partial(_fwd_row, window=window, qb=qb, kb=kb, softcap=softcap))
    ahead, back = _shift(axis, n, 1), _shift(axis, n, -1)

    def add(out, lse, chunk):
        k_c, v_c, ids_c = chunk
        o, l_ = row(q, k_c, v_c, q_ids, ids_c)
        return merge(out, lse, o.astype(jnp.float32), jnp.where(jnp.isposinf(l_), -jnp.inf, l_))

    def both_ways(_, carry):
        out, lse, ahead_chunk, back_chunk = carry
        ahead_chunk, back_chunk = ahead(ahead_chunk), back(back_chunk)
        out, lse = add(*add(out, lse, ahead_chunk), back_chunk)
        return out, lse, ahead_chunk, back_chunk

    own = (k, v, k_ids)
    out, lse = add(jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf), own)
    rounds = _rounds(q_ids, k_ids, window, axis, n, kb)
    two_way = jnp.minimum(rounds, (n - 1) // 2)  # rounds that bring two chunks
    out, lse, ahead_chunk, _ = jax.lax.fori_loop(0, two_way, both_ways, (out, lse, own, own))
    if n % 2 == 0:  # the round that brings the opposite device's chunk, alone
        out, lse = jax.lax.cond(rounds == n // 2, lambda o, l_: add(o, l_, ahead(ahead_chunk)), lambda o, l_: (o, l_),
                                out, lse)  # fmt: skip
    return out.astype(q.dtype), jnp.where(jnp.isneginf(lse), jnp.inf, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _ring(q, k, v, q_ids, k_ids, window, axis, n, qb, kb, softcap):
    return _ring_fwd_local(q, k, v, q_ids, k_ids, window, axis, n, qb, kb, softcap)[0]


def _ring_fwd(q, k, v, q_ids, k_ids, window, axis, n, qb, kb, softcap):
    out, lse = _ring_fwd_local(q, k, v, q_ids, k_ids, window, axis, n, qb, kb, softcap)
    return out, (q, k, v, q_ids, k_ids, window, out, lse)


def _ring_bwd(axis, n, qb, kb, softcap, residuals, dout):
    """The chunks go round again, the same rounds both ways, each with its key/value gradients accumulating beside
    it; each chunk's block probabilities are recomputed from the whole row's log-sum-exp (nothing of the forward's
    blocks is kept). Then the gradients go home in one shift each way (as far as their chunks went)."""
    q, k, v, q_ids, k_ids, window, out, lse = residuals
    row = jax.vmap(functools.partial(_bwd_row, window=window, qb=qb, kb=kb, softcap=softcap))
    ahead, back = _shift(axis, n, 1), _shift(axis, n, -1)

    def add(dq, chunk, grads):
        k_c, v_c, ids_c = chunk
        dq_c, dk_c, dv_c = row(q, k_c, v_c, q_ids, ids_c, out, lse, dout)
        return dq + dq_c, (grads[0] + dk_c, grads[1] + dv_c)

    def both_ways(_, carry):
        dq, ahead_chunk, ahead_grads, back_chunk, back_grads = carry
        ahead_chunk, ahead_grads = ahead((ahead_chunk, ahead_grads))
        back_chunk, back_grads = back((back_chunk, back_grads))
        dq, ahead_grads = add(dq, ahead_chunk, ahead_grads)
        dq, back_grads = add(dq, back_chunk, back_grads)
        return dq, ahead_chunk, ahead_grads, back_chunk, back_grads

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    own = (k, v, k_ids)
    dq, (dk, dv) = add(zeros(q), own, (zeros(k), zeros(v)))
    rounds = _rounds(q_ids, k_ids, window, axis, n, kb)
    two_way = jnp.minimum(rounds, (n - 1) // 2)
    nothing = (zeros(k), zeros(v))
    dq, ahead_chunk, ahead_grads, _, back_grads = jax.lax.fori_loop(0, two_way, both_ways,
                                                                    (dq, own, nothing, own, nothing))  # fmt: skip
    if n % 2 == 0:  # the opposite device's chunk, alone

        def last(dq, grads):
            chunk, grads = ahead((ahead_chunk, grads))
            return add(dq, chunk, grads)

        dq, ahead_grads = jax.lax.cond(rounds == n // 2, last, lambda d, g: (d, g), dq, ahead_grads)
    # home: the gradients that went ahead are ``rounds`` devices on, those that went back ``two_way`` devices back
    home = lambda by, most: [lambda g: g] + [_shift(axis, n, by * s) for s in range(1, most + 1)]  # noqa: E731
    ahead_grads = jax.lax.switch(rounds, home(-1, n // 2), ahead_grads)
    if (n - 1) // 2:
        back_grads = jax.lax.switch(two_way, home(1, (n - 1) // 2), back_grads)
    dk, dv = dk + ahead_grads[0] + back_grads[0], dv + ahead_grads[1] + back_grads[1]
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (q_ids, k_ids, window))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window: int | None, *, mesh,
                   axis: str = "context", block: int = 512, softcap: float | None = None) -> Array:  # fmt: skip
    """Self-attention of rows split over the mesh axis ``axis`` (context parallelism): each device holds a
    contiguous 1/n of every row's tokens (queries, keys, values and their ids); the key/value chunks pass round the
    ring (``ppermute``) while each device runs the blockwise kernel of its queries against the chunk it holds,
    merged by log-sum-exp; the backward passes them round again with their gradients. The mask is each block's,
    from the ids (packed segments, shared-prompt branches, windows): a chunk no query of a device can see costs
    its transfer only. Equal to ``einsum_attention`` wherever a query sees a key; the output is split as the input."""
    n = mesh.shape[axis]
    blk = ring_layout(q_BxTxKxGxE.shape[1], n, block)[0]

    def local(q_, k_, v_, qi, ki, w):
        return _ring(q_, k_, v_, qi, ki, w, axis, n, blk, blk, softcap)

    return _split_rows(local, mesh, axis, block, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window)


def _split_rows(local, mesh, axis: str, block: int, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window):
    """``local(q, k, v, q_ids, k_ids, window)`` on each device's share of the rows (padded to ``ring_layout``'s
    length), under ``shard_map`` over ``axis``; the output split as the input. The window passes as a traced int32
    (Gemma 3's per-layer ones are) and reaches ``local`` as None when there is none."""
    t = q_BxTxKxGxE.shape[1]
    tp = ring_layout(t, mesh.shape[axis], block)[1]
    pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    rows = jax.sharding.PartitionSpec(None, axis)
    has_window = window is not None
    window = jnp.asarray(-1 if window is None else window, jnp.int32)

    def run(q_, k_, v_, qi, ki, w):
        return local(q_, k_, v_, qi, ki, w if has_window else None)

    out = jax.shard_map(run, mesh=mesh, in_specs=(rows, rows, rows, rows, rows, jax.sharding.PartitionSpec()),
                        out_specs=rows, axis_names=frozenset({axis}), check_vma=False)(
        pad(q_BxTxKxGxE), pad(k_BxSxKxE), pad(v_BxSxKxE), q.pad(tp), k.pad(tp), window)  # fmt: skip
    return out[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_rows(x, axis):
    return jax.lax.all_gather(x, axis, axis=1, tiled=True)


def _gather_rows_fwd(x, axis):
    return _gather_rows(x, axis), None


def _gather_rows_bwd(axis, _, g):
    """The gradients summed over the axis in float32 (XLA:CPU fails to compile a bfloat16 reduce-scatter whose sum
    carries sharding annotations: its promotion pass expects a bare add)."""
    return (jax.lax.psum_scatter(g.astype(jnp.float32), axis, scatter_dimension=1, tiled=True).astype(g.dtype),)


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def gather_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window: int | None, *, mesh,
                     axis: str = "context", block: int = 512, softcap: float | None = None,
                     kernel=None) -> Array:  # fmt: skip
    """Self-attention of rows split over ``axis`` by gathering the keys (the all-gather strategy): every device
    gathers the whole row's keys, values and their ids (one ``all_gather`` each), sorts them by slot (the balanced
    order's pieces back in the row's order) and runs the blockwise kernel of its queries against them; the
    backward reduce-scatters their gradients (the gather's transpose). One collective instead of n - 1 ring steps,
    and each device's work is its queries' (even in the balanced order), for the row's keys and values held on
    every device during a layer (small with few KV heads). Equal to ``ring_attention``. The gradients are summed in
    float32 (twice a bfloat16 reduce-scatter's bytes). ``kernel(q, k, v, q_ids, k_ids, window)``: the per-device
    attention (by default the blockwise kernel; any whose keys may be the whole row in slot order)."""

    def local(q_, k_, v_, qi, ki, w):
        k_all, v_all = _gather_rows(k_, axis), _gather_rows(v_, axis)
        ki_all = jax.tree.map(lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True), ki)
        order = jnp.argsort(ki_all.slot, axis=1)  # [B, S]
        take = lambda x: x[jnp.arange(x.shape[0])[:, None], order]  # noqa: E731
        k_all, v_all, ki_all = jax.tree.map(take, (k_all, v_all, ki_all))
        if kernel is not None:
            return kernel(q_, k_all, v_all, qi, ki_all, w)
        return blockwise_attention(q_, k_all, v_all, qi, ki_all, w, block=block, softcap=softcap)

    return _split_rows(local, mesh, axis, block, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window)


CONTEXT_STRATEGIES = {"ring": ring_attention, "gather": gather_attention}


def ceil_to(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-n // m) * m


# --- Load balance over the ring ----------------------------------------------------------------------------------
# Causal rows split in n contiguous chunks leave the ring unbalanced: the last device's queries see every chunk,
# the first's only its own, and each ring step lasts as long as its busiest device. The decoder instead runs the
# row in balanced order (the zig-zag of ring/striped attention): the row is cut in 2n pieces and device i holds
# pieces i and 2n-1-i, one early and one late, so at every ring step each device computes the same number of
# blocks. The mask needs nothing new: it is made of the tokens' slots, which travel with them.


def ring_layout(t: int, n: int, block: int) -> tuple[int, int]:
    """(block, padded row length) of a ring over ``n`` devices for rows of ``t`` tokens: each device holds two
    pieces of ``h`` tokens, ``h`` a whole number of blocks (so the balanced order's pieces are whole blocks)."""
    half = -(-t // (2 * n))
    blk = min(block, ceil_to(half, 8))
    return blk, 2 * n * ceil_to(half, blk)


def balanced_order(t: int, n: int) -> np.ndarray:
    """[t] the slots of a row of ``t`` tokens (a multiple of 2n) in balanced order: device i's chunk is pieces i
    and 2n-1-i of the row."""
    pieces = np.arange(t, dtype=np.int32).reshape(2 * n, t // (2 * n))
    return np.concatenate([pieces[[i, 2 * n - 1 - i]].ravel() for i in range(n)])


def ring_blocks(ids: Ids, n: int, block: int) -> np.ndarray:
    """[n devices, n // 2 + 1 rounds] the (query block, key block) pairs each device computes in each round of the
    two-way ring's forward (round 0: its own chunk; round r: the chunks of devices i - r and i + r, one chunk when
    they are the same), for one row's ids (no batch axis; slots in the order the devices hold them,
    ``ring_layout``'s length). A round lasts as long as its busiest device: the load balance is the row's maxima
    against its means."""
    blk, tp = ring_layout(ids.slot.shape[0], n, block)
    if tp != ids.slot.shape[0]:
        raise ValueError(f"ring_blocks: a row of {ids.slot.shape[0]} tokens; the ring over {n} holds {tp}")
    chunk = lambda d: _block_ids(ids, d * (tp // n), tp // n)  # noqa: E731
    per = tp // n // blk

    def work(d, c):
        lo, hi = _bounds(chunk(d), chunk(c % n), blk, blk, per, per)
        return int(jnp.sum(jnp.maximum(hi - lo + 1, 0)))

    out = np.zeros((n, n // 2 + 1), np.int64)
    for d in range(n):
        out[d, 0] = work(d, d)
        for r in range(1, n // 2 + 1):
            out[d, r] = work(d, d - r) + (work(d, d + r) if 2 * r != n else 0)
    return out


def _exchange(x, axis: str, n: int, dim: int, inverse: bool):
    """One device's chunk along ``dim``, contiguous <-> balanced: two ``ppermute``s of half a chunk each."""
    lo, hi = jnp.split(x, 2, axis=dim)
    home = lambda c: min(c, 2 * n - 1 - c)  # noqa: E731  the balanced device of piece c (contiguous: c // 2)
    even = jax.lax.axis_index(axis) % 2 == 0  # balanced device i: pieces i and 2n-1-i, the even one first if i is
    if inverse:  # back home: the even piece is the first half of contiguous device piece // 2
        a = jax.lax.ppermute(jnp.where(even, lo, hi), axis, [(home(2 * d), d) for d in range(n)])
        b = jax.lax.ppermute(jnp.where(even, hi, lo), axis, [(home(2 * d + 1), d) for d in range(n)])
        return jnp.concatenate([a, b], axis=dim)
    a = jax.lax.ppermute(lo, axis, [(d, home(2 * d)) for d in range(n)])  # piece 2d
    b = jax.lax.ppermute(hi, axis, [(d, home(2 * d + 1)) for d in range(n)])  # piece 2d + 1
    return jnp.concatenate([jnp.where(even, a, b), jnp.where(even, b, a)], axis=dim)


def rebalance(x, mesh, *, inverse: bool = False, dim: int = 1, axis: str = "context"):
    """``x`` (its ``dim`` a row's tokens, split over ``axis``, a multiple of 2n long) from contiguous chunks to the
    balanced order (``balanced_order``), or back (``inverse``); typed PRNG keys too."""
    n = mesh.shape[axis]
    is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(x) if is_key else None
    data = jax.random.key_data(x) if is_key else x
    spec = jax.sharding.PartitionSpec(*([None] * dim), axis)
    out = jax.shard_map(functools.partial(_exchange, axis=axis, n=n, dim=dim, inverse=inverse), mesh=mesh,
                        in_specs=spec, out_specs=spec, axis_names=frozenset({axis}), check_vma=False)(data)  # fmt: skip
    return jax.random.wrap_key_data(out, impl=impl) if is_key else out


def context_mesh():
    """The mesh set around the program (``jax.set_mesh``) when it has a ``context`` axis of more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or dict(mesh.shape).get("context", 1) == 1 else mesh
