"""Seed experiments: the finite-action witness (seed 000) and the worked example (seed 002)."""

import itertools
import json
import shutil
import subprocess

import numpy as np
import pytest

from experiments import finite_action_witness as witness


def closed_form_optimum(ref, reward, beta):
    pi = np.asarray(ref) * np.exp(np.asarray(reward) / beta)
    return pi / pi.sum()


@pytest.mark.parametrize("x64", [False, True])
def test_dpo_recovers_kl_regularised_optimum(x64):
    ref, reward, beta = witness.SEED_REFERENCE, witness.SEED_REWARD, witness.SEED_BETA
    pi = witness.train_tabular_policy(ref, reward, beta, x64=x64)
    np.testing.assert_allclose(pi, closed_form_optimum(ref, reward, beta), atol=1e-6)
    gap_tol = 1e-6 if x64 else 1e-5  # float32 log(0.025) carries ~1e-7 relative error
    for i, j in itertools.combinations(range(3), 2):
        gap = beta * ((np.log(pi[i]) - np.log(ref[i])) - (np.log(pi[j]) - np.log(ref[j])))
        assert gap == pytest.approx(reward[i] - reward[j], abs=gap_tol)


@pytest.mark.parametrize("beta", [0.2, 2.0])
def test_other_betas_and_four_actions(beta):
    ref, reward = (0.1, 0.4, 0.3, 0.2), (0.5, -0.3, 1.2, 0.0)
    pi = witness.train_tabular_policy(ref, reward, beta, steps=20000, learning_rate=0.5, x64=True)
    np.testing.assert_allclose(pi, closed_form_optimum(ref, reward, beta), atol=1e-6)


def test_script_reports_success(capsys):
    assert witness.main([]) == 0
    out = capsys.readouterr().out
    assert "recovered pi* to 1e-6: yes" in out and "KL(pi || ref)" in out


# Copied from seed 002's printed console output (Out[7] and Out[11]).
SEED_CONSOLE = """\
Chosen implicit reward: 0.310
Rejected implicit reward: -0.080
Reward difference: 0.390
Preference probability: 0.596
DPO loss: 0.517
Model strongly correct      0.176      0.161
Model weakly correct        0.517      0.404
Model uncertain             0.403      0.332
Model weakly wrong          0.668      0.488
Model strongly wrong        1.206      0.701
"""


def test_worked_example_script_prints_the_seed_console(capsys):
    from experiments import seed_worked_example

    seed_worked_example.main()
    printed = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    for line in SEED_CONSOLE.splitlines():
        assert " ".join(line.split()) in printed, line


# --- Seed figures, ratio machine, best-of-N (experiments 1, 2, 3) -------------------------------------------


def _csv(path):
    import csv

    with open(path) as f:
        return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _num(v):
    try:
        return float(v)
    except ValueError:
        return v


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


@pytest.mark.slow
def test_seed_figures_match_numpy(tmp_path):
    from experiments import seed_figures

    seed_figures.main(["--out", str(tmp_path)])
    assert (tmp_path / "seed_figures.png").stat().st_size > 10_000
    ref, reward = np.array(seed_figures.REF_PROBS), np.array(seed_figures.REWARDS)
    rows = _csv(tmp_path / "optimal_policy.csv")
    for beta in seed_figures.BETAS:
        expected = ref * np.exp(reward / beta) / np.sum(ref * np.exp(reward / beta))
        got = [r["optimal"] for r in rows if r["beta"] == beta]
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    curves = _csv(tmp_path / "loss_curves.csv")
    z = np.array([r["reward_difference"] for r in curves])
    np.testing.assert_allclose([r["loss"] for r in curves], np.log1p(np.exp(-z)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r["preference_prob"] for r in curves], _sigmoid(z), atol=1e-5)
    np.testing.assert_allclose([r["grad_weight"] for r in curves], _sigmoid(-z), atol=1e-5)
    # The seed's table (SEED_CONSOLE above), to its three printed decimals.
    table = {" ".join(line.split()[:-2]): line.split()[-2:] for line in SEED_CONSOLE.splitlines()[5:]}
    for r in _csv(tmp_path / "scenarios.csv"):
        assert [f"{r['loss']:.3f}", f"{r['grad_weight']:.3f}"] == table[r["scenario"]]
    worked = _csv(tmp_path / "worked_example.csv")
    assert [round(r["implicit_reward"], 3) for r in worked] == [0.31, -0.08]
    for r in _csv(tmp_path / "beta_effect.csv"):  # h = 3.1 - (-0.8) = 3.9 nats
        assert r["margin"] == pytest.approx(3.9 * r["beta"], rel=1e-5)
        assert r["preference_prob"] == pytest.approx(_sigmoid(3.9 * r["beta"]), abs=1e-6)


def _ratio_numpy(q, p, beta):
    """The ratio machine by hand: log-odds, winner probability, DPO probability, binary KL."""
    log_odds = np.log(q / (1 - q)) + np.log(p / (1 - p)) / beta
    log_w, log_l = -np.logaddexp(0, -log_odds), -np.logaddexp(0, log_odds)  # log pi(y_w), log pi(y_l), stably
    pw = np.exp(log_w)
    h = (log_w - np.log(q)) - (log_l - np.log1p(-q))
    kl = pw * (log_w - np.log(q)) + np.exp(log_l) * (log_l - np.log1p(-q))
    return {"required_log_odds": log_odds, "policy_winner_prob": pw, "dpo_prob": _sigmoid(beta * h), "kl": kl}


def test_ratio_machine_csv_and_figure(tmp_path):
    from experiments import ratio_machine

    rows = ratio_machine.main(["--out", str(tmp_path)])
    assert (tmp_path / "ratio_machine.png").stat().st_size > 10_000
    assert len(_csv(tmp_path / "ratio_machine.csv")) == len(rows) == 5 * 14 * 4
    for r in rows:
        expected = _ratio_numpy(r["q_ref"], r["p"], r["beta"])
        assert r["required_log_odds"] == pytest.approx(expected["required_log_odds"], rel=1e-5, abs=1e-5)
        assert r["policy_winner_prob"] == pytest.approx(expected["policy_winner_prob"], abs=1e-5)  # float32 h
        assert r["dpo_prob"] == pytest.approx(r["p"], abs=1e-5)  # the optimum's DPO probability is the target
        assert r["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-6)
    html = (tmp_path / "ratio_machine.html").read_text()
    assert "__CHECKS__" not in html and "http" not in html  # self-contained: nothing fetched


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's JavaScript")
def test_ratio_machine_page_javascript_agrees(tmp_path):
    from experiments import ratio_machine

    ratio_machine.write_html(tmp_path / "page.html")
    script = (tmp_path / "page.html").read_text().split("<script>")[1].split("</script>")[0]
    points = [(0.3, 0.9, 0.5), (0.05, 0.99, 0.1), (0.8, 0.2, 2.0), (0.5, 0.5, 1.0)]
    probe = script.split("for (const id of")[0] + (
        f"\nconsole.log(JSON.stringify({{worst: selfCheck(), "
        f"points: {json.dumps(points)}.map(([q, p, b]) => ratioMachine(q, p, b))}}));"
    )
    (tmp_path / "probe.js").write_text(probe)
    out = json.loads(
        subprocess.run(["node", str(tmp_path / "probe.js")], capture_output=True, text=True, check=True).stdout
    )
    assert out["worst"] < 1e-4
    for (q, p, b), got in zip(points, out["points"], strict=True):
        for key, value in _ratio_numpy(q, p, b).items():
            assert got[key] == pytest.approx(float(value), rel=1e-9, abs=1e-12), key


def test_best_of_n_estimators_against_enumeration():
    from dpo_jax.research import best_of_n

    rng = np.random.default_rng(0)
    r = rng.integers(0, 5, size=(3, 7)).astype(float)  # with ties
    for n in (1, 2, 3, 7):
        brute = [np.mean([max(c) for c in itertools.combinations(row, n)]) for row in r]
        np.testing.assert_allclose(best_of_n.expected_max(r, [n])[:, 0], brute, rtol=1e-12)
    # Distinct rewards, many small atoms: the exact best-of-N KL tends to log N - (N - 1) / N.
    m = 20000
    pi_n = best_of_n.exact_bon_policy(np.full(m, 1 / m), rng.permutation(m), 16)
    assert np.sum(pi_n * np.log(pi_n * m)) == pytest.approx(np.log(16) - 15 / 16, rel=1e-3)
    # Tied rewards: enumerate all N-tuples (ties broken uniformly among the tied samples).
    p, levels, n = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 1.0, 2.0]), 3
    bon = np.zeros(4)
    for t in itertools.product(range(4), repeat=n):
        top = [i for i in t if levels[i] == max(levels[list(t)])]
        for i in top:
            bon[i] += np.prod(p[list(t)]) / len(top)
    samples = np.repeat(levels, (p * 1000).astype(int))
    assert best_of_n.bon_kl_levels(samples, [n])[0] == pytest.approx(np.sum(bon * np.log(bon / p)), rel=1e-9)
    assert best_of_n.bon_kl_levels(samples, [n])[0] < best_of_n.bon_kl(n)  # ties: below the continuous bound
    np.testing.assert_allclose(best_of_n.bon_n_at_kl(best_of_n.bon_kl([1.0, 2.5, 300.0])), [1.0, 2.5, 300.0], rtol=1e-6)
