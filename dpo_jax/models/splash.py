"""Splash attention (JAX's Pallas TPU kernel; interpret mode on other backends) for every row layout the model makes,
the shared prompt's branches included, with no [T, S] mask: two passes merged by their log-sum-exp.

Splash takes a static mask (here causal) and per-token segment ids (a query sees a key of the same id); a shared
row's rule — a completion sees its prompt and itself, not the other completion — is no equality of ids, so it is
two of them:

- **own**: every token attends causally within its own run (its segment's prompt, or one completion of it);
- **prompt**: a completion's tokens attend to their prompt's keys (every one is before them: the causal mask
  holds); prompt tokens see nothing in this pass.

The forward runs both and merges them by log-sum-exp (a query that sees nothing in a pass gets splash's finite
masked value there, whose weight in the merge is 0). The backward runs each pass's splash backward kernels given
the merged output and log-sum-exp — the whole softmax's, so each pass's gradients are exact, as the ring's are —
and sums them. Rows of one sequence or packed without a shared prompt need the first pass only.

What splash cannot serve: sliding windows (its local mask counts slots; a shared row's windows count positions,
which restart the rejected branch at the prompt's end) and KV-cache decoding; ``attention.resolve`` falls back to
the blockwise kernel there. Splash skips blocks by its static (causal) mask only: the prompt pass computes the
row's causal blocks again, so the shared layout costs up to twice the causal FLOPs of one pass in the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpo_jax.models.attention import Ids, ceil_to, merge
from dpo_jax.models.context import ChunkKernel

Array = jax.Array
LANES = 128
_RUN = 256  # own-pass id: segment * _RUN + branch (branches 0 .. _RUN - 1)


def pass_ids(ids: Ids) -> tuple[tuple[Array, Array], ...]:
    """Each pass's (query ids, key ids) [B, T] int32: the own pass, and for shared-prompt rows the prompt pass.
    Padding (invalid tokens) is id 0 in the own pass (it sees only padding) and sees nothing in the prompt pass."""
    segment = jnp.where(ids.valid, 1 if ids.segment is None else ids.segment, 0).astype(jnp.int32)
    if ids.branch is None:
        return ((segment, segment),)
    own = jnp.where(ids.valid, segment * _RUN + ids.branch, 0).astype(jnp.int32)
    prompt = segment * _RUN
    q_prompt = jnp.where(ids.valid & (ids.branch > 0), prompt, -1)
    k_prompt = jnp.where(ids.valid & (ids.branch == 0), prompt, -2)
    return (own, own), (q_prompt.astype(jnp.int32), k_prompt.astype(jnp.int32))


@functools.lru_cache(maxsize=64)
def splash_kernel(q_len: int, k_len: int, heads: int, block: int, softcap: float | None, interpret: bool,
                  causal: bool):  # fmt: skip
    """Splash's kernel for one row and key/value head: [G, q_len, E] queries against [k_len, E] keys under a static
    causal (or, ``causal=False``, full) mask, keeping the log-sum-exp; built once per shape."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    names = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
             "block_q_dq", "block_kv_dq")  # fmt: skip
    sizes = sk.BlockSizes(**dict.fromkeys(names, block))
    shape = (q_len, k_len)
    mask = sm.MultiHeadMask([sm.CausalMask(shape) if causal else sm.FullMask(shape) for _ in range(heads)])
    with jax.ensure_compile_time_eval():  # the block masks as constants, not values of the trace that built them
        return sk.make_splash_mqa(mask, block_sizes=sizes, save_residuals=True, attn_logits_soft_cap=softcap,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)  # fmt: skip


def _passes_forward(kernel, q, k, v, ids):
    """The passes (``ids``: each pass's query and key ids) merged by log-sum-exp: float32 output, log-sum-exp."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    out, lse = None, None
    for q_ids, k_ids in ids:
        o, (l_,) = kernel(q, k, v, segment_ids=sk.SegmentIds(q=q_ids, kv=k_ids))
        o = o.astype(jnp.float32)
        out, lse = (o, l_) if out is None else merge(out, lse, o, l_)
    return out, lse


def _passes_backward(kernel, q, k, v, ids, out, lse, dout):
    """Each pass's splash backward given the whole softmax's output and log-sum-exp, summed: float32 dq, dk, dv."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kw = kernel.kwargs
    dq, dk, dv = (jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    for q_ids, k_ids in ids:
        res = (q, k, v, sk.SegmentIds(q=q_ids, kv=k_ids), None, out, lse, kernel.dq_mask_info,
               kernel.dkv_mask_info)  # fmt: skip
        grads = sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
                                         kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"], res,
                                         dout)  # fmt: skip
        dq, dk, dv = dq + grads[3], dk + grads[4], dv + grads[5]
    return dq, dk, dv


@functools.lru_cache(maxsize=64)
def _row_attention(t: int, heads: int, block: int, softcap: float | None, interpret: bool):
    """One row and key/value head: [G, T, E] queries against [T, E] keys and values, a splash call per pass merged,
    as a custom VJP."""
    kernel = splash_kernel(t, t, heads, block, softcap, interpret, True)

    @jax.custom_vjp
    def attend(q, k, v, ids):
        return _passes_forward(kernel, q, k, v, ids)[0].astype(q.dtype)

    def attend_fwd(q, k, v, ids):
        out, lse = _passes_forward(kernel, q, k, v, ids)
        out = out.astype(q.dtype)
        return out, (q, k, v, ids, out, lse)

    def attend_bwd(residuals, dout):
        q, k, v, ids, out, lse = residuals
        dq, dk, dv = _passes_backward(kernel, q, k, v, ids, out, lse, dout)
        no_grad = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), ids)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def splash_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, *, block: int = 128, softcap: float | None = None,
                     interpret: bool | None = None) -> Array:  # fmt: skip
    """[B, T, K, G, E] self-attention of whole rows (queries and keys the same tokens, ids ``q``) by splash, one
    call per row and key/value head (``vmap``); rows padded to whole blocks (``block`` rounded up to a multiple of
    128). ``interpret``: default everywhere but
    on a TPU (slow: for tests and checks). Equal to ``einsum_attention`` wherever a query sees a key."""
    b, t, kh, g, e = q_BxTxKxGxE.shape
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    blk = ceil_to(min(block, t), LANES)  # splash's blocks are whole multiples of the TPU's 128 lanes
    tp = ceil_to(t, blk)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    ids = pass_ids(q.pad(tp))
    fn = _row_attention(tp, g, blk, softcap, interpret)
    q_BxKxGxTxE = pad(q_BxTxKxGxE * jnp.asarray(e**-0.5, q_BxTxKxGxE.dtype)).transpose(0, 2, 3, 1, 4)
    k_BxKxTxE, v_BxKxTxE = (pad(x).transpose(0, 2, 1, 3) for x in (k_BxSxKxE, v_BxSxKxE))
    per_head = jax.vmap(fn, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(q_BxKxGxTxE, k_BxKxTxE, v_BxKxTxE, ids)
    return out.transpose(0, 3, 1, 2, 4)[:, :t]


# --- On each device of the ring ---------------------------------------------------------------------------------
# Under the context axis a device holds pieces i and 2n-1-i of the row (the balanced order), and the ring brings it
# chunks of two pieces. Splash's masks are static, but between two pieces of m tokens the causal rule is one of
# three: the key piece is before the query piece (every key visible: the full mask), the same piece (the causal
# mask), or after it (nothing). Which one depends on the device and the round, so a ``lax.switch`` picks the kernel;
# the shared prompt's rule is the passes' ids, as in a whole row.


def piece_block(m: int, block: int) -> int | None:
    """Splash's block for pieces of ``m`` tokens: the largest multiple of 128 up to ``block`` (at least 128) that
    divides ``m``; None when ``m`` is no multiple of 128 (splash cannot cut it)."""
    if m % LANES:
        return None
    return max(b for b in range(LANES, max(block, LANES) + 1, LANES) if m % b == 0)


def ring_chunks(m: int, block: int, softcap: float | None, interpret: bool | None = None) -> ChunkKernel:
    """Splash as the ring's per-chunk kernel (``context.ChunkKernel``) for pieces of ``m`` tokens (``piece_block``
    must serve them): each pair of a query piece and a key piece by the full or causal kernel or not at all, two
    passes each; the backward by splash's backward kernels given the whole softmax's output and log-sum-exp."""
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    blk = piece_block(m, block)

    def pieces(q, k, v, q_ids: Ids, k_ids: Ids):
        """Per-head layouts, each pass's query and key ids, the four pairs' relations (0 full, 1 causal, 2 none)."""
        e = q.shape[-1]
        q_ = (q * jnp.asarray(e**-0.5, q.dtype)).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, E]
        k_, v_ = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, S, E]
        ids = [(qp[0], kp[1]) for qp, kp in zip(pass_ids(q_ids), pass_ids(k_ids), strict=True)]
        place = lambda slots: (slots[0, 0] // m, slots[0, m] // m)  # noqa: E731  (every row holds the same slots)
        relation = {(a, c): jnp.where(kp < qp, 0, jnp.where(kp == qp, 1, 2))
                    for a, qp in enumerate(place(q_ids.slot)) for c, kp in enumerate(place(k_ids.slot))}  # fmt: skip
        return q_, k_, v_, ids, relation

    cut = lambda x, i, axis: jax.lax.slice_in_dim(x, i * m, (i + 1) * m, axis=axis)  # noqa: E731

    def pair_ids(ids, a, c):
        return tuple((cut(qi, a, 1), cut(ki, c, 1)) for qi, ki in ids)

    def forward(q, k, v, q_ids, k_ids, _, window):
        q_, k_, v_, ids, relation = pieces(q, k, v, q_ids, k_ids)
        b, kh, g, _, e = q_.shape
        outs, lses = [], []
        for a in (0, 1):
            out, lse = jnp.zeros((b, kh, g, m, e), jnp.float32), jnp.full((b, kh, g, m), -jnp.inf)
            for c in (0, 1):
                args = (cut(q_, a, 3), cut(k_, c, 2), cut(v_, c, 2), pair_ids(ids, a, c))

                def run(causal, args=args):
                    kernel = splash_kernel(m, m, g, blk, softcap, interpret, causal)
                    fn = functools.partial(_passes_forward, kernel)
                    return jax.vmap(jax.vmap(fn, in_axes=(0, 0, 0, None)))(*args)

                nothing = lambda: (jnp.zeros((b, kh, g, m, e), jnp.float32), jnp.full((b, kh, g, m), -jnp.inf))  # noqa: E731
                o, l_ = jax.lax.switch(relation[a, c], [lambda: run(False), lambda: run(True), nothing])
                out, lse = merge(out, lse, o, l_)
            outs.append(out)
            lses.append(lse)
        out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4)
        lse = jnp.concatenate(lses, axis=3).transpose(0, 3, 1, 2)
        return out, jnp.where(jnp.isneginf(lse), jnp.inf, lse)

    def backward(q, k, v, q_ids, k_ids, _, window, out, lse, dout):
        q_, k_, v_, ids, relation = pieces(q, k, v, q_ids, k_ids)
        heads = lambda x: x.astype(q.dtype).transpose(0, 2, 3, 1, 4)  # noqa: E731  [B, T, K, G, E] -> [B, K, G, T, E]
        out_, dout_, lse_ = heads(out), heads(dout), lse.transpose(0, 2, 3, 1)
        dq = [jnp.zeros(cut(q_, 0, 3).shape, jnp.float32) for _ in (0, 1)]
        dk = [jnp.zeros(cut(k_, 0, 2).shape, jnp.float32) for _ in (0, 1)]
        dv = [jnp.zeros(cut(v_, 0, 2).shape, jnp.float32) for _ in (0, 1)]
        g = q_.shape[2]
        for a in (0, 1):
            for c in (0, 1):
                args = (cut(q_, a, 3), cut(k_, c, 2), cut(v_, c, 2), pair_ids(ids, a, c), cut(out_, a, 3),
                        cut(lse_, a, 3), cut(dout_, a, 3))  # fmt: skip

                def run(causal, args=args):
                    kernel = splash_kernel(m, m, g, blk, softcap, interpret, causal)
                    fn = functools.partial(_passes_backward, kernel)
                    return jax.vmap(jax.vmap(fn, in_axes=(0, 0, 0, None, 0, 0, 0)))(*args)

                nothing = lambda: (jnp.zeros_like(dq[0]), jnp.zeros_like(dk[0]), jnp.zeros_like(dv[0]))  # noqa: E731
                dq_p, dk_p, dv_p = jax.lax.switch(relation[a, c], [lambda: run(False), lambda: run(True), nothing])
                dq[a], dk[c], dv[c] = dq[a] + dq_p, dk[c] + dk_p, dv[c] + dv_p
        e = q.shape[-1]
        dq = jnp.concatenate(dq, axis=3).transpose(0, 3, 1, 2, 4) * e**-0.5
        dk, dv = (jnp.concatenate(x, axis=2).transpose(0, 2, 1, 3) for x in (dk, dv))
        return dq, dk, dv

    return ChunkKernel(forward, backward)
