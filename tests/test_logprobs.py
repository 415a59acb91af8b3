"""Log-prob module against NumPy float64 log-softmax, and the chunked path against the naive one."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dpo_jax.core import logprobs as lp


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def random_problem(b=3, t=7, d=16, v=37, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    head = (rng.normal(size=(d, v)) * 0.5).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    targets = np.where(mask, targets, -100)  # padding ids outside the vocabulary must not matter
    return hidden, head, targets, mask


def test_token_logprobs_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    got = np.asarray(lp.token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    expected = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32


def test_bfloat16_logits_are_scored_in_float32():
    """Large bf16 logits: the result equals float64 math on the same bf16 values, not bf16 math."""
    rng = np.random.default_rng(2)
    logits_bf16 = (rng.normal(size=(2, 6, 300)) * 8 + 2000).astype(ml_dtypes.bfloat16)
    targets = rng.integers(0, 300, size=(2, 6))
    got = np.asarray(lp.token_logprobs(jnp.asarray(logits_bf16), jnp.asarray(targets)))
    expected = np.take_along_axis(np_log_softmax(logits_bf16.astype(np.float64)), targets[..., None], -1)[..., 0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # A bf16 log-softmax would be off by O(1) here: bf16 spacing at 2000 is 16.
    assert np.all(np.isfinite(got))


def test_next_token_targets_shift_by_hand():
    tokens = jnp.array([[5, 6, 7, 8], [1, 2, 3, 0]])
    loss_mask = jnp.array([[0, 0, 1, 1], [0, 1, 1, 0]])
    targets, mask = lp.next_token_targets(tokens, loss_mask)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 0], [2, 3, 0, 0]])
    np.testing.assert_array_equal(mask, [[False, True, True, False], [True, True, False, False]])


def test_sequence_logprobs_sums_counts_and_means():
    hidden, head, targets, mask = random_problem()
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), head)
    sums, counts = lp.sequence_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    logp = np_log_softmax(logits)
    for b in range(mask.shape[0]):
        pos = np.flatnonzero(mask[b])
        expected = sum(logp[b, t, targets[b, t]] for t in pos)
        assert float(sums[b]) == pytest.approx(expected, rel=1e-5)
        assert float(counts[b]) == len(pos)
    means = lp.sequence_mean_logprobs(sums, counts)
    np.testing.assert_allclose(np.asarray(means), np.asarray(sums) / mask.sum(-1), rtol=1e-6)


@pytest.mark.parametrize(
    "shape,token_chunk,vocab_chunk",
    [
        ((3, 7, 16, 37), 4, 8),  # remainders in both tokens and vocabulary
        ((2, 8, 16, 64), 16, 16),  # exact division
        ((2, 5, 8, 50), 1024, 8192),  # chunks larger than the problem
        ((1, 9, 4, 13), 1, 1),  # degenerate chunks
    ],
)
def test_chunked_matches_naive_value_and_gradient(shape, token_chunk, vocab_chunk):
    b, t, d, v = shape
    hidden, head, targets, mask = random_problem(b, t, d, v, seed=sum(shape))
    targets, mask, hidden, head = map(jnp.asarray, (targets, mask, hidden, head))
    weights = jnp.linspace(0.5, 1.5, b)  # a non-uniform cotangent per sequence

    def naive(h, w):
        sums, _ = lp.sequence_logprobs(jnp.einsum("btd,dv->btv", h, w), targets, mask)
        return jnp.sum(weights * sums)

    def chunked(h, w):
        sums, _ = lp.chunked_sequence_logprobs(h, w, targets, mask, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        return jnp.sum(weights * sums)

    v_naive, g_naive = jax.value_and_grad(naive, (0, 1))(hidden, head)
    v_chunk, g_chunk = jax.jit(jax.value_and_grad(chunked, (0, 1)))(hidden, head)
    assert float(v_chunk) == pytest.approx(float(v_naive), rel=1e-5)
    for a, b_ in zip(g_chunk, g_naive, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)


def test_chunked_bfloat16_inputs_close_to_float32():
    hidden, head, targets, mask = random_problem(2, 6, 32, 70, seed=5)
    args = (jnp.asarray(targets), jnp.asarray(mask))
    sums32, _ = lp.chunked_sequence_logprobs(jnp.asarray(hidden), jnp.asarray(head), *args, vocab_chunk=16)
    sums16, _ = lp.chunked_sequence_logprobs(
        jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(head, jnp.bfloat16), *args, vocab_chunk=16
    )
    assert sums16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sums16), np.asarray(sums32), rtol=3e-2, atol=0.1)
    g = jax.grad(lambda h: lp.chunked_sequence_logprobs(h, jnp.asarray(head, jnp.bfloat16), *args)[0].sum())(
        jnp.asarray(hidden, jnp.bfloat16)
    )
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_chunked_gradient_never_holds_full_logits():
    """Compiled temporaries of value+grad stay far below one [B, T, V] float32 logits buffer."""
    b, t, d, v = 2, 256, 64, 32768
    spec = jax.ShapeDtypeStruct
    args = (spec((b, t, d), jnp.float32), spec((d, v), jnp.float32), spec((b, t), jnp.int32), spec((b, t), bool))

    def chunked(h, w, tg, m):
        return lp.chunked_sequence_logprobs(h, w, tg, m, token_chunk=128, vocab_chunk=4096)[0].sum()

    def naive(h, w, tg, m):
        return lp.sequence_logprobs(jnp.einsum("btd,dv->btv", h, w), tg, m)[0].sum()

    logits_bytes = b * t * v * 4
    temp = {
        f.__name__: jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes
        for f in (chunked, naive)
    }
    assert temp["naive"] >= logits_bytes  # the check can fail: the naive path does hold the logits
    assert temp["chunked"] < logits_bytes / 8


def test_token_kl_matches_numpy():
    rng = np.random.default_rng(3)
    p_logits, q_logits = (rng.normal(scale=2.0, size=(2, 4, 9)).astype(np.float32) for _ in range(2))
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    got = np.asarray(lp.token_kl(jnp.asarray(p_logits), jnp.asarray(q_logits), jnp.asarray(mask)))
    lp_, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
    expected = np.where(mask, (np.exp(lp_) * (lp_ - lq)).sum(-1), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(got[mask] > 0)
    same = lp.token_kl(jnp.asarray(p_logits), jnp.asarray(p_logits + 7.0), jnp.asarray(mask))  # shift-invariant
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-5)


def test_chunked_token_kl_matches_numpy_and_never_holds_all_logits():
    """Eval's exact KL from hidden states through two heads, in chunks of tokens (13 tokens, chunks of 4): equal to
    NumPy's full-vocabulary KL; at 2,048 tokens x 4,096 vocabulary its temporaries stay far below [N, V]."""
    rng = np.random.default_rng(5)
    n, d, v = 13, 6, 50
    hp, hq = (rng.normal(size=(n, d)).astype(np.float32) for _ in range(2))
    wp, wq = (rng.normal(size=(d, v)).astype(np.float32) for _ in range(2))
    mask = rng.random(n) < 0.7
    chunk_mb = 4 * 4 * v / 2**20  # four tokens' logits

    def kl(hp, hq, mask, wp, wq, mb):
        return lp.chunked_token_kl(lambda h: h @ wp, lambda h: h @ wq, hp, hq, mask, vocab_size=wp.shape[1],
                                   max_logits_mb=mb)  # fmt: skip

    got = np.asarray(kl(*map(jnp.asarray, (hp, hq, mask, wp, wq)), chunk_mb))
    lp_, lq = np_log_softmax(hp @ wp), np_log_softmax(hq @ wq)
    np.testing.assert_allclose(got, np.where(mask, (np.exp(lp_) * (lp_ - lq)).sum(-1), 0.0), rtol=1e-5, atol=1e-6)
    n, d, v = 2048, 16, 4096
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, d), (n, d))] + [jax.ShapeDtypeStruct((n,), bool)]
    args += [jax.ShapeDtypeStruct((d, v), jnp.float32)] * 2
    temp = {
        mb: jax.jit(functools.partial(kl, mb=mb)).lower(*args).compile().memory_analysis().temp_size_in_bytes
        for mb in (1.0, 1e6)
    }
    assert temp[1e6] >= n * v * 4  # the check can fail: one chunk of all tokens holds the logits
    assert temp[1.0] < n * v * 4 / 4


@pytest.mark.parametrize("max_logits_mb", [256.0, 0.0])  # materialised, streamed
@pytest.mark.parametrize("vocab_axis", [1, 0])
def test_head_log_sum_sq_probs_matches_numpy(max_logits_mb, vocab_axis):
    """WPO's log sum_v p_v^2 per row, against NumPy on the full logits, with no gradient."""
    rng = np.random.default_rng(3)
    h, w = rng.normal(size=(13, 8)).astype(np.float32), rng.normal(size=(8, 37)).astype(np.float32)
    logits = h.astype(np.float64) @ w.astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    expected = np.logaddexp.reduce(2 * logp, axis=-1)
    got = lp.head_log_sum_sq_probs(jnp.asarray(h), jnp.asarray(w if vocab_axis else w.T), token_chunk=4,
                                   vocab_chunk=10, max_logits_mb=max_logits_mb, vocab_axis=vocab_axis)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(lp.head_log_sum_sq_probs(x, jnp.asarray(w), max_logits_mb=max_logits_mb)))
    assert np.all(np.asarray(grad(jnp.asarray(h))) == 0)


@pytest.mark.parametrize("max_logits_mb", [256.0, 0.0])  # materialised (logits kept), streamed
@pytest.mark.parametrize("vocab_axis", [1, 0])  # the head [D, V]; a tied embedding [V, D] as stored
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_token_logprobs_value_and_gradient_match_numpy(max_logits_mb, vocab_axis, softcap):
    """The scored-token head's log-probs and both gradients against NumPy float64: d logp_n / d logits_n =
    onehot(t_n) - softmax_n, chained through logits = h w by hand (and through cap * tanh(z / cap) when capped),
    with the head given in either layout (its gradient in the same layout)."""
    rng = np.random.default_rng(4)
    h, w = rng.normal(size=(13, 8)).astype(np.float32), rng.normal(size=(8, 37)).astype(np.float32)
    t, g = rng.integers(0, 37, size=13), rng.normal(size=13)
    z = h.astype(np.float64) @ w.astype(np.float64)
    logits = softcap * np.tanh(z / softcap) if softcap else z
    logp = np_log_softmax(logits)
    d_logits = g[:, None] * (np.eye(37)[t] - np.exp(logp))
    if softcap:
        d_logits = d_logits * (1.0 - np.tanh(z / softcap) ** 2)

    def f(h_, w_):
        out = lp.head_token_logprobs(h_, w_, jnp.asarray(t), token_chunk=4, vocab_chunk=10, max_logits_mb=max_logits_mb,
                                     softcap=softcap, vocab_axis=vocab_axis)  # fmt: skip
        return jnp.sum(jnp.asarray(g, jnp.float32) * out), out

    w_in = w if vocab_axis else np.ascontiguousarray(w.T)
    (_, got), (gh, gw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(jnp.asarray(h), jnp.asarray(w_in))
    np.testing.assert_allclose(np.asarray(got), logp[np.arange(13), t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gh), d_logits @ w.T.astype(np.float64), rtol=1e-4, atol=1e-5)
    expected_gw = h.T.astype(np.float64) @ d_logits
    np.testing.assert_allclose(np.asarray(gw), expected_gw if vocab_axis else expected_gw.T, rtol=1e-4, atol=1e-5)


def test_the_kept_logits_budget_is_sized_from_the_device():
    """logprobs.max_logits_mb=-1: 256 MiB on a CPU, 1/32 of an accelerator's memory; a set value as set."""
    from dpo_jax.infra import throughput

    class H200:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 141 * 10**9}

    assert throughput.logits_budget_mb(-1.0) == 256.0  # this host's CPU
    assert throughput.logits_budget_mb(-1.0, H200()) == pytest.approx(141e9 / 32 / 2**20)
    assert throughput.logits_budget_mb(64.0, H200()) == 64.0


def test_the_host_peak_is_measured_once_or_read_from_the_environment(monkeypatch):
    """On a CPU the MFU's denominator is the host's measured matmul peak, or the figure $DPO_JAX_HOST_PEAK_FLOPS
    gives (what the suite sets once for all its runs); a figure that is not a positive number is one clear error."""
    from dpo_jax.errors import UserError
    from dpo_jax.infra import throughput

    monkeypatch.setenv(throughput.HOST_PEAK_ENV, "5e10")
    peak, source = throughput.peak_flops()
    assert peak == 5e10 * jax.process_count() and throughput.HOST_PEAK_ENV in source
    assert throughput.peak_flops(2e9) == (2e9 * jax.device_count(), "config peak_flops")
    for bad in ("fast", "0", "-3e9"):
        monkeypatch.setenv(throughput.HOST_PEAK_ENV, bad)
        with pytest.raises(UserError, match=f"{throughput.HOST_PEAK_ENV}: expected a positive"):
            throughput.peak_flops()
    monkeypatch.delenv(throughput.HOST_PEAK_ENV)
    measured, source = throughput.peak_flops()
    assert source == "measured float32 matmul peak of this host"
    assert measured == throughput.measured_matmul_peak() * jax.process_count()
    assert np.isfinite(measured) and measured > 0


def test_the_host_peak_is_measured_inside_a_runs_context_mesh():
    """A run over a context axis measures the host's peak inside its mesh (``jax.set_mesh``): the measurement runs on
    the first device alone, not as a program of the run's mesh (once a crash of every such run outside the suite)."""
    from dpo_jax.infra import sharding, throughput

    with jax.set_mesh(sharding.make_mesh(data=2, context=4)):
        assert throughput.measured_matmul_peak.__wrapped__(n=64, repeats=1) > 0
