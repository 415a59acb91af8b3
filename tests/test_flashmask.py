"""FlashMask attention (``dpo_jax.models.flashmask``: dpo_jax's Pallas kernel, Triton on a GPU, interpret mode on this
CPU) for every layout — the shared prompt's branch mask as one interval of queries per key — and ``model.attention``
choosing it on a GPU."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_run_ends_like_einsum
from test_attention import assert_like_einsum, layout_ids

from dpo_jax.models import attention, context, flashmask, kernels
from dpo_jax.models.attention import Ids

CASES = {  # name -> (layout, kv heads, query heads per kv head, window, softcap, dtype)
    "padded": ("padded", 2, 2, None, None, jnp.float32),
    "packed_gqa": ("packed", 1, 4, None, None, jnp.float32),
    "shared_softcap": ("shared", 2, 2, None, 5.0, jnp.float32),
    "shared_window": ("shared", 2, 1, 6, None, jnp.float32),
    "shared_window_softcap_bf16": ("shared", 1, 2, 9, 5.0, jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flashmask_equals_the_einsum_in_values_and_gradients(name):
    """Rows of 150 tokens cut into ten 16-token blocks (padded to 160): one padded sequence a row; packed segments
    with 4 query heads per KV head; shared-prompt branches, soft-capped, or with a sliding window counted in
    positions (the rejected branch restarts at the prompt's end). Float32 within 1e-5 of the values' and gradients'
    size; bfloat16 (inputs rounded to it, the einsum in float32 on the same values) within 1e-2."""
    kind, kh, g, window, softcap, dtype = CASES[name]
    q_ids, k_ids = layout_ids(kind, t=150)
    b, t, e = q_ids.slot.shape[0], 150, 8
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape) * 2, dtype).astype(jnp.float32)
                  for shape in ((b, t, kh, g, e), (b, t, kh, e), (b, t, kh, e), (b, t, kh, g, e)))  # fmt: skip
    real = q_ids.valid[:, :, None, None, None]
    ref = lambda q, k, v: attention.einsum_attention(q, k, v, q_ids, k_ids, window, softcap)  # noqa: E731

    def fused(q, k, v):
        out = flashmask.flashmask_attention(*(x.astype(dtype) for x in (q, k, v)), q_ids, window, block=16,
                                            softcap=softcap)  # fmt: skip
        assert out.dtype == dtype
        return out.astype(jnp.float32)

    assert_like_einsum(fused, ref, (q, k, v), real, w, tol=1e-5 if dtype == jnp.float32 else 1e-2)


def _shared_row():
    """prompt (2) | chosen (4) | rejected (2) of segment 1, then a packed segment of 3 and padding (1): 12 slots."""
    seg = jnp.asarray([[1] * 8 + [2] * 3 + [0]])
    branch = jnp.asarray([[0, 0, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0]])
    pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 2, 3, 0, 1, 2, 0]])
    return Ids(jnp.arange(12)[None], seg > 0, seg, branch, pos)


def test_each_key_ends_where_its_run_ends():
    """A prompt's key is seen to its segment's end, a completion's to its own end, padding by nobody; without
    branches every key to its segment's end."""
    ids = _shared_row()
    assert flashmask.key_ends(ids).tolist() == [[8, 8, 6, 6, 6, 6, 8, 8, 11, 11, 11, 11]]
    packed = Ids(jnp.arange(5)[None], jnp.asarray([[1, 1, 1, 1, 0]], bool), jnp.asarray([[1, 2, 2, 2, 0]]))
    assert flashmask.key_ends(packed).tolist() == [[1, 4, 4, 4, 4]]
    padded = Ids(jnp.arange(4)[None], jnp.asarray([[1, 1, 1, 0]], bool))
    assert flashmask.key_ends(padded).tolist() == [[3, 3, 3, 3]]
    # the rule the ends stand for equals the mask's: query q sees key k iff k <= q < end_k (and the key is real)
    ends = np.asarray(flashmask.key_ends(ids))[0]
    q, k = np.arange(12)[:, None], np.arange(12)[None, :]
    np.testing.assert_array_equal((k <= q) & (q < ends[None, :]), np.asarray(attention.allowed(ids, ids, None))[0])


def test_the_block_lists_skip_blocks_nobody_sees():
    """Blocks of 2 on the row above: the rejected queries (block 3) need the prompt's block and their own, not the
    chosen blocks between; the packed segment's queries (blocks 4, 5) only theirs; with a window of 3 positions the
    chosen block at positions 4-5 no longer needs the prompt's block (positions 0-1)."""
    ids = _shared_row()
    ends = flashmask.key_ends(ids)[0]
    lists = lambda table: [row[1 : 1 + row[0]] for row in np.asarray(table).tolist()]  # noqa: E731
    row = (ends, ids.slot[0], ids.position[0], ids.valid[0], ids.slot[0], ids.position[0], ids.valid[0])
    fwd, bwd = flashmask.block_tables(*row, None, 2)
    assert lists(fwd) == [[0], [0, 1], [0, 1, 2], [0, 3], [4], [4, 5]]
    assert lists(bwd) == [[0, 1, 2, 3], [1, 2], [2], [3], [4, 5], [5]]
    fwd, _ = flashmask.block_tables(*row, 3, 2)
    assert lists(fwd) == [[0], [0, 1], [1, 2], [0, 3], [4], [4, 5]]
    # queries in another order (blocks 3 and 1 of the row, as a device holds them): each block's slots count
    order = np.r_[6:8, 2:4]
    keys = (ends, ids.slot[0], ids.position[0], ids.valid[0])
    fwd, bwd = flashmask.block_tables(*keys, ids.slot[0][order], ids.position[0][order], ids.valid[0][order], None, 2)
    assert lists(fwd) == [[0, 3], [0, 1]]
    assert lists(bwd) == [[0, 1], [1], [], [0], [], []]


def test_the_work_of_each_kernel_on_a_pair_by_hand():
    """``experiments/attention_blocks.py`` on one pair of 1,024 tokens in 128-token blocks (prompt 4 blocks, each
    completion 2): the causal pairs are 36; the blockwise kernel reads them all (a rejected block's key range spans
    the chosen blocks); FlashMask's lists skip the 4 (rejected, chosen) pairs: the prompt's 1 + 2 + 3 + 4, each
    completion's (4 + 1) + (4 + 2), 32 in all; splash computes the causal pairs once per pass: 72."""
    from experiments import attention_blocks

    assert attention_blocks.block_pairs(1024, 128) == dict(causal=36, blockwise=36, flashmask=32, splash=72)


def test_the_kernels_lower_to_triton_for_a_gpu():
    """The forward, dq and dk/dv kernels of a windowed, soft-capped bfloat16 call lower to Triton for CUDA on this
    CPU (JAX's cross-platform lowering runs Pallas' Triton lowering: an op Triton lacks fails here)."""
    q_ids, _ = layout_ids("shared", t=150)
    q = jnp.zeros((2, 150, 2, 2, 64), jnp.bfloat16)
    k = jnp.zeros((2, 150, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        out = flashmask.flashmask_attention(q, k, v, q_ids, 6, block=64, softcap=5.0, interpret=False)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @([\w$.]+)", text) == ["__gpu$xla.gpu.triton"] * 3
    assert re.findall(r'name = "(flashmask_\w+)"', text) == ["flashmask_forward", "flashmask_dq", "flashmask_dkv"]


@pytest.mark.parametrize("strategy,n", [("gather", 4), ("ring", 4), ("ring", 8)])
def test_flashmask_serves_each_device_under_the_context_axis(strategy, n):
    """Under a context axis of n devices, ``kernels.attend`` runs FlashMask on each device: its queries (pieces i and
    2n - 1 - i of the row's balanced order: slots with a gap) against the gathered row (``gather``), or against each
    chunk the ring brings (its keys' ends computed from the whole row, travelling with the chunk; partial softmaxes
    merged; the backward given the whole softmax's). Values and gradients equal the einsum's on the row as it was
    (shared-prompt branches, a window of 6 positions, soft-capping, 2 query heads per KV head; 128 tokens)."""
    t = 128
    q_ids, k_ids = layout_ids("shared", t=t)
    order = context.balanced_order(t, n)
    shuffle = lambda x: None if x is None else x[:, order]  # noqa: E731
    b, e, window, softcap = q_ids.slot.shape[0], 8, 6, 5.0
    rng = np.random.default_rng(5)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
                  for shape in ((b, t, 1, 2, e), (b, t, 1, e), (b, t, 1, e), (b, t, 1, 2, e)))  # fmt: skip
    real = q_ids.valid[:, :, None, None, None]
    back = np.argsort(order)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8 // n, n), ("data", "context"))

    def gathered(q, k, v):
        return kernels.attend(shuffle(q), shuffle(k), shuffle(v), Ids(*map(shuffle, q_ids)), Ids(*map(shuffle, k_ids)),
                              window=window, implementation="flashmask", block=16, softcap=softcap,
                              context=strategy)[:, back]  # fmt: skip

    ref = lambda q, k, v: attention.einsum_attention(q, k, v, q_ids, k_ids, window, softcap)  # noqa: E731
    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(gathered)(q, k, v))
        assert_like_einsum(gathered, ref, (q, k, v), real, w)
    collective = "all_gather" if strategy == "gather" else "ppermute"
    assert collective in text and "flashmask_forward" in text and "flashmask_dkv" not in text
    assert kernels.context_kernel("flashmask", 16) == "flashmask"
    assert kernels.context_kernel("splash", 256) == "splash" and kernels.context_kernel("splash", 192) == "blockwise"
    assert kernels.context_kernel("auto", 128) == kernels.context_kernel("blockwise", 128) == "blockwise"


@pytest.mark.parametrize("strategy", ["ring", "gather"])
def test_a_decoder_over_a_context_axis_by_flashmask_computes_the_einsums_logits(strategy):
    """A decoder with ``attention="flashmask"`` under a mesh of data 2 x context 4 (packed segments of 24 tokens
    across the devices' pieces; 16-token blocks): its logits equal the unsharded einsum decoder's."""
    from flax import nnx

    from dpo_jax.infra import sharding
    from dpo_jax.models import ModelConfig, init_decoder

    cfg = lambda impl: ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                   num_kv_heads=2, attention=impl, attention_block=16,
                                   context_attention=strategy)  # fmt: skip  # noqa: E731
    graphdef, params = nnx.split(init_decoder(cfg("einsum")))
    fused = nnx.graphdef(init_decoder(cfg("flashmask")))
    t = 96
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, t)), jnp.int32)
    segments = jnp.asarray(np.repeat(np.arange(1, 5), t // 4)[None].repeat(2, 0), jnp.int32)

    def logits(g, p, tok):
        return nnx.merge(g, p)(tok, segment_ids_BxT=segments, attention_mask_BxT=segments > 0).logits_BxTxV

    want = jax.jit(functools.partial(logits, graphdef))(params, tokens)
    with jax.set_mesh(sharding.make_mesh(data=2, context=4)):
        got = jax.jit(functools.partial(logits, fused))(params, tokens)
        assert "flashmask_forward" in str(jax.make_jaxpr(functools.partial(logits, fused))(params, tokens))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_auto_picks_flashmask_on_a_gpu_for_whole_rows():
    assert kernels.resolve("auto", 4096, 4096, 512, platform="gpu") == "flashmask"
    assert kernels.resolve("auto", 4096, 4096, 512, platform="gpu", window=True) == "flashmask"
    assert kernels.resolve("auto", 64, 4096, 512, rows=False, platform="gpu") == "blockwise"
    assert kernels.resolve("flashmask", 64, 4096, 512, rows=False) == "blockwise"
    assert kernels.resolve("auto", 4096, 4096, 512, platform="cpu") == "blockwise"
    assert "KV-cache decoding" in kernels.fallback("flashmask", window=False, rows=False)
    assert flashmask.block_size(512) == 128 and flashmask.block_size(96) == 64 and flashmask.block_size(8) == 16
    assert flashmask.block_size(512, 128) == flashmask.block_size(512, 256) == 64


@pytest.mark.slow
def test_a_model_scores_packed_shared_pairs_alike_by_flashmask(tmp_path):
    """Per-pair log-probs and their gradients through a whole Gemma-3-shaped model — sliding and global layers
    alternating (a traced window per layer), GQA, its own query scale, soft-capped logits — pairs packed with the
    prompt shared, rows in 16-token blocks: FlashMask equals the einsum."""
    from conftest import make_hf_model
    from flax import nnx
    from test_packing import LAYOUTS, assert_grads_close, layout_logps, make_pairs

    from dpo_jax.infra import hf

    model = make_hf_model("gemma3", scale=0.1)
    model.save_pretrained(tmp_path)
    pairs = make_pairs(12, seed=3)
    results = []
    for impl in ("einsum", "flashmask"):
        graphdef, params = nnx.split(hf.load_pretrained(tmp_path, attention=impl, attention_block=16)[0])
        windows = nnx.merge(graphdef, params).config.windows
        assert len(set(windows)) == 2 and min(w or 1 << 30 for w in windows) < 24, windows
        results.append(layout_logps(graphdef, params, pairs, LAYOUTS["packed_shared"], 6))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert_grads_close(results[1][1], results[0][1])


@pytest.mark.slow
def test_a_run_by_flashmask_ends_where_the_einsum_ends(tmp_path):
    """``dpo-jax train --config.model.attention=flashmask --config.model.attention_block=16`` on this CPU (interpret
    mode, said in the compile note) ends where the same job ends in-process by the einsum: SFT, train and eval
    losses, and the exported weights."""
    assert_run_ends_like_einsum(tmp_path, "flashmask", 16, "(attention: flashmask of 16-token blocks; Pallas "
                                "interpret mode off a GPU")  # fmt: skip
