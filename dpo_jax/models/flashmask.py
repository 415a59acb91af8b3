"""FlashMask attention: dpo_jax's own fused kernel in Pallas — Triton on a GPU, interpret mode elsewhere — for every
row layout the model makes (padded, packed, packed with the prompt shared; GQA, sliding windows, soft-capping), with
no [T, S] mask.

**The mask as one interval a key** (the column-wise form of FlashMask, Wang et al. 2024). In a row laid out as the
model lays it — each segment one run of slots; in a shared row its prompt, then each completion as a run — the
queries that may see key ``k`` are one range of slots ``[k, end_k)``: a prompt's (or unshared sequence's) key to its
segment's end, a completion's key to its completion's end, padding to none (``key_ends``). The kernel reads one int32
a key; a sliding window adds each token's position (compared per element: a shared row's rejected tokens restart
their positions at the prompt's end).

**Blocks** (``block_tables``): for each query block, the key blocks some query of it may see (causal, the ends, the
window), listed; for each key block, the query blocks. The kernels loop over those lists only, so a rejected
completion's queries skip the chosen completion's blocks between them and their prompt.

The kernels compare each key's slot and each query's, so queries and keys may be any tokens of a row in any order:
a device's share under the context axis against the gathered row (``flashmask_attention``), or against one chunk
the ring brings (``chunk_forward`` / ``chunk_backward``: partial softmaxes, the ends computed from the whole row
with ``row_ends``).

Forward: FlashAttention-2's online softmax per query block, keeping each query's log-sum-exp. Backward: a dq kernel
per query block and a dk/dv kernel per key block (the query heads of its KV head summed inside), both recomputing
the probabilities from the log-sum-exp. Head widths are padded to a power of two (zeros change no score); blocks are
``block`` tokens capped by the head width (``block_size``) and rounded down to a power of two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dpo_jax.models.attention import Ids, ceil_to

Array = jax.Array
NEG = -0.7 * float(np.finfo(np.float32).max)  # a masked score: finite, so a query that sees nothing stays finite


def block_size(block: int, width: int = 64) -> int:
    """The kernels' block for heads ``width`` wide: ``block`` capped (at 128 tokens for heads up to 64 wide, 64
    beyond: a block's keys, values and gradient sums must fit a GPU's registers and shared memory) and rounded down
    to a power of two, at least 16 (Triton's smallest dot)."""
    cap = 128 if width <= 64 else 64
    return max(16, 1 << (min(block, cap).bit_length() - 1))


def key_ends(ids: Ids) -> Array:
    """[B, T] int32: each key's end — the first slot past the queries that may see it — for self-attention of whole
    rows in slot order (queries ``k .. end - 1`` see key ``k``; padding's end is its own slot: nobody sees it)."""
    b, t = ids.valid.shape
    idx = jnp.arange(t, dtype=jnp.int32)
    segment = jnp.where(ids.valid, 1 if ids.segment is None else ids.segment, 0)

    def run_end(change_after):  # [B, T] bool: the next token starts a new run -> each token's run's end
        return lax.cummin(jnp.where(change_after, idx + 1, t), axis=1, reverse=True)

    last = jnp.ones((b, 1), bool)
    new_segment = jnp.concatenate([segment[:, 1:] != segment[:, :-1], last], axis=1)
    end = run_end(new_segment)
    if ids.branch is not None:
        new_branch = new_segment | jnp.concatenate([ids.branch[:, 1:] != ids.branch[:, :-1], last], axis=1)
        end = jnp.where(ids.branch > 0, run_end(new_branch), end)
    return jnp.where(ids.valid, end, idx).astype(jnp.int32)


def block_tables(ends: Array, k_slot: Array, k_pos: Array, k_valid: Array, q_slot: Array, q_pos: Array,
                 q_valid: Array, window, block: int) -> tuple[Array, Array]:  # fmt: skip
    """One row's lists: [NQ, 1 + NC] the key blocks each query block needs and [NC, 1 + NQ] the query blocks each key
    block serves, each list's count first, then the block indices in order (the rest unused). Keys and queries
    carry their slots (any order: a block's range counts), keys their ends (from the whole row: ``row_ends``)."""
    nq, nk = q_slot.shape[0] // block, ends.shape[0] // block
    big = np.iinfo(np.int32).max
    earliest = jnp.where(k_valid, k_slot, big).reshape(nk, block).min(axis=1)  # [NC]
    reach = jnp.where(k_valid, ends, -1).reshape(nk, block).max(axis=1)  # [NC] one past the last query served
    lo = jnp.where(q_valid, q_slot, big).reshape(nq, block).min(axis=1)
    hi = jnp.where(q_valid, q_slot, -1).reshape(nq, block).max(axis=1)
    needs = (earliest[None, :] <= hi[:, None]) & (reach[None, :] > lo[:, None])  # [NQ, NC]
    if window is not None:
        nearest = jnp.where(q_valid, q_pos, big).reshape(nq, block).min(axis=1)
        furthest = jnp.where(k_valid, k_pos, -1).reshape(nk, block).max(axis=1)
        needs &= nearest[:, None] - furthest[None, :] < window

    def listed(m):  # [N, M] bool -> [N, 1 + M]: count, then the true columns first, in order
        order = jnp.argsort(~m, axis=1, stable=True).astype(jnp.int32)
        return jnp.concatenate([m.sum(axis=1, keepdims=True, dtype=jnp.int32), order], axis=1)

    return listed(needs), listed(needs.T)


def _scores(q, k, scale, softcap):
    """[Q, C] float32 scores of two blocks (soft-capped when asked) and the cap's derivative factor (or None)."""
    s = plgpu.dot(q, k, trans_b=True) * scale
    if not softcap:
        return s, None
    capped = softcap * jnp.tanh(s / softcap)
    return capped, 1.0 - (capped / softcap) ** 2


def _mask(q_slot, k_slot, ends, q_pos, k_pos, window):
    """[Q, C] who sees whom: a query sees a key from the key's slot up to its end (and within the window)."""
    ok = (k_slot[None, :] <= q_slot[:, None]) & (q_slot[:, None] < ends[None, :])
    if window is not None:
        ok &= q_pos[:, None] - k_pos[None, :] < window
    return ok


def _forward_kernel(table_ref, ends_ref, k_slot_ref, k_pos_ref, q_slot_ref, q_pos_ref, window_ref, q_ref, k_ref,
                    v_ref, o_ref, lse_ref, *, block, scale, softcap):  # fmt: skip
    qs = pl.ds(pl.program_id(2) * block, block)
    q, q_slot, q_pos = q_ref[...], q_slot_ref[qs], q_pos_ref[qs]
    window = None if window_ref is None else window_ref[0]

    def body(j, carry):
        acc, m, l_ = carry
        k0 = table_ref[j + 1] * block
        ks = pl.ds(k0, block)
        s, _ = _scores(q, k_ref[ks, :], scale, softcap)
        ok = _mask(q_slot, k_slot_ref[ks], ends_ref[ks], q_pos, k_pos_ref[ks], window)
        m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, NEG), axis=1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v_ref.dtype), v_ref[ks, :])
        return acc, m_new, alpha * l_ + jnp.sum(p, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block,), NEG, jnp.float32), jnp.zeros((block,), jnp.float32))
    acc, m, l_ = lax.fori_loop(0, table_ref[0], body, init)
    seen = l_ > 0
    o_ref[...] = (acc / jnp.where(seen, l_, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l_, 1.0)), jnp.inf)  # +inf: nothing seen


def _dq_kernel(table_ref, ends_ref, k_slot_ref, k_pos_ref, q_slot_ref, q_pos_ref, window_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, block, scale, softcap):  # fmt: skip
    qs = pl.ds(pl.program_id(2) * block, block)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_slot, q_pos = q_slot_ref[qs], q_pos_ref[qs]
    window = None if window_ref is None else window_ref[0]

    def body(j, dq):
        k0 = table_ref[j + 1] * block
        ks = pl.ds(k0, block)
        k = k_ref[ks, :]
        s, cap = _scores(q, k, scale, softcap)
        ok = _mask(q_slot, k_slot_ref[ks], ends_ref[ks], q_pos, k_pos_ref[ks], window)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (plgpu.dot(do, v_ref[ks, :], trans_b=True) - delta[:, None])
        if cap is not None:
            ds *= cap
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, table_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, ends_ref, k_slot_ref, k_pos_ref, q_slot_ref, q_pos_ref, window_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block, scale, softcap, groups):  # fmt: skip
    k0 = pl.program_id(2) * block
    ks = pl.ds(k0, block)
    k, v, ends, k_slot, k_pos = k_ref[...], v_ref[...], ends_ref[ks], k_slot_ref[ks], k_pos_ref[ks]
    window = None if window_ref is None else window_ref[0]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):  # the query heads that read this KV head

        def body(j, carry, g=g):
            dk, dv = carry
            qs = pl.ds(table_ref[j + 1] * block, block)
            q, do = q_ref[qs, g, :], do_ref[qs, g, :]
            s, cap = _scores(q, k, scale, softcap)
            ok = _mask(q_slot_ref[qs], k_slot, ends, q_pos_ref[qs], k_pos, window)
            p = jnp.where(ok, jnp.exp(s - lse_ref[g, qs][:, None]), 0.0)
            dv += plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[g, qs][:, None])
            if cap is not None:
                ds *= cap
            return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

        dk, dv = lax.fori_loop(0, table_ref[0], body, (dk, dv))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


class Layout(NamedTuple):
    """The mask of one call, padded to whole blocks: keys' ends, slots and positions [B, S]; queries' slots and
    positions [B, T]; the block lists (``block_tables``); the window ([1] int32, or None)."""

    ends: Array
    k_slot: Array
    k_pos: Array
    q_slot: Array
    q_pos: Array
    fwd_table: Array
    bwd_table: Array
    window: Array | None


def row_ends(ids: Ids) -> Array:
    """[B, T] ``key_ends`` of whole rows whose slots (0 .. T - 1) are in any order (the balanced order of the
    context axis), in that order."""
    order = jnp.argsort(ids.slot, axis=1)
    take = lambda x: None if x is None else jnp.take_along_axis(x, order, axis=1)  # noqa: E731
    ends = key_ends(Ids(*map(take, ids)))
    return jnp.take_along_axis(ends, jnp.argsort(order, axis=1), axis=1)


def make_layout(q: Ids, k: Ids, ends: Array, window, block: int, t: int, s: int) -> Layout:
    """The ``Layout`` of queries ``q`` against keys ``k`` (with their ``ends``), padded to ``t`` and ``s`` tokens."""
    q, k = q.pad(t), k.pad(s)
    ends = jnp.pad(ends, [(0, 0), (0, s - ends.shape[1])], constant_values=-1)  # padding: nobody sees it
    where = lambda ids: (ids.slot if ids.position is None else ids.position).astype(jnp.int32)  # noqa: E731
    k_slot, k_pos, q_slot, q_pos = k.slot.astype(jnp.int32), where(k), q.slot.astype(jnp.int32), where(q)
    tables = functools.partial(block_tables, window=window, block=block)
    fwd_table, bwd_table = jax.vmap(tables)(ends, k_slot, k_pos, k.valid, q_slot, q_pos, q.valid)
    win = None if window is None else jnp.asarray(window, jnp.int32).reshape(1)
    return Layout(ends, k_slot, k_pos, q_slot, q_pos, fwd_table, bwd_table, win)


@functools.lru_cache(maxsize=64)
def _kernels(b: int, t: int, s: int, kh: int, g: int, e: int, block: int, softcap: float | None, windowed: bool,
           interpret: bool, scale: float):  # fmt: skip
    """The kernels of [B, T, H, E] queries and [B, S, K, E] keys and values (head widths padded, rows whole blocks)
    given a ``Layout`` (``_Kernels``); the backward is given the whole softmax's output and log-sum-exp, which may
    span keys of other calls (the ring's chunks)."""
    h, nq, nk = kh * g, t // block, s // block
    params = plgpu.CompilerParams(num_warps=4 if e <= 64 else 8, num_stages=2)
    call = functools.partial(pl.pallas_call, compiler_params=params, interpret=interpret)
    keys = pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))
    queries = pl.BlockSpec((None, t), lambda b_, h_, i: (b_, 0))
    win = pl.BlockSpec((1,), lambda b_, h_, i: (0,)) if windowed else None
    q_block = pl.BlockSpec((None, block, None, e), lambda b_, h_, i: (b_, i, h_, 0))
    kv_rows = pl.BlockSpec((None, s, None, e), lambda b_, h_, i: (b_, 0, h_ // g, 0))
    per_q = pl.BlockSpec((None, None, block), lambda b_, h_, i: (b_, h_, i))
    fwd_list = pl.BlockSpec((None, None, nk + 1), lambda b_, h_, i: (b_, i, 0))
    mask_specs = [keys, keys, keys, queries, queries, win]
    kw = dict(block=block, scale=scale, softcap=softcap)
    f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # noqa: E731

    def forward(q, k, v, lay: Layout):
        arrays = (lay.ends, lay.k_slot, lay.k_pos, lay.q_slot, lay.q_pos, lay.window)
        return call(
            functools.partial(_forward_kernel, **kw), name="flashmask_forward", grid=(b, h, nq),
            in_specs=[fwd_list, *mask_specs, q_block, kv_rows, kv_rows], out_specs=[q_block, per_q],
            out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        )(lay.fwd_table, *arrays, q, k, v)  # fmt: skip

    def backward(q, k, v, lay: Layout, o, lse, do):
        arrays = (lay.ends, lay.k_slot, lay.k_pos, lay.q_slot, lay.q_pos, lay.window)
        delta = jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32), do.astype(jnp.float32))
        dq = call(
            functools.partial(_dq_kernel, **kw), name="flashmask_dq", grid=(b, h, nq),
            in_specs=[fwd_list, *mask_specs, q_block, kv_rows, kv_rows, q_block, per_q, per_q], out_specs=q_block,
            out_shape=f32(q),
        )(lay.fwd_table, *arrays, q, k, v, do, lse, delta)  # fmt: skip
        q_rows = pl.BlockSpec((None, t, g, e), lambda b_, h_, i: (b_, 0, h_, 0))  # every query head of KV head h_
        per_kv = pl.BlockSpec((None, g, t), lambda b_, h_, i: (b_, h_, 0))
        kv_block = pl.BlockSpec((None, block, None, e), lambda b_, h_, i: (b_, i, h_, 0))
        bwd_list = pl.BlockSpec((None, None, nq + 1), lambda b_, h_, i: (b_, i, 0))
        dk, dv = call(
            functools.partial(_dkv_kernel, **kw, groups=g), name="flashmask_dkv", grid=(b, kh, nk),
            in_specs=[bwd_list, *mask_specs, q_rows, kv_block, kv_block, q_rows, per_kv, per_kv],
            out_specs=[kv_block, kv_block], out_shape=[f32(k), f32(v)],
        )(lay.bwd_table, *arrays, q, k, v, do, lse, delta)  # fmt: skip
        return dq, dk, dv

    @jax.custom_vjp
    def attend(q, k, v, lay):
        return forward(q, k, v, lay)[0]

    def attend_fwd(q, k, v, lay):
        o, lse = forward(q, k, v, lay)
        return o, (q, k, v, lay, o, lse)

    def attend_bwd(res, do):
        q, k, v, lay, o, lse = res
        dq, dk, dv = backward(q, k, v, lay, o, lse, do)
        no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), lay)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad

    attend.defvjp(attend_fwd, attend_bwd)
    return _Kernels(forward, backward, attend)


class _Kernels(NamedTuple):
    forward: Callable  # (q, k, v, layout) -> (output, log-sum-exp [B, H, T])
    backward: Callable  # (q, k, v, layout, output, log-sum-exp, output gradient) -> float32 dq, dk, dv
    attend: Callable  # (q, k, v, layout) -> output, differentiable (a custom VJP of the two)


class _Call(NamedTuple):
    q: Array  # [B, T', H, E'] padded
    k: Array  # [B, S', K, E']
    v: Array
    layout: Layout
    kernels: _Kernels
    unpad: Callable  # [B, T', H, E'] -> [B, T, K, G, E]


def _prepare(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, ends, window, block, softcap, interpret) -> _Call:
    """A call's inputs padded to whole blocks and power-of-two head widths, its layout and its kernels."""
    b, t, kh, g, e = q_BxTxKxGxE.shape
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    blk = block_size(block, e)
    tp, sp, ep = ceil_to(t, blk), ceil_to(k_BxSxKxE.shape[1], blk), max(16, pl.next_power_of_2(e))
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 3) + [(0, ep - e)])  # noqa: E731
    kernels = _kernels(b, tp, sp, kh, g, ep, blk, softcap, window is not None, interpret, e**-0.5)
    unpad = lambda x: x[:, :t, :, :e].reshape(b, t, kh, g, e)  # noqa: E731
    return _Call(pad(q_BxTxKxGxE.reshape(b, t, kh * g, e), tp), pad(k_BxSxKxE, sp), pad(v_BxSxKxE, sp),
                 make_layout(q, k, ends, window, blk, tp, sp), kernels, unpad)  # fmt: skip


def flashmask_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, window=None, *, k: Ids | None = None,
                        block: int = 128, softcap: float | None = None,
                        interpret: bool | None = None) -> Array:  # fmt: skip
    """[B, T, K, G, E] attention by the FlashMask kernels of queries (ids ``q``) against keys that are whole rows
    (ids ``k``, slots in any order; by default the queries': self-attention). The queries may be any of the row's
    tokens, in any order (a device's share under the context axis). ``window`` (int or traced) counts positions
    where the ids have them. ``interpret``: default everywhere but on a GPU (slow: for tests and checks). Equal to
    ``einsum_attention`` wherever a query sees a key; a query that sees none gets zeros."""
    k = q if k is None else k
    c = _prepare(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, row_ends(k), window, block, softcap, interpret)
    return c.unpad(c.kernels.attend(c.q, c.k, c.v, c.layout))


def chunk_forward(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, ends, window, *, block: int = 128,
                  softcap: float | None = None, interpret: bool | None = None) -> tuple[Array, Array]:  # fmt: skip
    """Queries against one chunk of a row's keys (any slots; ``ends`` [B, S] from the whole row, ``row_ends``): the
    chunk's output [B, T, K, G, E] and log-sum-exp [B, T, K, G] (+inf: the query sees nothing in it), to be merged
    with the other chunks' (``attention.merge``) — the ring's per-device call."""
    c = _prepare(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, ends, window, block, softcap, interpret)
    o, lse = c.kernels.forward(c.q, c.k, c.v, c.layout)
    b, t, kh, g, _ = q_BxTxKxGxE.shape
    return c.unpad(o), lse[:, :, :t].transpose(0, 2, 1).reshape(b, t, kh, g)


def chunk_backward(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, ends, window, out, lse, dout, *,
                   block: int = 128, softcap: float | None = None,
                   interpret: bool | None = None) -> tuple[Array, Array, Array]:  # fmt: skip
    """The chunk's float32 dq [B, T, K, G, E], dk, dv [B, S, K, E] given the whole softmax's output, log-sum-exp
    ([B, T, K, G]) and output gradient — the ring's per-device backward call."""
    c = _prepare(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, ends, window, block, softcap, interpret)
    b, t, kh, g, e = q_BxTxKxGxE.shape
    tp, ep = c.q.shape[1], c.q.shape[3]
    rows = lambda x: jnp.pad(x.reshape(b, t, kh * g, e), [(0, 0), (0, tp - t), (0, 0), (0, ep - e)])  # noqa: E731
    lse_BxHxT = jnp.pad(lse.reshape(b, t, kh * g).transpose(0, 2, 1), [(0, 0), (0, 0), (0, tp - t)],
                        constant_values=jnp.inf)  # fmt: skip
    dq, dk, dv = c.kernels.backward(c.q, c.k, c.v, c.layout, rows(out), lse_BxHxT, rows(dout).astype(c.q.dtype))
    s = k_BxSxKxE.shape[1]
    return c.unpad(dq), dk[:, :s, :, :e], dv[:, :s, :, :e]
