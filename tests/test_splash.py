"""Splash attention (``dpo_jax.models.splash``: JAX's Pallas TPU kernel, in interpret mode on this CPU) for every
layout, the shared prompt's branches by two passes merged by log-sum-exp; and ``model.attention`` choosing it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_run_ends_like_einsum
from test_attention import assert_like_einsum, layout_ids

from dpo_jax.models import attention, kernels, splash
from dpo_jax.models.attention import Ids

CASES = {  # name -> (layout, kv heads, query heads per kv head, softcap, dtype)
    "packed_gqa": ("packed", 1, 4, None, jnp.float32),
    "shared_softcap": ("shared", 2, 2, 5.0, jnp.float32),
    "shared_softcap_bf16": ("shared", 2, 2, 5.0, jnp.bfloat16),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_splash_equals_the_einsum_in_values_and_gradients(name):
    """Rows of 300 tokens (three 128-token blocks, padded): packed segments with 4 query heads per KV head (one
    pass), and shared-prompt branches with soft-capped scores (two passes: a completion's own tokens, its prompt's
    keys; the backward of each given the merged output and log-sum-exp). In float32 within 1e-5 of the values' and
    gradients' size; in bfloat16 (inputs rounded to it, the einsum in float32 on the same values) within 1e-2 — a
    bfloat16 result's rounding, as the blockwise kernel's (about 0.5% here), where a wrong mask is off by O(1)."""
    kind, kh, g, softcap, dtype = CASES[name]
    q_ids, k_ids = layout_ids(kind, t=300)
    b, t, e = q_ids.slot.shape[0], 300, 8
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape) * 2, dtype).astype(jnp.float32)
                  for shape in ((b, t, kh, g, e), (b, t, kh, e), (b, t, kh, e), (b, t, kh, g, e)))  # fmt: skip
    real = q_ids.valid[:, :, None, None, None]
    ref = lambda q, k, v: attention.einsum_attention(q, k, v, q_ids, k_ids, None, softcap)  # noqa: E731

    def fused(q, k, v):
        out = splash.splash_attention(*(x.astype(dtype) for x in (q, k, v)), q_ids, block=128, softcap=softcap)
        assert out.dtype == dtype
        return out.astype(jnp.float32)

    assert_like_einsum(fused, ref, (q, k, v), real, w, tol=1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.slow
def test_a_model_scores_packed_shared_pairs_alike_by_splash(tmp_path):
    """Per-pair log-probs and their gradients through a whole Gemma-3-shaped model without its windows (GQA, a query
    scale of its own, soft-capped scores and logits), pairs packed with the prompt shared: splash equals the einsum."""
    from conftest import make_hf_model
    from flax import nnx
    from test_packing import LAYOUTS, assert_grads_close, layout_logps, make_pairs

    from dpo_jax.infra import hf

    model = make_hf_model("gemma3", scale=0.1)
    model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    model.config.sliding_window = None
    model.save_pretrained(tmp_path)
    pairs = make_pairs(12, seed=3)
    results = []
    for impl in ("einsum", "splash"):
        graphdef, params = nnx.split(hf.load_pretrained(tmp_path, attention=impl, attention_block=128)[0])
        assert all(w is None for w in nnx.merge(graphdef, params).config.windows)
        results.append(layout_logps(graphdef, params, pairs, LAYOUTS["packed_shared"], 6))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert_grads_close(results[1][1], results[0][1])


@pytest.mark.slow
def test_the_rings_chunk_kernel_serves_every_pair_of_pieces():
    """Splash as the ring's per-chunk kernel (``splash.ring_chunks``): two pieces of 128 queries against two pieces
    of 128 keys, each pair by the full mask, the causal one or nothing as the pieces' places say. On one row (its
    two pieces as queries and as keys: causal, nothing, full, causal) and on the row with its pieces swapped (the
    places traced, one program), its output and log-sum-exp, and its backward given them, equal the einsum's
    attention of the row and its gradients (shared-prompt pairs spanning both pieces, soft-capped, GQA)."""
    from test_attention import _segments

    m, t, kh, g, e, softcap = 128, 256, 1, 2, 8, 5.0
    seg, pos, branch = (np.stack(x) for x in zip(_segments([(60, 50, 40), (30, 40, 20)], t), strict=True))
    ids = Ids(jnp.arange(t, dtype=jnp.int32)[None], jnp.asarray(seg > 0), jnp.asarray(seg), jnp.asarray(branch),
              jnp.asarray(pos))  # fmt: skip
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
                  for shape in ((1, t, kh, g, e), (1, t, kh, e), (1, t, kh, e), (1, t, kh, g, e)))  # fmt: skip
    chunks = splash.ring_chunks(m, 128, softcap)

    @jax.jit
    def fused(q, k, v, ids, dout):
        out, lse = chunks.forward(q, k, v, ids, ids, None, None)
        return out, chunks.backward(q, k, v, ids, ids, None, None, out, lse, dout)

    real = ids.valid[:, :, None, None, None]
    ref = lambda q, k, v: attention.einsum_attention(q, k, v, ids, ids, None, softcap)  # noqa: E731
    want = jnp.where(real, ref(q, k, v), 0)
    dout = jnp.where(real, w, 0.0)  # the gradient of the loss below by each output
    want_grads = jax.grad(lambda *x: jnp.sum(ref(*x) * dout), argnums=(0, 1, 2))(q, k, v)
    for order in (np.arange(t), np.r_[m:t, 0:m]):  # pieces (0, 1), then (1, 0)
        back = np.argsort(order)
        out, grads = fused(q[:, order], k[:, order], v[:, order], Ids(*(x[:, order] for x in ids)), dout[:, order])
        np.testing.assert_allclose(jnp.where(real, out[:, back], 0), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        for a, b_ in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(a[:, back], b_, rtol=1e-5, atol=1e-5 * np.abs(b_).max())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ring", "gather"])
def test_a_decoder_over_a_context_axis_by_splash_computes_the_einsums_logits(strategy):
    """A decoder with ``attention="splash"`` under a mesh of context 2 (pieces of 128 tokens, shared-prompt pairs
    spanning them): each device's pairs of pieces by splash's full or causal kernel, the ring's chunks or the
    gathered row's; its logits equal the unsharded einsum decoder's, and the program runs splash's kernels, not the
    blockwise loop."""
    from flax import nnx
    from test_attention import _segments

    from dpo_jax.infra import sharding
    from dpo_jax.models import ModelConfig, init_decoder

    cfg = lambda impl: ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                   num_kv_heads=2, attention=impl, attention_block=128,
                                   context_attention=strategy)  # fmt: skip  # noqa: E731
    graphdef, params = nnx.split(init_decoder(cfg("einsum")))
    fused = nnx.graphdef(init_decoder(cfg("splash")))
    t = 512
    seg, pos, branch = (jnp.asarray(np.stack(x)) for x in zip(_segments([(100, 80, 70), (60, 90, 50)], t),
                                                               _segments([(30, 40, 20), (150, 100, 90)], t),
                                                               strict=True))  # fmt: skip
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, t)), jnp.int32)

    def logits(g, p, tok):
        return nnx.merge(g, p)(tok, positions_BxT=pos, segment_ids_BxT=seg, branch_ids_BxT=branch,
                               attention_mask_BxT=seg > 0).logits_BxTxV  # fmt: skip

    want = jax.jit(functools.partial(logits, graphdef))(params, tokens)
    with jax.set_mesh(sharding.make_mesh(data=1, context=2, devices=jax.devices()[:2])):
        got = jax.jit(functools.partial(logits, fused))(params, tokens)
        program = str(jax.make_jaxpr(functools.partial(logits, fused))(params, tokens))
    assert "splash_mqa_fwd" in program and ("ppermute" if strategy == "ring" else "all_gather") in program
    real = np.asarray(seg > 0)[:, :, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_gathered_row_by_splash_chunks_equals_the_einsum_in_values_and_gradients():
    """The all-gather strategy with splash on each device (``context.over_chunks``: the gathered row as chunks of two
    pieces, partial softmaxes merged, a custom VJP over the chunks' backward) on a context axis of 2: values and
    gradients equal the einsum's on the row as it was (shared-prompt pairs spanning the 128-token pieces, rows in
    the balanced order, soft-capping, GQA)."""
    from test_attention import _segments

    from dpo_jax.models import context

    n, t, softcap = 2, 512, 5.0
    seg, pos, branch = (np.stack(x) for x in zip(_segments([(100, 80, 70), (60, 90, 50)], t), strict=True))
    ids = Ids(jnp.arange(t, dtype=jnp.int32)[None], jnp.asarray(seg > 0), jnp.asarray(seg), jnp.asarray(branch),
              jnp.asarray(pos))  # fmt: skip
    order = context.balanced_order(t, n)
    held = lambda x: None if x is None else x[:, order]  # noqa: E731
    back = np.argsort(order)
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
                  for shape in ((1, t, 1, 2, 8), (1, t, 1, 8), (1, t, 1, 8), (1, t, 1, 2, 8)))  # fmt: skip
    real = ids.valid[:, :, None, None, None]

    def gathered(q, k, v):
        h = Ids(*map(held, ids))
        return kernels.attend(held(q), held(k), held(v), h, h, window=None, implementation="splash", block=128,
                              softcap=softcap, context="gather")[:, back]  # fmt: skip

    ref = lambda q, k, v: attention.einsum_attention(q, k, v, ids, ids, None, softcap)  # noqa: E731
    with jax.set_mesh(jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("context",))):
        assert_like_einsum(gathered, ref, (q, k, v), real, w)


def test_the_passes_ids_by_hand():
    """A shared row: prompt (3), chosen (2), rejected (2) of segment 1, then padding. Own pass: one id per run,
    padding 0; prompt pass: completions ask for their prompt's id, which only the prompt's keys hold."""
    valid = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]], bool)
    ids = Ids(jnp.arange(8)[None], valid, jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]]),
              jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 0]]))  # fmt: skip
    (own_q, own_k), (q_prompt, k_prompt) = splash.pass_ids(ids)
    assert own_q.tolist() == own_k.tolist() == [[256, 256, 256, 257, 257, 258, 258, 0]]
    assert q_prompt.tolist() == [[-1, -1, -1, 256, 256, 256, 256, -1]]
    assert k_prompt.tolist() == [[256, 256, 256, -2, -2, -2, -2, -2]]
    packed = splash.pass_ids(Ids(jnp.arange(4)[None], jnp.asarray([[1, 1, 1, 0]], bool), jnp.asarray([[1, 2, 2, 0]])))
    assert len(packed) == 1 and packed[0][0].tolist() == [[1, 2, 2, 0]]


def test_the_splash_route_lowers_to_mosaic_for_a_tpu():
    """Both passes' forward and backward kernels of a soft-capped bfloat16 shared-row call lower to Mosaic for a TPU
    on this CPU (JAX's cross-platform lowering runs Pallas' Mosaic lowering, which interpret mode skips: a block
    shape or op Mosaic rejects fails here; compiling Mosaic's IR needs a TPU)."""
    import re

    q_ids, _ = layout_ids("shared", t=300)
    q = jnp.zeros((2, 300, 2, 2, 128), jnp.bfloat16)
    k = jnp.zeros((2, 300, 2, 128), jnp.bfloat16)

    def loss(q, k, v):
        out = splash.splash_attention(q, k, v, q_ids, block=128, softcap=5.0, interpret=False)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    names = re.findall(r'kernel_name = "(splash_\w+)"', text)
    assert set(names) == {"splash_mqa_fwd_segmented_residuals", "splash_mqa_dq_segmented_no_residuals",
                          "splash_mqa_dkv_segmented_no_residuals"}, names  # fmt: skip


def test_auto_picks_splash_on_a_tpu_and_falls_back_where_it_cannot_serve():
    assert kernels.resolve("auto", 4096, 4096, 512, platform="tpu") == "splash"
    assert kernels.resolve("auto", 4096, 4096, 512, platform="cpu") == "blockwise"
    assert kernels.resolve("auto", 256, 256, 512, platform="cpu") == "einsum"
    assert kernels.resolve("auto", 4096, 4096, 512, platform="tpu", window=True) == "blockwise"
    assert kernels.resolve("splash", 4096, 4096, 512, window=True) == "blockwise"
    assert kernels.resolve("splash", 64, 4096, 512, rows=False, platform="tpu") == "blockwise"
    assert kernels.resolve("splash", 4096, 4096, 512, platform="cpu") == "splash"
    assert "sliding windows" in kernels.fallback("splash", window=True)
    assert kernels.fallback("splash", window=False) is None and kernels.fallback("blockwise", window=True) is None


@pytest.mark.slow
def test_a_run_by_splash_ends_where_the_einsum_ends(tmp_path):
    """``dpo-jax train --config.model.attention=splash --config.model.attention_block=128`` on this CPU (interpret
    mode, said in the compile note) ends where the same job ends in-process by the einsum: SFT, train and eval
    losses, and the exported weights."""
    assert_run_ends_like_einsum(
        tmp_path, "splash", 128, "(attention: splash of 128-token blocks; Pallas interpret mode"
    )
