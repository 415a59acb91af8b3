"""The experiments that train: the reward-KL frontier end to end at a smoke size."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _csv(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_reward_kl_frontier_smoke(tmp_path):
    from experiments import reward_kl_frontier

    rows = reward_kl_frontier.main(
        ["--config", str(ROOT / "configs/beta_sweep.py:runlocal"), "--samples", "16", "--workdir", str(tmp_path)]
    )
    assert [r["beta"] for r in rows] == [0.03, 0.3]
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert all((tmp_path / f"beta={b:g}" / "summary.json").exists() for b in (0.03, 0.3))  # ordinary runs
    curve = _csv(tmp_path / "best_of_n.csv")
    assert [c["n"] for c in curve][0] == 1 and curve[-1]["n"] == 16
    for c in curve:
        assert c["kl"] == pytest.approx(math.log(c["n"]) - (c["n"] - 1) / c["n"], abs=1e-12)
        assert 0 <= c["kl_ties"] <= c["kl"] + 1e-12  # ties can only lower best-of-N's KL
    rewards = [c["reward"] for c in curve]
    assert all(b >= a - 1e-12 for a, b in zip(rewards, rewards[1:], strict=False))  # more samples, no worse
    for r in _csv(tmp_path / "frontier.csv"):
        if math.isfinite(r["bon_reward_at_kl"]):
            assert min(rewards) <= r["bon_reward_at_kl"] <= max(rewards)
            assert r["dpo_minus_bon"] == pytest.approx(r["reward"] - r["bon_reward_at_kl"])
        assert 0.0 <= r["reward"] <= 1.0 and np.isfinite(r["kl"])
