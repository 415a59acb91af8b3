"""Preference losses against the seed documents and hand-written NumPy (float64) formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from dpo_jax.core.losses import (
    LOSS_TYPES,
    RunningMoments,
    optimal_soft_margin,
    preference_loss,
    temper_targets,
    update_running_moments,
)

# --- Independent NumPy formulas (TRL's conventions, written out by hand) --------------------------------------------


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_pair_loss(kind, c, r, beta, eps=0.0, delta=0.0):
    """Hard-label loss for chosen/rejected log-ratios c and r."""
    h = c - r
    if kind == "sigmoid":
        return -np_log_sigmoid(beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if kind == "robust":
        return (-np_log_sigmoid(beta * h) * (1 - eps) + np_log_sigmoid(-beta * h) * eps) / (1 - 2 * eps)
    if kind == "exo_pair":
        e = 1e-3 if eps == 0 else eps
        z = beta * h
        return np_sigmoid(z) * (np_log_sigmoid(z) - np.log(1 - e)) + np_sigmoid(-z) * (np_log_sigmoid(-z) - np.log(e))
    if kind == "nca_pair":
        return -np_log_sigmoid(beta * c) - 0.5 * np_log_sigmoid(-beta * c) - 0.5 * np_log_sigmoid(-beta * r)
    if kind == "bco_pair":
        return -np_log_sigmoid(beta * c - delta) - np_log_sigmoid(-(beta * r - delta))
    if kind == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return (1 - np_sigmoid(beta * c)) + np_sigmoid(beta * r)
    if kind == "apo_down":
        return np_sigmoid(beta * c) + (1 - np_sigmoid(beta * h))
    if kind == "discopop":  # tau 0.05
        z = beta * h
        return -np_log_sigmoid(z) * (1 - np_sigmoid(z / 0.05)) + np.exp(-z) * np_sigmoid(z / 0.05)
    if kind == "sigmoid_norm":  # without lengths: on the sums
        return -np_log_sigmoid(beta * h)
    raise AssertionError(kind)


def np_soft_loss(kind, c, r, beta, eps, p, delta=0.0):
    """Expected loss under the label distribution (module docstring of dpo_jax.core.losses)."""
    q = p if kind in ("robust", "exo_pair") else (1 - eps) * p + eps * (1 - p)
    return q * np_pair_loss(kind, c, r, beta, eps, delta) + (1 - q) * np_pair_loss(kind, r, c, beta, eps, delta)


# Types written out above (the rest are checked against TRL's own code in test_losses_trl.py).
PAIR_TYPES = [t for t in LOSS_TYPES if t not in ("sft", "cpo", "simpo", "orpo", "aot", "aot_unpaired", "kto")]
RNG = np.random.default_rng(0)
B = 6
PC, PR, RC, RR = (RNG.normal(-40, 5, size=B) for _ in range(4))


def run(*args, **kw):
    losses, metrics = preference_loss(*(jnp.asarray(a, jnp.float32) for a in args), **kw)
    return np.asarray(losses, np.float64), {k: float(v) for k, v in metrics.items()}


# --- Seed 002: worked example and scenario table ---------------------------------------------------------------


def test_worked_example_matches_seed():
    losses, m = run([-42.1], [-39.5], [-45.2], [-38.7], beta=0.1)
    assert round(m["rewards/chosen"], 3) == 0.310
    assert round(m["rewards/rejected"], 3) == -0.080
    assert round(m["rewards/margins"], 3) == 0.390
    assert round(m["preference_prob"], 3) == 0.596
    assert round(float(losses[0]), 3) == 0.517
    assert m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == pytest.approx(-42.1) and m["logps/rejected"] == pytest.approx(-39.5)


# The seed's five-scenario table (beta = 0.1, reference -45.2 / -38.7). Its prose says the "strongly correct"
# gradient weight is "near zero (0.000)" and the "strongly wrong" one "approaches one (0.993)"; the table's own
# 0.161 and 0.701 are what sigma(-beta h) gives for these log-probs, so the table is what we test.
SCENARIOS = [
    ("strongly correct", -35.0, -45.0, 0.176, 0.161),
    ("weakly correct", -42.1, -39.5, 0.517, 0.404),
    ("uncertain", -41.0, -41.5, 0.403, 0.332),
    ("weakly wrong", -44.0, -38.0, 0.668, 0.488),
    ("strongly wrong", -50.0, -35.0, 1.206, 0.701),
]


@pytest.mark.parametrize("name,pc,pr,loss,weight", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario_table_matches_seed(name, pc, pr, loss, weight):
    losses, m = run([pc], [pr], [-45.2], [-38.7], beta=0.1)
    assert round(float(losses[0]), 3) == loss
    assert round(m["grad_weight"], 3) == weight
    assert m["grad_weight"] + m["preference_prob"] == pytest.approx(1.0, abs=1e-6)


# --- Every loss type against NumPy --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PAIR_TYPES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_pair_losses_match_numpy(kind, beta, eps):
    losses, _ = run(PC, PR, RC, RR, loss_type=kind, beta=beta, label_smoothing=eps)
    c, r = PC - RC, PR - RR
    expected = np_soft_loss(kind, c, r, beta, eps, 1.0)  # bco_pair: delta 0 (TRL 1.16)
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", PAIR_TYPES)
def test_soft_targets_match_numpy(kind):
    p = RNG.uniform(0, 1, size=B)
    losses, _ = run(PC, PR, RC, RR, loss_type=kind, beta=0.3, label_smoothing=0.1, target_probs=p)
    c, r = PC - RC, PR - RR
    np.testing.assert_allclose(losses, np_soft_loss(kind, c, r, 0.3, 0.1, p), rtol=2e-5, atol=2e-5)


def test_conservative_dpo_is_trl_label_smoothing():
    eps, beta = 0.15, 0.2
    losses, _ = run(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    z = beta * ((PC - PR) - (RC - RR))
    np.testing.assert_allclose(losses, -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z), rtol=1e-5)


def test_soft_bradley_terry_target_is_seed_formula():
    p, beta = RNG.uniform(size=B), 0.4
    losses, _ = run(PC, PR, RC, RR, beta=beta, target_probs=p)
    z = beta * ((PC - PR) - (RC - RR))
    np.testing.assert_allclose(losses, -p * np_log_sigmoid(z) - (1 - p) * np_log_sigmoid(-z), rtol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.73, 0.95])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_soft_target_minimised_at_logit_p_over_beta(p, beta):
    def loss_at(h):  # the package's loss as a function of the margin alone
        losses, _ = preference_loss(
            jnp.array([h]), jnp.array([0.0]), jnp.zeros(1), jnp.zeros(1), beta=beta, target_probs=jnp.array([p])
        )
        return float(losses[0])

    found = minimize_scalar(loss_at, bracket=(-5 / beta, 5 / beta), tol=1e-10).x
    expected = np.log(p / (1 - p)) / beta
    assert found == pytest.approx(expected, abs=2e-3 / beta)
    assert float(optimal_soft_margin(p, beta)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ipo_uses_length_averaged_logps():
    """TRL 1.16: ipo averages its own log-ratios; the other terms of a mix and the metrics keep the sums."""
    lc, lr = np.array([3, 5, 8, 2, 9, 4.0]), np.array([4, 4, 6, 7, 1, 3.0])
    losses, m = run(PC, PR, RC, RR, loss_type="ipo+sigmoid", beta=0.1, chosen_lengths=lc, rejected_lengths=lr)
    h = (PC / lc - RC / lc) - (PR / lr - RR / lr)
    expected = (h - 1 / (2 * 0.1)) ** 2 + np_pair_loss("sigmoid", PC - RC, PR - RR, 0.1)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert m["logps/chosen"] == pytest.approx(np.mean(PC), rel=1e-5)


@pytest.mark.parametrize("kind", ["cpo", "simpo", "orpo"])
def test_policy_only_types_soft_targets_match_numpy(kind):
    """The reference-free types on policy log-probs (length-averaged for simpo and orpo), with soft labels."""
    lc, lr = np.array([3, 5, 8, 2, 9, 4.0]), np.array([4, 4, 6, 7, 1, 3.0])
    p, beta, eps, gamma = RNG.uniform(0, 1, size=B), 0.3, 0.1, 0.4
    losses, _ = run(PC, PR, RC, RR, loss_type=kind, beta=beta, label_smoothing=eps, target_probs=p,
                    chosen_lengths=lc, rejected_lengths=lr, simpo_gamma=gamma)  # fmt: skip

    def one(x, y):  # hard-label loss of x winning
        if kind == "cpo":
            return -np_log_sigmoid(beta * (x - y))
        if kind == "simpo":
            z = beta * (x - y) - gamma
            return -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)
        log_odds = (x - y) - (np.log(-np.expm1(x)) - np.log(-np.expm1(y)))
        return -beta * np_log_sigmoid(log_odds)

    x, y = (PC, PR) if kind == "cpo" else (PC / lc, PR / lr)
    q = p if kind == "simpo" else (1 - eps) * p + eps * (1 - p)
    np.testing.assert_allclose(losses, q * one(x, y) + (1 - q) * one(y, x), rtol=2e-5)


def test_weighted_mix_with_sft():
    lc = np.array([3, 5, 8, 2, 9, 4.0])
    losses, _ = run(PC, PR, RC, RR, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5), beta=0.1, chosen_lengths=lc)
    sft_pooled = -PC.sum() / lc.sum()  # TRL's nll_loss: token mean over all chosen tokens
    expected = np_pair_loss("sigmoid", PC - RC, PR - RR, 0.1) + 0.5 * sft_pooled
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    sft_only, _ = run(PC, PR, RC, RR, loss_type="sft", chosen_lengths=lc)
    assert sft_only.mean() == pytest.approx(sft_pooled, rel=1e-5)


def test_reference_free_treats_reference_as_zero():
    losses, m = preference_loss(jnp.asarray(PC), jnp.asarray(PR), beta=0.1, reference_free=True)
    np.testing.assert_allclose(losses, np_pair_loss("sigmoid", PC, PR, 0.1), rtol=1e-5)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1 * PC.mean(), rel=1e-5)


def test_metrics_are_trl_batch_means():
    _, m = run(PC, PR, RC, RR, beta=0.2)
    cr, rr = 0.2 * (PC - RC), 0.2 * (PR - RR)
    assert m["rewards/chosen"] == pytest.approx(cr.mean(), rel=1e-5)
    assert m["rewards/rejected"] == pytest.approx(rr.mean(), rel=1e-5)
    assert m["rewards/margins"] == pytest.approx((cr - rr).mean(), rel=1e-5)
    assert m["rewards/accuracies"] == pytest.approx((cr > rr).mean())
    assert m["preference_prob"] == pytest.approx(np_sigmoid(cr - rr).mean(), rel=1e-5)
    assert m["grad_weight"] == pytest.approx(np_sigmoid(rr - cr).mean(), rel=1e-5)


# --- Numerics, tracing and gradients --------------------------------------------------------------------------------


# discopop's exponential component overflows at margins of -1e4 (as in TRL); orpo needs log-probs <= 0.
@pytest.mark.parametrize("kind", [*(t for t in PAIR_TYPES if t != "discopop"), "cpo", "simpo", ("sigmoid", "sft")])
@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_extreme_margins_are_finite(kind, margin):
    pc = jnp.array([margin / 2, 0.0])
    pr = jnp.array([-margin / 2, margin])

    def total(pc, pr):
        losses, metrics = preference_loss(
            pc,
            pr,
            jnp.zeros(2),
            jnp.zeros(2),
            loss_type=kind,
            beta=0.1,
            label_smoothing=0.1,
            target_probs=jnp.array([0.9, 1.0]),
            chosen_lengths=jnp.array([3.0, 4.0]),
            rejected_lengths=jnp.array([2.0, 5.0]),
        )
        return jnp.sum(losses), metrics

    (value, metrics), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(pc, pr)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_extreme_margin_values_match_numpy():
    h = np.array([1e4, -1e4, 3e3])
    losses, _ = run(h, np.zeros(3), np.zeros(3), np.zeros(3), beta=0.1, label_smoothing=0.05)
    z = 0.1 * h
    np.testing.assert_allclose(losses, -(0.95) * np_log_sigmoid(z) - 0.05 * np_log_sigmoid(-z), rtol=1e-5)


def test_gradient_identity_of_seed():
    """grad of the DPO loss = -beta sigma(-beta h) (grad log pi_w - grad log pi_l) for a tiny softmax policy."""
    key = jax.random.PRNGKey(1)
    theta = jax.random.normal(key, (4, 5))  # a 4-position, 5-token tabular "language model"
    y_w, y_l = jnp.array([0, 3, 1, 4]), jnp.array([2, 3, 0, 0])
    ref_w, ref_l, beta = -6.0, -5.5, 0.3

    def seq_logp(theta, y):
        return jnp.sum(jax.nn.log_softmax(theta, axis=-1)[jnp.arange(4), y])

    def loss(theta):
        losses, _ = preference_loss(
            seq_logp(theta, y_w)[None], seq_logp(theta, y_l)[None], jnp.array([ref_w]), jnp.array([ref_l]), beta=beta
        )
        return losses[0]

    h = (float(seq_logp(theta, y_w)) - ref_w) - (float(seq_logp(theta, y_l)) - ref_l)
    weight = 1.0 / (1.0 + np.exp(beta * h))  # sigma(-beta h) in NumPy
    expected = (
        -beta * weight * (np.asarray(jax.grad(seq_logp)(theta, y_w)) - np.asarray(jax.grad(seq_logp)(theta, y_l)))
    )
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(theta)), expected, rtol=1e-5, atol=1e-7)


def test_hyperparameters_are_traced_one_compile_for_a_sweep():
    traces = []

    @jax.jit
    def step(beta, eps, p):
        traces.append(1)
        losses, _ = preference_loss(
            jnp.asarray(PC),
            jnp.asarray(PR),
            jnp.asarray(RC),
            jnp.asarray(RR),
            beta=beta,
            label_smoothing=eps,
            target_probs=p,
        )
        return losses

    for beta, eps in [(0.1, 0.0), (0.3, 0.1), (1.0, 0.4)]:
        p = RNG.uniform(size=B)
        got = np.asarray(step(jnp.float32(beta), jnp.float32(eps), jnp.asarray(p, jnp.float32)))
        np.testing.assert_allclose(got, np_soft_loss("sigmoid", PC - RC, PR - RR, beta, eps, p), rtol=1e-5)
    assert len(traces) == 1


def test_vmap_over_beta():
    betas = np.array([0.05, 0.1, 0.5, 2.0])
    fn = lambda b: preference_loss(jnp.asarray(PC), jnp.asarray(PR), jnp.asarray(RC), jnp.asarray(RR), beta=b)
    losses_SxB, metrics = jax.vmap(fn)(jnp.asarray(betas, jnp.float32))
    assert losses_SxB.shape == (4, B) and metrics["rewards/margins"].shape == (4,)
    for s, beta in enumerate(betas):
        np.testing.assert_allclose(
            np.asarray(losses_SxB[s]), np_pair_loss("sigmoid", PC - RC, PR - RR, beta), rtol=1e-5
        )


def test_bco_running_moments_match_trl_update():
    """Two batches through RunningMoments equal the NumPy form of TRL's RunningMoments.update."""
    mean, var, count = 0.0, 1.0, 1e-24
    state = RunningMoments.init()
    for xs in (RNG.normal(size=8), RNG.normal(1.0, 2.0, size=8)):
        state = update_running_moments(state, jnp.asarray(xs, jnp.float32))
        d, n = xs.mean() - mean, xs.size
        tot = count + n
        var = (var * count + d**2 * count * n / tot + xs.var() * n) / tot
        mean, count = mean + d * n / tot, tot
    assert float(state.mean) == pytest.approx(mean, rel=1e-5)
    assert float(state.var) == pytest.approx(var, rel=1e-5)
    losses, _ = run(PC, PR, RC, RR, loss_type="bco_pair", beta=0.1, bco_delta=state.mean)
    np.testing.assert_allclose(losses, np_pair_loss("bco_pair", PC - RC, PR - RR, 0.1, delta=mean), rtol=1e-5)


# --- Bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(target_probs=np.array([0.5, 1.2, 0, 0, 0, 0])), "target_probs"),
        (dict(loss_type="dpo"), "unknown loss type 'dpo'"),
        (dict(loss_type=("sigmoid", "ipo"), loss_weights=(1.0,)), "loss_weights"),
        (dict(loss_type="sft"), "chosen_lengths"),
        (dict(chosen_lengths=np.zeros(B)), "chosen_lengths"),
        (dict(loss_type="ipo", chosen_lengths=np.ones(B)), "rejected_lengths"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(jnp.asarray(PC), jnp.asarray(PR), jnp.asarray(RC), jnp.asarray(RR), **kwargs)


def test_missing_reference_is_an_error():
    with pytest.raises(ValueError, match="reference_free"):
        preference_loss(jnp.asarray(PC), jnp.asarray(PR))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        preference_loss(jnp.asarray(PC), jnp.asarray(PR[:3]), jnp.asarray(RC), jnp.asarray(RR))


def test_mask_excludes_padding_pairs_from_metrics_and_batch_statistics():
    mask = np.array([1, 1, 0, 1, 0, 1.0])
    lc = np.array([3, 5, 8, 2, 9, 4.0])
    keep = mask == 1
    _, m = run(PC, PR, RC, RR, beta=0.2, mask=mask)
    cr, rr = 0.2 * (PC - RC), 0.2 * (PR - RR)
    assert m["rewards/margins"] == pytest.approx((cr - rr)[keep].mean(), rel=1e-5)
    assert m["rewards/accuracies"] == pytest.approx((cr > rr)[keep].mean())
    losses, _ = run(PC, PR, RC, RR, loss_type="sft", chosen_lengths=lc, mask=mask)
    assert losses[0] == pytest.approx(-PC[keep].sum() / lc[keep].sum(), rel=1e-5)
    losses, _ = run(PC, PR, RC, RR, loss_type="bco_pair", beta=0.2, mask=mask, bco_delta="batch")
    delta = np.concatenate([cr[keep], rr[keep]]).mean()
    np.testing.assert_allclose(losses, np_pair_loss("bco_pair", PC - RC, PR - RR, 0.2, delta=delta), rtol=1e-5)


def test_tempered_soft_targets():
    """sigmoid(logit(p) / T) against NumPy: T = 1 keeps p, T < 1 sharpens, T > 1 flattens, hard labels stay."""
    p = np.array([0.0, 0.1, 0.5, 0.8, 1.0])
    for temp in (0.25, 1.0, 4.0):
        with np.errstate(divide="ignore"):
            expected = 1 / (1 + np.exp(-(np.log(p) - np.log1p(-p)) / temp))
        np.testing.assert_allclose(np.asarray(temper_targets(p, temp)), expected, rtol=1e-6, atol=1e-7)
    assert float(temper_targets(0.8, 0.25)) == pytest.approx(0.8**4 / (0.8**4 + 0.2**4), rel=1e-6)


def test_bco_running_delta_is_trl_pre_1_0():
    """TRL < 1.0's bco_pair: running.update(batch mean reward), then delta = running.mean (NumPy by hand)."""
    cr, rr = 0.1 * (PC - RC), 0.1 * (PR - RR)
    batch_mean = np.concatenate([cr, rr]).mean()
    prev = RunningMoments(jnp.float32(0.7), jnp.float32(2.0), jnp.float32(3.0))  # three earlier batch means
    losses, m = run(PC, PR, RC, RR, loss_type="bco_pair", beta=0.1, bco_delta=prev)
    delta = (0.7 * 3 + batch_mean) / 4
    np.testing.assert_allclose(losses, np_pair_loss("bco_pair", PC - RC, PR - RR, 0.1, delta=delta), rtol=1e-5)
    assert m["bco/batch_reward"] == pytest.approx(batch_mean, rel=1e-5) and m["bco/delta"] == pytest.approx(delta)
    first, _ = run(PC, PR, RC, RR, loss_type="bco_pair", beta=0.1, bco_delta=RunningMoments.init())
    np.testing.assert_allclose(first, np_pair_loss("bco_pair", PC - RC, PR - RR, 0.1, delta=batch_mean), rtol=1e-5)


def test_per_token_log_ratio_metrics():
    lc, lr = np.array([3, 5, 8, 2, 9, 4.0]), np.array([4, 4, 6, 7, 1, 3.0])
    _, m = run(PC, PR, RC, RR, chosen_lengths=lc, rejected_lengths=lr)
    assert m["logratio/chosen_per_token"] == pytest.approx(np.mean((PC - RC) / lc), rel=1e-5)
    assert m["logratio/rejected_per_token"] == pytest.approx(np.mean((PR - RR) / lr), rel=1e-5)
