"""The experiments that train: the reward-KL frontier end to end at a smoke size."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end-to-end runs and processes: not in -m quick

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


def test_scale_plans_and_runs_at_smoke_size():
    """experiments/scale.py on a test-sized model: a memory plan over the 8 simulated devices (the train state split
    eight ways), a LoRA plan (XLA:CPU's float32 copies of the bfloat16 base found and set apart), and a timed run
    beside TRL's DPOTrainer (the prepared GPU check, run here on the CPU)."""
    import jax
    from flax import nnx

    from dpo_jax.models import init_decoder
    from experiments import scale

    shapes = jax.eval_shape(lambda: nnx.state(init_decoder(scale.model_config("tiny"))))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    (plan,) = scale.plan("tiny-fsdp8", [256])
    state = 12 * n  # float32 parameters and AdamW's two moments
    assert state / 8 <= plan["args_gb"] * 1e9 <= state / 8 + 2e6 and plan["upcast_gb"] == 0 and plan["fits"]
    (lora,) = scale.plan("tiny-lora", [256])
    assert 0 < lora["upcast_gb"] * 1e9 <= 4 * n and lora["device_gb"] < lora["peak_gb"]
    result = scale.main(["run", "--model", "tiny", "--row", "128", "--pairs", "2", "--steps", "2", "--trl"])
    ours, trl = result["ours"], result["trl"]
    assert ours["pairs"] == 2 * jax.device_count() and ours["pairs_per_s"] > 0 and 0 < ours["mfu"] < 1
    assert trl is not None and trl["pairs_per_s"] > 0 and trl["attention"] == "sdpa"
