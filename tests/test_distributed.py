"""Faults and scale: resume after SIGKILL, SIGTERM, NaN stop, 1 vs 8 devices, two processes vs one.

(Split from test_train.py so the two slowest files run on different pytest-xdist workers.)
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import xla_env
from helpers import ROOT, TINY, cli, tiny_config, wait_for_checkpoint
from safetensors.numpy import load_file

from dpo_jax.errors import NonFiniteLoss
from dpo_jax.training import train
from dpo_jax.training.outputs import read_history

pytestmark = pytest.mark.slow  # end-to-end runs and processes: not in -m quick


def test_sigkill_then_resume_equals_uninterrupted_and_sigterm_saves(tmp_path):
    slow = ["optim.steps=20", "sft.steps=0", "eval.every=100", "eval.num_prompts=0"]
    ref = cli(tmp_path / "straight", *slow)
    assert ref.returncode == 0, ref.stderr
    # SIGKILL mid-run, then the same command resumes.
    proc = cli(tmp_path / "killed", *slow, wait=False)
    wait_for_checkpoint(proc, tmp_path / "killed/dpo/checkpoints", 5)
    proc.kill()
    proc.wait()
    resumed = cli(tmp_path / "killed", *slow)
    assert resumed.returncode == 0 and "[dpo] resumed from step" in resumed.stdout + resumed.stderr
    a, b = load_file(tmp_path / "straight/hf/model.safetensors"), load_file(tmp_path / "killed/hf/model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # SIGTERM: a checkpoint of the current step, a clean exit, and a resume.
    proc = cli(tmp_path / "term", *slow, wait=False)
    wait_for_checkpoint(proc, tmp_path / "term/dpo/checkpoints", 5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "SIGTERM: saved step" in output and "Traceback" not in output
    assert cli(tmp_path / "term", *slow).returncode == 0
    c = load_file(tmp_path / "term/hf/model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    # Ctrl-C: the same as SIGTERM, exit 130, no traceback.
    proc = cli(tmp_path / "int", *slow, wait=False)
    wait_for_checkpoint(proc, tmp_path / "int/dpo/checkpoints", 5)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Ctrl-C: saved step" in output and "Traceback" not in output
    step = int(re.search(r"Ctrl-C: saved step (\d+)", output).group(1))
    assert (tmp_path / "int/dpo/checkpoints" / str(step)).is_dir()  # resuming from it: SIGTERM's path above
    # Every resumed run logged each step once (the steps redone after a resume replace the lost ones).
    for run in ("killed", "term"):
        history = read_history(tmp_path / run / "metrics.jsonl")
        steps = [r["step"] for r in history if "train/loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] == 20, (run, steps)
        evals = [r["step"] for r in history if "eval/loss" in r]
        assert evals == sorted(set(evals)), (run, evals)  # the step-0 eval too, once


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(
        "optim.learning_rate=1e30",
        "optim.clip_norm=0.0",
        "optim.warmup_steps=0",
        'optim.schedule="constant"',
        "eval.num_prompts=0",
        cache_dir=tmp_path / "cache",
    )
    cfg.export_hf = False
    with pytest.raises(NonFiniteLoss, match=r"NaN/Inf at step (\d+).*Last good checkpoint: ") as err:
        train.train(cfg, tmp_path / "run", devices=jax.devices()[:1])
    assert "None" not in str(err.value)  # no checkpoint yet reads "none yet in <folder> (a rerun starts ...)"
    assert ("none yet in" in str(err.value)) == (not (tmp_path / "run/dpo/checkpoints/5").exists())
    ckpts = sorted(int(p.name) for p in (tmp_path / "run/dpo/checkpoints").iterdir() if p.name.isdigit())
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    assert all(c <= bad for c in ckpts)


def _losses(workdir):
    return np.array([r["train/loss"] for r in read_history(Path(workdir) / "metrics.jsonl") if "train/loss" in r])


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
    common = ("log_every=1", "eval.num_prompts=0", "optim.steps=8", "sft.steps=0", "eval.every=100")
    one = tiny_config(*common, "mesh.data=1", cache_dir=tmp_path / "c1")
    eight = tiny_config(*common, "mesh.data=4", "mesh.fsdp=2", cache_dir=tmp_path / "c8")
    for c in (one, eight):
        c.export_hf = False
    train.train(one, tmp_path / "one", devices=jax.devices()[:1])
    train.train(eight, tmp_path / "eight", devices=jax.devices()[:8])
    np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"), rtol=2e-5, atol=2e-6)


TWO = ("log_every=1", "eval.num_prompts=0", "optim.steps=6", "sft.steps=0", "eval.every=100", "export_hf=False")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The job on one process of 2 devices (the batch split over data=2): what 2 processes must give."""
    workdir = tmp_path_factory.mktemp("single")
    run = cli(workdir, *TWO, env={"XLA_FLAGS": xla_env(2)})
    assert run.returncode == 0, run.stderr
    return workdir


@pytest.mark.parametrize("mesh", ["data", "context"])
def test_two_processes_train_together_like_one(single, tmp_path, mesh):
    """2 processes of 1 device each: the batch split over them (data=2), or every row's tokens split over them
    (context=2: the ring's key/value chunks pass between the processes, each process feeds the whole batch)."""
    common = (*TWO, *(("mesh.context=2",) if mesh == "context" else ()))
    port = 20000 + (os.getpid() + 101 * (mesh == "context")) % 20000
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dpo_jax", "train", "--config", str(ROOT / "configs/default.py"),
             "--workdir", str(tmp_path / "multi"), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}", *(f"--config.{o}" for o in (*TINY, *common))],
            env={**os.environ, "XLA_FLAGS": xla_env(1)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in (0, 1)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "processes | 2" in outputs[0]
    assert ("ring over context=2" in outputs[0]) == (mesh == "context")
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(single), rtol=2e-5, atol=2e-6)
