"""Attention from token ids: the blockwise (flash-style) kernel equals the reference einsum in values and
gradients on every layout (padding, packed segments, shared-prompt branches, sliding windows, GQA, a KV cache),
skips key blocks nobody sees, and keeps memory linear in the row (a 32k-token row runs in a test-sized model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import attention, kernels
from dpo_jax.models.attention import Ids


def _segments(lengths, t):
    seg, pos, branch = np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(t, np.int32)
    cursor = 0
    for s, (p, c, r) in enumerate(lengths, 1):  # prompt | chosen | rejected: positions continue from the prompt
        seg[cursor : cursor + p + c + r] = s
        pos[cursor : cursor + p + c + r] = np.concatenate([np.arange(p + c), p + np.arange(r)])
        branch[cursor + p : cursor + p + c], branch[cursor + p + c : cursor + p + c + r] = 1, 2
        cursor += p + c + r
    return seg, pos, branch


def layout_ids(kind, b=2, t=44):
    """(query ids, key ids) of one layout, as the model makes them."""
    slot = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    if kind == "padded":  # right padding, one sequence a row
        valid = slot < np.array([[t - 9], [t]])
        return (Ids(jnp.asarray(slot), jnp.asarray(valid)),) * 2
    if kind == "cache_prefill":  # left-padded prompts written into a longer cache: keys are the cache's slots
        s = t + 12
        valid = slot >= np.array([[5], [0]])
        k_valid = np.zeros((b, s), bool)
        k_valid[:, :t] = valid
        return Ids(jnp.asarray(slot), jnp.asarray(valid)), Ids(jnp.asarray(np.broadcast_to(np.arange(s), (b, s))),
                                                                jnp.asarray(k_valid))  # fmt: skip
    rows = [_segments([(5, 7, 4), (3, 9, 6), (2, 3, 2)], t), _segments([(9, 12, 11), (4, 2, 3)], t)]
    seg, pos, branch = (np.stack(x) for x in zip(*rows, strict=True))
    if kind == "packed":  # a segment per sequence: no branches
        branch = None
    ids = Ids(jnp.asarray(slot), jnp.asarray(seg > 0), jnp.asarray(seg), None if branch is None else
              jnp.asarray(branch), jnp.asarray(pos))  # fmt: skip
    return ids, ids


def assert_like_einsum(fused, ref, args, real, w, tol=1e-5):
    """``fused(*args)`` (jitted) equals ``ref(*args)`` where ``real`` (queries that see a key; padding is not
    compared), and so do the gradients of ``sum(out * w)`` by every argument: within ``tol`` relative and ``tol`` of
    the largest entry absolute."""
    want = jnp.where(real, ref(*args), 0)
    np.testing.assert_allclose(jnp.where(real, jax.jit(fused)(*args), 0), want, rtol=tol, atol=tol * np.abs(want).max())
    loss = lambda fn: lambda *x: jnp.sum(jnp.where(real, fn(*x) * w, 0.0))  # noqa: E731
    every = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss(fused), argnums=every))(*args)
    for a, b in zip(got, jax.grad(loss(ref), argnums=every)(*args), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


CASES = {  # name -> (layout, kv heads, query heads per kv head, window)
    "padded": ("padded", 2, 2, None),
    "packed_gqa": ("packed", 1, 4, None),
    "shared_branches": ("shared", 2, 2, None),
    "shared_window": ("shared", 2, 1, 6),
    "cache_prefill_window": ("cache_prefill", 2, 2, 9),
}


@pytest.mark.parametrize("name,block", [(name, 8) for name in CASES] + [("shared_window", 16)])
def test_blockwise_equals_the_einsum_in_values_and_gradients(name, block):
    kind, kh, g, window = CASES[name]
    q_ids, k_ids = layout_ids(kind)
    b, t, s, e = q_ids.slot.shape[0], q_ids.slot.shape[1], k_ids.slot.shape[1], 8
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                  for shape in ((b, t, kh, g, e), (b, s, kh, e), (b, s, kh, e), (b, t, kh, g, e)))  # fmt: skip
    real = q_ids.valid[:, :, None, None, None]  # padding queries see nothing: their outputs are not compared

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v) * w, 0.0))

    ref = lambda q, k, v: attention.einsum_attention(q, k, v, q_ids, k_ids, window)  # noqa: E731
    blk = lambda q, k, v: attention.blockwise_attention(q, k, v, q_ids, k_ids, window, block=block)  # noqa: E731
    np.testing.assert_allclose(jnp.where(real, blk(q, k, v), 0), jnp.where(real, ref(q, k, v), 0), atol=1e-5)
    for a, b_ in zip(jax.grad(lambda *x: loss(blk, *x), argnums=(0, 1, 2))(q, k, v),
                     jax.grad(lambda *x: loss(ref, *x), argnums=(0, 1, 2))(q, k, v), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5)


def test_softcapped_scores_equal_the_einsum():
    q_ids, k_ids = layout_ids("shared")
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 44, 2, 2, 8)) * 4, jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 44, 2, 8)) * 4, jnp.float32) for _ in range(2))
    real = q_ids.valid[:, :, None, None, None]
    fns = [lambda q, k: attention.einsum_attention(q, k, v, q_ids, k_ids, None, softcap=5.0),
           lambda q, k: attention.blockwise_attention(q, k, v, q_ids, k_ids, None, block=8, softcap=5.0)]  # fmt: skip
    outs = [jnp.where(real, f(q, k), 0) for f in fns]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    grads = [jax.grad(lambda q, k, f=f: jnp.sum(jnp.where(real, f(q, k), 0) ** 2), argnums=(0, 1))(q, k) for f in fns]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_key_blocks_nobody_sees_are_skipped():
    """Causal: query block i reads key blocks up to i; packed: from its earliest segment's first block."""
    t = 64
    seg = np.repeat(np.arange(1, 5), 16).astype(np.int32)  # four 16-token segments
    ids = Ids(jnp.arange(t), jnp.ones(t, bool), jnp.asarray(seg))
    lo, hi = attention.block_bounds(ids, ids, 8, 8, 8, 8)
    assert hi.tolist() == list(range(8)) and lo.tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
    pad = Ids(jnp.arange(t), jnp.arange(t) < 20)  # right padding: blocks of padding queries read nothing
    lo, hi = attention.block_bounds(pad, pad, 8, 8, 8, 8)
    assert hi.tolist() == [0, 1, 2, -1, -1, -1, -1, -1]
    # a window of 10: query block i (slots 8i .. 8i+7) reads key block j only if 8j + 7 > 8i - 10
    one = Ids(jnp.arange(t), jnp.ones(t, bool))
    lo, hi = attention.block_bounds(one, one, 8, 8, 8, 8, window=10)
    assert lo.tolist() == [0, 0, 0, 1, 2, 3, 4, 5] and hi.tolist() == list(range(8))
    # positions, when given, are what the window counts: a shared row's rejected branch (slots 40-63) restarts at
    # position 24, the prompt's end, so its first block (nearest position 24) reads the prompt's last blocks
    position = jnp.concatenate([jnp.arange(40), jnp.arange(24, 48)])
    shared = Ids(jnp.arange(t), jnp.ones(t, bool), position=position)
    lo, hi = attention.block_bounds(shared, shared, 8, 8, 8, 8, window=10)
    assert lo.tolist()[5:] == [1, 2, 3] and hi.tolist()[5:] == [5, 6, 7]


@pytest.mark.slow
def test_a_model_scores_packed_shared_pairs_alike_with_either_attention(tmp_path, arch="mistral_window"):
    """Per-pair log-probs and their gradients through the whole model (every layer, GQA, a sliding window shorter
    than the pairs): blockwise with 8-token blocks equals the einsum."""
    from conftest import make_hf_model
    from flax import nnx
    from test_packing import LAYOUTS, assert_grads_close, layout_logps, make_pairs

    from dpo_jax.infra import hf

    make_hf_model(arch, scale=0.1).save_pretrained(tmp_path)
    pairs = make_pairs(12, seed=3)
    results = []
    for impl in ("einsum", "blockwise"):
        graphdef, params = nnx.split(hf.load_pretrained(tmp_path, attention=impl, attention_block=8)[0])
        results.append(layout_logps(graphdef, params, pairs, LAYOUTS["packed_shared"], 6))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert_grads_close(results[1][1], results[0][1])


@pytest.mark.slow
def test_a_32k_token_row_compiles_and_runs():
    """A packed row of 32,768 tokens (eight 4k sequences) through a test-sized model, forward and backward: the
    blockwise kernel holds O(T x block) (the einsum's scores alone would be 2 x 32k^2 x 4 bytes = 8 GiB)."""
    from flax import nnx

    from dpo_jax.models import ModelConfig, init_decoder

    t = 32768
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, remat="full", attention_block=1024)  # fmt: skip
    graphdef, params = nnx.split(init_decoder(cfg))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, size=(1, t)), jnp.int32)
    segments = jnp.asarray(np.repeat(np.arange(1, 9), t // 8)[None], jnp.int32)

    def loss(params):
        out = nnx.merge(graphdef, params)(tokens, segment_ids_BxT=segments, attention_mask_BxT=segments > 0,
                                          return_logits=False)  # fmt: skip
        return jnp.mean(out.hidden_BxTxD.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    # A real-sized computation: compiled with XLA's optimisations (the tests' flags leave them out), it runs in ~16 s
    # rather than ~36 s here.
    full = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}
    compiled = step.lower(params).compile(compiler_options=full)
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30
    value, grads = compiled(params)
    assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


PLATFORM = {  # layout -> (window, the kernel's call)
    "padded": (7, lambda q, k, v, qi, ki: kernels.cudnn_attention(q, k, v, qi, ki, 7, implementation="xla")),
    "packed": (None, lambda q, k, v, qi, ki: kernels.pallas_attention(q, k, v, qi, block=16, interpret=True)),
}


@pytest.mark.parametrize("kind", list(PLATFORM))
def test_the_platform_kernels_calls_equal_the_einsum_where_they_apply(kind):
    """cuDNN's call (jax.nn.dot_product_attention; its XLA implementation here) on right-padded rows with a
    window, and Pallas's GPU flash attention (interpreted here) on packed sequences with GQA, values and gradients."""
    window, fn = PLATFORM[kind]
    rng = np.random.default_rng(2)
    q_ids, k_ids = layout_ids(kind)
    q = jnp.asarray(rng.normal(size=(2, 44, 2, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 44, 2, 8)), jnp.float32) for _ in range(2))
    real = q_ids.valid[:, :, None, None, None]
    ref = lambda q, k, v: attention.einsum_attention(q, k, v, q_ids, k_ids, window)  # noqa: E731
    got = lambda q, k, v: fn(q, k, v, q_ids, k_ids)  # noqa: E731
    np.testing.assert_allclose(jnp.where(real, got(q, k, v), 0), jnp.where(real, ref(q, k, v), 0), atol=1e-5)
    loss = lambda f: lambda *x: jnp.sum(jnp.where(real, f(*x), 0) ** 2)  # noqa: E731
    for a, b in zip(jax.grad(loss(got), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
