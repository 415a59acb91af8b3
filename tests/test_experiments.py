"""Seed experiments: the finite-action witness (seed 000) and the worked example (seed 002)."""

import itertools

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
