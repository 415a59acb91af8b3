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
def _row_attention(t: int, heads: int, block: int, softcap: float | None, interpret: bool):
    """One row and key/value head: [G, T, E] queries against [T, E] keys and values, a splash call per pass merged,
    as a custom VJP (the kernel and its block masks built once per shape)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    names = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
             "block_q_dq", "block_kv_dq")  # fmt: skip
    sizes = sk.BlockSizes(**dict.fromkeys(names, block))
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():  # the block masks as constants, not values of the trace that built them
        kernel = sk.make_splash_mqa(mask, block_sizes=sizes, save_residuals=True, attn_logits_soft_cap=softcap,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)  # fmt: skip
    kw = kernel.kwargs

    def forward(q, k, v, ids):
        out, lse = None, None
        for q_ids, k_ids in ids:
            o, (l_,) = kernel(q, k, v, segment_ids=sk.SegmentIds(q=q_ids, kv=k_ids))
            o = o.astype(jnp.float32)
            out, lse = (o, l_) if out is None else merge(out, lse, o, l_)
        return out.astype(q.dtype), lse

    @jax.custom_vjp
    def attend(q, k, v, ids):
        return forward(q, k, v, ids)[0]

    def attend_fwd(q, k, v, ids):
        out, lse = forward(q, k, v, ids)
        return out, (q, k, v, ids, out, lse)

    def attend_bwd(residuals, dout):
        q, k, v, ids, out, lse = residuals
        dq, dk, dv = (jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
        for q_ids, k_ids in ids:
            res = (q, k, v, sk.SegmentIds(q=q_ids, kv=k_ids), None, out, lse, kernel.dq_mask_info,
                   kernel.dkv_mask_info)  # fmt: skip
            grads = sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
                                             kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"], res,
                                             dout)  # fmt: skip
            dq, dk, dv = dq + grads[3], dk + grads[4], dv + grads[5]
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
