"""The documented ways in from outside the package (docs/hooks.md): a hook of one's own handed to ``train``, and
the public losses and log-probs in one's own training loop."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, tiny_config

import dpo_jax
from dpo_jax.infra.checkpoint import Checkpointer
from dpo_jax.training import loop as loop_module
from dpo_jax.training.loop import Hook
from dpo_jax.training.train import train


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_public_names_cover_every_loss_option():
    for name in dpo_jax.__all__:
        assert getattr(dpo_jax, name) is not None
    assert set(dpo_jax.LOSS_TYPES) >= {"sigmoid", "bco_pair", "kto", "aot", "sft", "simpo", "ipo"}
    assert dpo_jax.F_DIVERGENCES[0] == "reverse_kl"


def test_own_loop_example_learns_the_preference_and_keeps_bco_running_moments():
    history, moments = example("own_loop").train(steps=20)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["rewards/accuracies"] == 1.0
    # the running mean of the batch rewards is their plain mean (Chan's update from a vanishing count), by NumPy
    batch_rewards = np.asarray([h["bco/batch_reward"] for h in history], np.float64)
    np.testing.assert_allclose(float(moments.mean), batch_rewards.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(moments.var), batch_rewards.var(), rtol=1e-4, atol=1e-6)
    assert round(float(moments.count)) == 20


@pytest.mark.slow
def test_a_hook_from_outside_runs_at_its_cadence_and_writes_the_members_metrics(tmp_path, monkeypatch):
    cfg = tiny_config("optim.steps=10", "eval.every=5")
    seen = []  # (step, the step of the eval it can read, whether the step's checkpoint is on disk yet)

    def order(loop, step):
        seen.append((step, loop.last_eval[0], (tmp_path / "run/dpo/checkpoints" / str(step)).exists()))

    # a CPU run's state past loop.SYNC_SAVE_BYTES (here: any) is written before the run goes on
    monkeypatch.setattr(loop_module, "SYNC_SAVE_BYTES", 0)
    events = []
    for name in ("save", "wait"):
        original = getattr(Checkpointer, name)

        def record(self, *a, _name=name, _original=original, **kw):
            out = _original(self, *a, **kw)
            events.append((_name, self.name, self.manager.is_saving_in_progress()))
            return out

        monkeypatch.setattr(Checkpointer, name, record)
    step_program = loop_module.StepProgram.__call__
    monkeypatch.setattr(loop_module.StepProgram, "__call__", lambda *a: events.append(("step",)) or step_program(*a))
    hooks = [example("drift_hook").drift_hook(every=4), Hook(order, every=5)]
    summary = train(cfg, tmp_path / "run", hooks=hooks)
    saves = [i for i, e in enumerate(events) if e[:2] == ("save", "dpo")]
    assert len(saves) >= 2 and all(events[i + 1] == ("wait", "dpo", False) for i in saves), events
    # after the eval of its step, before the checkpoint of its step (checkpoint.every=5): what it changes is saved
    assert seen == [(5, 5, False), (10, 10, False)], seen
    assert summary["eval/rewards/accuracies"] >= 0  # the run ended as a run does
    rows = [json.loads(line) for line in Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    drift = {r["step"]: r["dpo/param_drift"] for r in rows if "dpo/param_drift" in r}
    sft = cfg.sft.steps  # the DPO stage logs after the SFT stage's steps
    assert sorted(drift) == [sft + s for s in (0, 4, 8, 10)], sorted(drift)  # at start, every 4 and the last
    assert drift[sft] == 0.0 and all(drift[sft + s] > 0 for s in (4, 8, 10))
    # those synchronous saves read the state in place (``sharding.member_view``, no copy): the checkpoints hold
    # what the same run's asynchronous saves (of a copy) hold, bit for bit
    monkeypatch.undo()
    train(tiny_config("optim.steps=10", "eval.every=5"), tmp_path / "async", hooks=hooks)
    for step in (5, 10):
        saved = [ocp.StandardCheckpointer().restore(tmp_path / run / "dpo/checkpoints" / str(step) / "state")
                 for run in ("run", "async")]  # fmt: skip
        assert jax.tree.structure(saved[0]) == jax.tree.structure(saved[1])
        for a, b in zip(jax.tree.leaves(saved[0]), jax.tree.leaves(saved[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
