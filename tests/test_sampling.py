"""KV-cache generation against transformers' greedy generate, full-forward log-probs and NumPy filtering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model
from flax import nnx

from dpo_jax.core import logprobs as lp
from dpo_jax.core import sampling, scoring
from dpo_jax.infra import hf

SAMPLER = ["llama3", "mistral_window", "qwen2"]  # the sampler's own logic (filtering, keys, stops, shapes)
FAMILIES = ["qwen3", "gemma3", "olmo2", "phi3", "qwen3_moe", "mixtral"]  # each family's decoding through the cache


def _pair(name, tmp_path_factory):
    # Phi-3 with an original context longer than the rows here: transformers' generate recomputes its cache when a
    # row crosses it (longrope's factor switch), which a KV-cache sampler does not (dpo_jax.core.sampling says
    # what it does)
    extra = dict(original_max_position_embeddings=24) if name == "phi3" else {}
    model = make_hf_model(name, seed=1, scale=0.5, **extra)
    path = tmp_path_factory.mktemp("gen")
    model.save_pretrained(path)
    return model, hf.load_pretrained(path)[0]


@pytest.fixture(scope="module", params=SAMPLER)
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=SAMPLER + FAMILIES)
def family_pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


def left_padded_prompts(b=4, p=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 97, size=(b, p))
    mask = np.ones((b, p), np.int64)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return np.where(mask == 1, ids, 0), mask


def test_greedy_equals_transformers_generate(family_pair):
    theirs, ours = family_pair
    ids, mask = left_padded_prompts()
    n = 10
    with torch.no_grad():
        expected = theirs.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=2,
        ).numpy()[:, ids.shape[1] :]
    out = sampling.generate(ours, ids, mask, max_new_tokens=n, temperature=0.0, eos_ids=(2,), pad_id=0)
    got = np.asarray(out.tokens_BxN)[:, : expected.shape[1]]
    np.testing.assert_array_equal(got, expected)


def test_greedy_over_prompts_many_attention_blocks_long_equals_transformers(family_pair, tmp_path):
    """The same checkpoint through the blockwise kernel with 8-token blocks: a 16-token left-padded prompt and 6 new
    tokens (3 key blocks) decode as transformers does (Gemma 3's per-layer windows once crashed here)."""
    theirs, _ = family_pair
    theirs.save_pretrained(tmp_path)
    ours = hf.load_pretrained(tmp_path, attention="blockwise", attention_block=8)[0]
    ids, mask = left_padded_prompts(b=3, p=16, seed=2)
    mask[1, :9] = 0  # a row shorter than one block, beside rows two blocks long
    ids = np.where(mask == 1, ids, 0)
    with torch.no_grad():
        expected = theirs.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6, do_sample=False,
            pad_token_id=0, eos_token_id=2,
        ).numpy()[:, ids.shape[1] :]  # fmt: skip
    out = sampling.generate(ours, ids, mask, max_new_tokens=6, temperature=0.0, eos_ids=(2,), pad_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN)[:, : expected.shape[1]], expected)


def test_logps_equal_a_full_forward_of_the_sample(family_pair):
    _, ours = family_pair
    ids, mask = left_padded_prompts(seed=1)
    out = sampling.generate(ours, ids, mask, max_new_tokens=8, temperature=1.0, key=5, eos_ids=(2,))
    tokens = np.concatenate([ids, np.asarray(out.tokens_BxN)], axis=1)
    full_mask = np.concatenate([mask, np.asarray(out.mask_BxN)], axis=1)
    completion = np.concatenate([np.zeros_like(mask), np.asarray(out.mask_BxN)], axis=1)
    logits = ours(jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(full_mask)).logits_BxTxV
    targets, tmask = lp.next_token_targets(jnp.asarray(tokens), jnp.asarray(completion))
    per_token = np.asarray(lp.token_logprobs(logits, jnp.where(tmask, targets, 0)))
    expected = per_token[:, ids.shape[1] - 1 : -1] * np.asarray(out.mask_BxN)
    # float32: the cached decode and the full forward sum in different orders (a mixture's router weights amplify
    # it: 2.02e-5 apart on one host). 1e-4 is ~1e3 ulps of a log-prob of order 1; a wrong position, mask or cache
    # entry moves log-probs by > 1e-2.
    np.testing.assert_allclose(np.asarray(out.logps_BxN), expected, atol=1e-4)
    # teacher-forced, as eval scores samples under the reference: the LM head at the continuation only, streamed
    graphdef, params = nnx.split(ours)
    teacher = scoring.sample_logps(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), out.tokens_BxN,
                                   out.mask_BxN, max_logits_mb=1e-4)  # fmt: skip
    np.testing.assert_allclose(np.asarray(teacher), expected, atol=1e-4)
    # With no truncation and temperature 1, the sampling distribution is the policy.
    np.testing.assert_allclose(np.asarray(out.sampling_logps_BxN), np.asarray(out.logps_BxN), atol=1e-5)


def test_eos_stops_a_row_and_is_kept_in_the_mask(pair):
    _, ours = pair
    ids, mask = left_padded_prompts(b=6, seed=2)
    free = np.asarray(sampling.generate(ours, ids, mask, max_new_tokens=12, temperature=0.0, eos_ids=()).tokens_BxN)
    eos_id = int(free[0, 2])  # row 0 must now stop at its third token (or earlier, if it appeared before)
    out = sampling.generate(ours, ids, mask, max_new_tokens=12, temperature=0.0, eos_ids=(eos_id,), pad_id=0)
    tokens, valid = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
    for row, (row_tokens, row_valid) in enumerate(zip(tokens, valid, strict=True)):
        hits = np.flatnonzero(free[row] == eos_id)
        if hits.size:
            stop = hits[0]
            np.testing.assert_array_equal(row_tokens[: stop + 1], free[row, : stop + 1])
            assert row_valid[: stop + 1].all() and not row_valid[stop + 1 :].any()
            assert (row_tokens[stop + 1 :] == 0).all() and (np.asarray(out.logps_BxN)[row, stop + 1 :] == 0).all()
        else:
            assert row_valid.all()
            np.testing.assert_array_equal(row_tokens, free[row])
    assert not valid[0, 3:].any()


def test_seeded_and_top_k_one_is_greedy(pair):
    _, ours = pair
    ids, mask = left_padded_prompts(seed=3)
    kw = dict(max_new_tokens=6, eos_ids=(), temperature=0.9, top_p=0.95)
    a = sampling.generate(ours, ids, mask, key=11, **kw).tokens_BxN
    b = sampling.generate(ours, ids, mask, key=11, **kw).tokens_BxN
    c = sampling.generate(ours, ids, mask, key=12, **kw).tokens_BxN
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = sampling.generate(ours, ids, mask, max_new_tokens=6, eos_ids=(), temperature=0.0).tokens_BxN
    top1 = sampling.generate(ours, ids, mask, max_new_tokens=6, eos_ids=(), temperature=2.0, top_k=1, key=4)
    np.testing.assert_array_equal(top1.tokens_BxN, greedy)


def test_first_token_frequencies_follow_the_tempered_policy(pair):
    _, ours = pair
    prompt = np.tile(np.array([[5, 9, 13]]), (3000, 1))
    mask = np.ones_like(prompt)
    out = sampling.generate(ours, prompt, mask, max_new_tokens=1, temperature=0.7, key=2, eos_ids=())
    logits = np.asarray(ours(jnp.asarray(prompt[:1])).logits_BxTxV[0, -1], np.float64) / 0.7
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    freq = np.bincount(np.asarray(out.tokens_BxN)[:, 0], minlength=probs.size) / prompt.shape[0]
    assert np.abs(freq - probs).max() < 0.04


def np_filter(logits, temperature, top_k, top_p):
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    # As transformers' warpers: top-p acts on the distribution renormalised after top-k.
    order = np.argsort(-z)
    p = np.where(keep[order], np.exp(z[order] - z.max()), 0.0)
    p /= p.sum()
    before = np.cumsum(p) - p
    nucleus = np.zeros_like(keep)
    nucleus[order[before < top_p]] = True
    return keep & nucleus


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 0.5), (0.7, 3, 1.0), (1.3, 4, 0.8), (1.0, 0, 1.0), (2.0, 6, 0.6)]
)
def test_process_logits_matches_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(4).normal(size=(3, 10)).astype(np.float32) * 2
    out = np.asarray(sampling.process_logits(jnp.asarray(logits), temperature, top_k, top_p))
    for row, filtered in zip(logits, out, strict=True):
        kept = np_filter(row, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(filtered), kept)
        np.testing.assert_allclose(filtered[kept], row[kept] / temperature, rtol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(2, 0.5), (2, 0.9), (2, 0.99), (3, 0.7), (5, 1.0)])
def test_top_k_and_top_p_with_ties_equal_a_sort_of_the_whole_vocabulary(top_k, top_p):
    """Top-p within the top k (only they are sorted) equals the rule on a NumPy sort of the whole filtered
    vocabulary: tokens tied with the k-th stay or go with it, and a token stays when its value is at least the
    smallest of the sorted prefix whose mass before it is < top_p (ties at that value stay too)."""
    logits = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0, -1.0, 2.0],
                       [0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 3.0, -2.0]], np.float32)  # fmt: skip
    out = np.asarray(sampling.process_logits(jnp.asarray(logits), 1.0, top_k, top_p))
    for row, filtered in zip(logits.astype(np.float64), out, strict=True):
        z = np.where(row >= np.sort(row)[::-1][top_k - 1], row, -np.inf)
        desc = np.sort(z[np.isfinite(z)])[::-1]
        p = np.exp(desc - desc.max())
        p /= p.sum()
        threshold = desc[(np.cumsum(p) - p) < top_p].min()
        np.testing.assert_array_equal(np.isfinite(filtered), np.isfinite(z) & (z >= threshold))


def test_inverse_cdf_draws_the_softmax_and_never_a_removed_token():
    logits = np.array([[-np.inf, 1.0, 0.0, -np.inf, 2.0, -1.0, -np.inf]], np.float32)
    probs = np.where(np.isfinite(logits[0]), np.exp(logits[0] - 2.0), 0.0)
    probs /= probs.sum()
    u = np.random.default_rng(0).random(200_000).astype(np.float32)
    tokens = np.asarray(sampling.inverse_cdf(jnp.broadcast_to(jnp.asarray(logits), (u.size, 7)), jnp.asarray(u)))
    freq = np.bincount(tokens, minlength=7) / u.size
    np.testing.assert_allclose(freq, probs, atol=4e-3)  # ~4 standard errors
    edges = np.asarray(sampling.inverse_cdf(jnp.asarray(np.repeat(logits, 3, 0)), jnp.asarray([0.0, 0.999999, 0.5])))
    assert edges[0] == 5 and edges[1] == 1  # u = 0: the last kept token; u -> 1: the first (never a removed one)


def test_bad_sampling_arguments(pair):
    _, ours = pair
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(ours, ids, mask, top_p=0.0)


def test_generation_is_jit_compiled_once_per_shape(pair):
    _, ours = pair
    ids, mask = left_padded_prompts(seed=6)
    before = sampling._generate._cache_size()
    for key in range(3):
        sampling.generate(ours, ids, mask, key=jax.random.PRNGKey(key), max_new_tokens=4, top_p=0.5 + 0.1 * key)
    assert sampling._generate._cache_size() - before <= 1


def test_row_keys_make_each_row_independent_of_its_call(pair):
    """A key per row (as rounds sample): rows sampled four at a time equal the same rows sampled two at a time."""
    _, ours = pair
    ids, mask = left_padded_prompts(seed=4)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(3), jnp.arange(4, dtype=jnp.uint32))
    kw = dict(max_new_tokens=7, eos_ids=(5,), temperature=1.0)
    together = sampling.generate(ours, ids, mask, key=keys, **kw)
    halves = [sampling.generate(ours, ids[s], mask[s], key=keys[s], **kw) for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_array_equal(together.tokens_BxN, np.concatenate([h.tokens_BxN for h in halves]))
    tokens, valid = np.asarray(together.tokens_BxN), np.asarray(together.mask_BxN)
    by_hand = [any(t == 5 and v for t, v in zip(*row, strict=True)) for row in zip(tokens, valid, strict=True)]
    assert sampling.ended(tokens, valid, (5,)).tolist() == by_hand


def test_a_sampling_call_is_sized_to_its_memory_budget():
    """A 49k vocabulary (SmolLM2's): 16 prompts x 4 samples take 64 rows (not 4,096), and a 64 MiB budget gives
    a multiple of 4 rows whose compiled program, by XLA's own memory analysis, fits in it."""
    from flax import nnx

    from dpo_jax.models import ModelConfig, init_decoder

    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2)  # fmt: skip
    assert sampling.rows_per_call(cfg, 24, 8, rows=64, group=4, budget_mb=1e6) == 64
    rows = sampling.rows_per_call(cfg, 24, 8, rows=64, group=4, budget_mb=64)
    assert 4 <= rows < 64 and rows % 4 == 0
    assert sampling.rows_per_call(cfg, 24, 8, rows=64, group=4, budget_mb=0.1) == 4  # one prompt's samples at least
    graphdef, state = nnx.split(init_decoder(cfg))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(0), jnp.arange(rows, dtype=jnp.uint32))
    compiled = sampling._generate.lower(
        graphdef, state, jnp.zeros((rows, 24), jnp.int32), jnp.ones((rows, 24), jnp.int32), keys, jnp.float32(1.0),
        max_new_tokens=8, temperature=1.0, top_k=0, eos_ids=(2,), pad_id=0,
    ).compile()  # fmt: skip
    used = compiled.memory_analysis()
    assert used.temp_size_in_bytes + used.output_size_in_bytes <= 64 * 2**20
