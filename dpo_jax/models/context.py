"""Context parallelism: rows split over a mesh's ``context`` axis, attended by the ring (key/value chunks passed
round both ways, ``ring_attention``) or by gathering the row's keys (``gather_attention``), the rows in the balanced
(zig-zag) order that evens each device's work (``balanced_order``, ``rebalance``). What each device computes is a
kernel: in the ring a ``ChunkKernel`` (its queries against one chunk, partial softmaxes merged; by default the
blockwise kernel's row functions, ``blockwise_chunks``), in the all-gather strategy an attention of its queries
against the gathered row (by default the blockwise kernel; ``over_chunks`` makes one from a ``ChunkKernel``).
``dpo_jax.models.kernels`` passes the fused kernels (FlashMask, splash) where they serve.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import attention
from dpo_jax.models.attention import Ids

Array = jax.Array


def _shift(axis: str, n: int, by: int):
    """Every device sends what it holds ``by`` places along the ring (negative: the other way)."""
    perm = [(i, (i + by) % n) for i in range(n)]
    return lambda tree: jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)


def ring_rounds(q_ids: Ids, k_ids: Ids, window, axis: str, n: int, blk: int) -> Array:
    """How many rounds of the two-way ring bring every chunk a query of any device may see: the furthest such chunk,
    counted the shorter way round (at most n // 2), the most over the devices (one count for all: ``pmax``). From
    the blocks' slot (and, with a window, position) ranges: every device's key blocks are gathered (a few int32 per
    block)."""
    b, t = q_ids.slot.shape
    nb = t // blk
    queries = jax.vmap(lambda q: attention.query_blocks(q, blk, nb, window))(q_ids)  # [B, NB] each
    keys = jax.vmap(lambda k: attention.key_blocks(k, blk, nb, window))(k_ids)
    every = jax.tree.map(lambda x: jax.lax.all_gather(x, axis), keys)  # [n, B, NB] each
    sees = jax.vmap(lambda kb: attention.meets(queries, kb, window).any())(every)  # [n]: a chunk a query here may see
    d = jax.lax.axis_index(axis)
    c = jnp.arange(n)
    away = jnp.minimum((d - c) % n, (c - d) % n)
    return jax.lax.pmax(jnp.max(jnp.where(sees, away, 0)), axis)


class ChunkKernel(NamedTuple):
    """What each device of the ring runs on a chunk of keys: ``forward(q, k, v, q_ids, k_ids, extra, window)`` ->
    (output, log-sum-exp; +inf where a query sees nothing in the chunk) and ``backward(q, k, v, q_ids, k_ids, extra,
    window, out, lse, dout)`` -> float32 (dq, dk, dv) given the whole softmax's output and log-sum-exp; ``extra(ids)``
    makes per-key int32 arrays [B, T] from the whole row's ids before the split, which travel with their chunk
    (None: nothing)."""

    forward: Callable
    backward: Callable
    extra: Callable | None = None


def blockwise_chunks(blk: int, softcap) -> ChunkKernel:
    """The blockwise kernel's row functions (``attention.row_forward`` / ``row_backward``) as the ring's kernel."""

    def forward(q, k, v, q_ids, k_ids, _, window):
        row = functools.partial(attention.row_forward, window=window, qb=blk, kb=blk, softcap=softcap)
        return jax.vmap(row)(q, k, v, q_ids, k_ids)

    def backward(q, k, v, q_ids, k_ids, _, window, out, lse, dout):
        row = functools.partial(attention.row_backward, window=window, qb=blk, kb=blk, softcap=softcap)
        return jax.vmap(row)(q, k, v, q_ids, k_ids, out, lse, dout)

    return ChunkKernel(forward, backward)


def _ring_fwd_local(q, k, v, q_ids, k_ids, extra, window, axis, n, blk, kernel):
    """This device's queries against every chunk they may see, passed round the ring both ways (round r brings the
    chunks of devices i - r and i + r; at r = n / 2 they are one), for as many rounds as ``ring_rounds`` says: output
    [B, T, K, G, E] and log-sum-exp [B, T, K, G] (+inf: a query that sees nothing, as ``attention.row_forward``)."""
    ahead, back = _shift(axis, n, 1), _shift(axis, n, -1)

    def add(out, lse, chunk):
        k_c, v_c, ids_c, extra_c = chunk
        o, l_ = kernel.forward(q, k_c, v_c, q_ids, ids_c, extra_c, window)
        return attention.merge(out, lse, o.astype(jnp.float32), jnp.where(jnp.isposinf(l_), -jnp.inf, l_))

    def both_ways(_, carry):
        out, lse, ahead_chunk, back_chunk = carry
        ahead_chunk, back_chunk = ahead(ahead_chunk), back(back_chunk)
        out, lse = add(*add(out, lse, ahead_chunk), back_chunk)
        return out, lse, ahead_chunk, back_chunk

    own = (k, v, k_ids, extra)
    out, lse = add(jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf), own)
    rounds = ring_rounds(q_ids, k_ids, window, axis, n, blk)
    two_way = jnp.minimum(rounds, (n - 1) // 2)  # rounds that bring two chunks
    out, lse, ahead_chunk, _ = jax.lax.fori_loop(0, two_way, both_ways, (out, lse, own, own))
    if n % 2 == 0:  # the round that brings the opposite device's chunk, alone
        out, lse = jax.lax.cond(rounds == n // 2, lambda o, l_: add(o, l_, ahead(ahead_chunk)), lambda o, l_: (o, l_),
                                out, lse)  # fmt: skip
    return out.astype(q.dtype), jnp.where(jnp.isneginf(lse), jnp.inf, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ring(q, k, v, q_ids, k_ids, extra, window, axis, n, blk, kernel):
    return _ring_fwd_local(q, k, v, q_ids, k_ids, extra, window, axis, n, blk, kernel)[0]


def _ring_fwd(q, k, v, q_ids, k_ids, extra, window, axis, n, blk, kernel):
    out, lse = _ring_fwd_local(q, k, v, q_ids, k_ids, extra, window, axis, n, blk, kernel)
    return out, (q, k, v, q_ids, k_ids, extra, window, out, lse)


def _ring_bwd(axis, n, blk, kernel, residuals, dout):
    """The chunks go round again, the same rounds both ways, each with its key/value gradients accumulating beside
    it; each chunk's block probabilities are recomputed from the whole row's log-sum-exp (nothing of the forward's
    blocks is kept). Then the gradients go home in one shift each way (as far as their chunks went)."""
    q, k, v, q_ids, k_ids, extra, window, out, lse = residuals
    ahead, back = _shift(axis, n, 1), _shift(axis, n, -1)

    def add(dq, chunk, grads):
        k_c, v_c, ids_c, extra_c = chunk
        dq_c, dk_c, dv_c = kernel.backward(q, k_c, v_c, q_ids, ids_c, extra_c, window, out, lse, dout)
        return dq + dq_c, (grads[0] + dk_c, grads[1] + dv_c)

    def both_ways(_, carry):
        dq, ahead_chunk, ahead_grads, back_chunk, back_grads = carry
        ahead_chunk, ahead_grads = ahead((ahead_chunk, ahead_grads))
        back_chunk, back_grads = back((back_chunk, back_grads))
        dq, ahead_grads = add(dq, ahead_chunk, ahead_grads)
        dq, back_grads = add(dq, back_chunk, back_grads)
        return dq, ahead_chunk, ahead_grads, back_chunk, back_grads

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    own = (k, v, k_ids, extra)
    dq, (dk, dv) = add(zeros(q), own, (zeros(k), zeros(v)))
    rounds = ring_rounds(q_ids, k_ids, window, axis, n, blk)
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
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (q_ids, k_ids, extra, window))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window: int | None, *, mesh,
                   axis: str = "context", block: int = 512, softcap: float | None = None,
                   chunks: ChunkKernel | None = None) -> Array:  # fmt: skip
    """Self-attention of rows split over the mesh axis ``axis`` (context parallelism): each device holds a
    contiguous 1/n of every row's tokens (queries, keys, values and their ids); the key/value chunks pass round the
    ring (``ppermute``) while each device runs the blockwise kernel of its queries against the chunk it holds,
    merged by log-sum-exp; the backward passes them round again with their gradients. The mask is each block's,
    from the ids (packed segments, shared-prompt branches, windows): a chunk no query of a device can see costs
    its transfer only. Equal to ``einsum_attention`` wherever a query sees a key; the output is split as the input.
    ``chunks``: the kernel each device runs on a chunk (by default ``blockwise_chunks``)."""
    n = mesh.shape[axis]
    blk = ring_layout(q_BxTxKxGxE.shape[1], n, block)[0]
    chunks = blockwise_chunks(blk, softcap) if chunks is None else chunks

    def local(q_, k_, v_, qi, ki, extra, w):
        return _ring(q_, k_, v_, qi, ki, extra, w, axis, n, blk, chunks)

    return _split_rows(local, mesh, axis, block, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window, chunks.extra)


def _split_rows(local, mesh, axis: str, block: int, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window,
                extra=None):  # fmt: skip
    """``local(q, k, v, q_ids, k_ids, extra, window)`` on each device's share of the rows (padded to
    ``ring_layout``'s length), under ``shard_map`` over ``axis``; the output split as the input. The window passes
    as a traced int32 (Gemma 3's per-layer ones are) and reaches ``local`` as None when there is none; ``extra``
    makes per-key arrays from the whole padded row's key ids (None: ``local`` gets None)."""
    t = q_BxTxKxGxE.shape[1]
    tp = ring_layout(t, mesh.shape[axis], block)[1]
    pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    rows = jax.sharding.PartitionSpec(None, axis)
    has_window = window is not None
    window = jnp.asarray(-1 if window is None else window, jnp.int32)

    k = k.pad(tp)
    per_key = jnp.zeros(k.slot.shape, jnp.int32) if extra is None else extra(k)

    def run(q_, k_, v_, qi, ki, e, w):
        return local(q_, k_, v_, qi, ki, None if extra is None else e, w if has_window else None)

    out = jax.shard_map(run, mesh=mesh, in_specs=(rows,) * 6 + (jax.sharding.PartitionSpec(),), out_specs=rows,
                        axis_names=frozenset({axis}), check_vma=False)(
        pad(q_BxTxKxGxE), pad(k_BxSxKxE), pad(v_BxSxKxE), q.pad(tp), k, per_key, window)  # fmt: skip
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

    def local(q_, k_, v_, qi, ki, _, w):
        k_all, v_all = _gather_rows(k_, axis), _gather_rows(v_, axis)
        ki_all = jax.tree.map(lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True), ki)
        order = jnp.argsort(ki_all.slot, axis=1)  # [B, S]
        take = lambda x: x[jnp.arange(x.shape[0])[:, None], order]  # noqa: E731
        k_all, v_all, ki_all = jax.tree.map(take, (k_all, v_all, ki_all))
        if kernel is not None:
            return kernel(q_, k_all, v_all, qi, ki_all, w)
        return attention.blockwise_attention(q_, k_all, v_all, qi, ki_all, w, block=block, softcap=softcap)

    return _split_rows(local, mesh, axis, block, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window)


def _chunk(tree, j, c: int):
    """Chunk ``j`` of ``c`` tokens of every array in ``tree`` (token axis 1)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, j * c, c, axis=1), tree)


def over_chunks(chunks: ChunkKernel, n: int):
    """A per-device attention for ``gather_attention`` from a ring's kernel: the gathered row (keys in slot order)
    cut in ``n`` chunks, each by ``chunks`` (a loop), the partial softmaxes merged; its backward runs each chunk's
    given the merged output and log-sum-exp. ``chunks.extra`` is not used (the row's ends are not needed: kernels
    that need them take the row whole)."""

    def forward(q, k, v, q_ids, k_ids, window):
        c = k.shape[1] // n

        def body(j, carry):
            k_c, v_c, ids_c = _chunk((k, v, k_ids), j, c)
            o, l_ = chunks.forward(q, k_c, v_c, q_ids, ids_c, None, window)
            return attention.merge(*carry, o.astype(jnp.float32), jnp.where(jnp.isposinf(l_), -jnp.inf, l_))

        init = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf))
        out, lse = jax.lax.fori_loop(0, n, body, init)
        return out.astype(q.dtype), jnp.where(jnp.isneginf(lse), jnp.inf, lse)

    @jax.custom_vjp
    def run(q, k, v, q_ids, k_ids, window):
        return forward(q, k, v, q_ids, k_ids, window)[0]

    def run_fwd(q, k, v, q_ids, k_ids, window):
        out, lse = forward(q, k, v, q_ids, k_ids, window)
        return out, (q, k, v, q_ids, k_ids, window, out, lse)

    def run_bwd(res, dout):
        q, k, v, q_ids, k_ids, window, out, lse = res
        c = k.shape[1] // n

        def body(j, carry):
            dq, dk, dv = carry
            k_c, v_c, ids_c = _chunk((k, v, k_ids), j, c)
            dq_c, dk_c, dv_c = chunks.backward(q, k_c, v_c, q_ids, ids_c, None, window, out, lse, dout)
            put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, j * c, axis=1)  # noqa: E731
            return dq + dq_c, put(dk, dk_c), put(dv, dv_c)

        zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
        dq, dk, dv = jax.lax.fori_loop(0, n, body, (zeros(q), zeros(k), zeros(v)))
        no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (q_ids, k_ids, window))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *no_grad

    run.defvjp(run_fwd, run_bwd)
    return run


CONTEXT_STRATEGIES = {"ring": ring_attention, "gather": gather_attention}


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
    blk = min(block, attention.ceil_to(half, 8))
    return blk, 2 * n * attention.ceil_to(half, blk)


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
    chunk = lambda d: attention.block_ids(ids, d * (tp // n), tp // n)  # noqa: E731
    per = tp // n // blk

    def work(d, c):
        lo, hi = attention.block_bounds(chunk(d), chunk(c % n), blk, blk, per, per)
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
