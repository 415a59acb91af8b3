"""Which attention a program runs: the reference einsum and the blockwise kernel (``dpo_jax.models.attention``), the
ring or all-gather over a context axis, and the fused kernels — splash on TPU (``dpo_jax.models.splash``; every
layout but windows), FlashMask on GPU (``dpo_jax.models.flashmask``, dpo_jax's own Pallas/Triton kernel; every
layout), cuDNN and Pallas' GPU flash attention (by name, for the layouts they can express).

``model.attention="auto"`` is splash on a TPU and FlashMask on a GPU wherever they can serve the call (whole rows;
splash: no sliding window), and elsewhere the einsum for rows of one block and the blockwise kernel for longer ones.
A name asks for that kernel; a fused kernel asked for where it cannot serve falls back as ``auto`` would, and
``fallback`` says why (the run prints it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.models import flashmask, splash
from dpo_jax.models.attention import Ids, blockwise_attention, ceil_to, einsum_attention
from dpo_jax.models.context import CONTEXT_STRATEGIES, ChunkKernel, context_mesh, over_chunks, ring_layout

Array = jax.Array
IMPLEMENTATIONS = ("auto", "einsum", "blockwise", "splash", "flashmask", "cudnn", "pallas")
FUSED = {"tpu": "splash", "gpu": "flashmask"}  # auto's kernel per platform
HOME = {kernel: platform for platform, kernel in FUSED.items()}  # where each runs compiled (elsewhere: interpreted)
BLOCKED = ("blockwise", "splash", "flashmask")  # the kernels that cut rows into blocks


def block_of(implementation: str, block: int, width: int = 64) -> int:
    """The block a kernel cuts rows into when ``model.attention_block`` is ``block`` (heads ``width`` wide)."""
    if implementation == "flashmask":
        return flashmask.block_size(block, width)
    return ceil_to(block, splash.LANES) if implementation == "splash" else block


def fallback(implementation: str, *, window: bool, rows: bool = True) -> str | None:
    """Why ``implementation`` cannot serve a call (None: it can)."""
    if implementation not in ("splash", "flashmask"):
        return None
    if window and implementation == "splash":
        return "splash cannot serve sliding windows (counted in positions on shared rows)"
    if not rows:
        return f"{implementation} serves whole rows, not KV-cache decoding"
    return None


def resolve(implementation: str, t: int, s: int, block: int, *, window: bool = False, rows: bool = True,
            platform: str | None = None) -> str:  # fmt: skip
    """The implementation a call of ``t`` queries and ``s`` keys uses (``window``: the layer has a sliding window;
    ``rows``: whole rows, not KV-cache decoding; ``platform``: the backend, by default JAX's)."""
    if fallback(implementation, window=window, rows=rows):
        implementation = "auto"
    if implementation != "auto":
        return implementation
    fused = FUSED.get(platform or jax.default_backend())
    if fused and fallback(fused, window=window, rows=rows) is None:
        return fused
    return "einsum" if max(t, s) <= block else "blockwise"


def context_piece(t: int, n: int, block: int) -> int:
    """The tokens of each of the 2n pieces a row of ``t`` is cut into over a context axis of ``n`` devices."""
    return ring_layout(t, n, block)[1] // (2 * n)


def context_kernel(implementation: str, piece: int) -> str:
    """The kernel each device runs under a context axis (either strategy), pieces of ``piece`` tokens: FlashMask
    where it is the choice; splash where it is the choice and the pieces are whole splash blocks (each pair of
    pieces by its full or causal kernel); the blockwise kernel otherwise."""
    if implementation == "flashmask":
        return "flashmask"
    if implementation == "splash" and piece % splash.LANES == 0:  # pieces of whole splash blocks
        return "splash"
    return "blockwise"


def _per_device(within: str, context: str, n: int, piece: int, block: int, softcap) -> dict:
    """The context strategy's keyword for a fused kernel on each device (none for the blockwise kernel, its
    default): the ring's per-chunk kernel (``chunks``), or the all-gather strategy's attention of a device's queries
    against the gathered row (``kernel``) — FlashMask's whole, splash's over the row's chunks (``over_chunks``)."""
    kw = dict(block=block, softcap=softcap)
    if within == "flashmask" and context == "gather":
        return dict(kernel=lambda q, k, v, qi, ki, w: flashmask.flashmask_attention(q, k, v, qi, w, k=ki, **kw))
    if within == "flashmask":  # each key's end from the whole row travels with its chunk
        chunks = ChunkKernel(
            forward=lambda q, k, v, qi, ki, ends, w: flashmask.chunk_forward(q, k, v, qi, ki, ends, w, **kw),
            backward=lambda q, k, v, qi, ki, ends, w, o, lse, do: flashmask.chunk_backward(q, k, v, qi, ki, ends, w,
                                                                                           o, lse, do, **kw),
            extra=flashmask.row_ends,
        )  # fmt: skip
    elif within == "splash":
        chunks = splash.ring_chunks(piece, block, softcap)
    else:
        return {}
    return dict(chunks=chunks) if context == "ring" else dict(kernel=over_chunks(chunks, n))


def cudnn_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, window: int | None, implementation=None):
    """Rows of one right-padded sequence through ``jax.nn.dot_product_attention`` (cuDNN on GPU; ``implementation``
    "xla" runs the same call on any backend, which is how it is tested here)."""
    b, t, kh, g, e = q_BxTxKxGxE.shape
    lengths = jnp.sum(k.valid, axis=1).astype(jnp.int32)
    out = jax.nn.dot_product_attention(
        q_BxTxKxGxE.reshape(b, t, kh * g, e), k_BxSxKxE, v_BxSxKxE, is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation=implementation,
    )  # fmt: skip
    return out.reshape(b, t, kh, g, e)


def pallas_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, *, block: int = 128, interpret: bool = False):
    """Packed rows through JAX's Pallas flash attention for GPUs (``jax.experimental.pallas.ops.gpu.attention``:
    causal, segment ids; Triton on GPU, ``interpret=True`` anywhere, which is how it is tested here). Key/value
    heads are repeated for their query heads (it takes as many as the queries)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu  # GPU kernels: imported when chosen

    b, t, kh, g, e = q_BxTxKxGxE.shape
    tp = ceil_to(t, block)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    heads = lambda x: pad(jnp.repeat(x, g, axis=2))  # noqa: E731  [B, S, K, E] -> [B, S', K * G, E]
    segments = pad(jnp.where(q.valid, q.segment if q.segment is not None else 1, 0))
    blocks = pallas_gpu.BlockSizes(*(min(block, tp),) * 6)
    out = pallas_gpu.mha(
        pad(q_BxTxKxGxE.reshape(b, t, kh * g, e)), heads(k_BxSxKxE), heads(v_BxSxKxE), segments,
        sm_scale=e**-0.5, causal=True, block_sizes=blocks, interpret=interpret,
    )  # fmt: skip
    return out[:, :t].reshape(b, t, kh, g, e)


def attend(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q: Ids, k: Ids, *, window: int | None, implementation: str = "auto",
           block: int = 512, softcap: float | None = None, rows: bool = True,
           context: str = "ring") -> Array:  # fmt: skip
    """[B, T, K, G, E] attention outputs by the implementation ``resolve`` picks; under a mesh with a ``context``
    axis, whole rows (``rows``: self-attention, no KV cache) over it by the ``context`` strategy (``ring`` or
    ``gather``: ``ring_attention``, ``gather_attention``)."""
    impl = resolve(implementation, q_BxTxKxGxE.shape[1], k_BxSxKxE.shape[1], block, window=window is not None,
                   rows=rows)  # fmt: skip
    if rows and (mesh := context_mesh()) is not None:
        n = mesh.shape["context"]
        piece = context_piece(q_BxTxKxGxE.shape[1], n, block)
        kw = _per_device(context_kernel(impl, piece), context, n, piece, block, softcap)
        return CONTEXT_STRATEGIES[context](q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window, mesh=mesh, block=block,
                                           softcap=softcap, **kw)  # fmt: skip
    if impl == "blockwise":
        return blockwise_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window, block=block, softcap=softcap)
    if impl == "splash":
        return splash.splash_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, block=block, softcap=softcap)
    if impl == "flashmask":
        return flashmask.flashmask_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, window, block=block,
                                             softcap=softcap)  # fmt: skip
    if impl == "cudnn":  # the layout's rows hold one sequence each (checked with the config: data.packing=False)
        if softcap:
            raise ValueError("model.attention='cudnn' takes no softcap")
        return cudnn_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window, implementation="cudnn")
    if impl == "pallas":  # branches are redundant when each sequence is its own segment (data.share_prompt=False)
        if window is not None or softcap:
            raise ValueError("model.attention='pallas' takes no sliding window and no softcap")
        return pallas_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q)
    return einsum_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q, k, window, softcap)
