"""What several test files share: the built-in job made seconds-long (``TINY``, ``tiny_config``), the ``dpo-jax``
command in its own process (``dpo_jax``, ``cli``), a run by an attention kernel against the einsum's
(``assert_run_ends_like_einsum``), and the repository root."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import xla_env
from zygote import ZYGOTE

from dpo_jax.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # overrides that make the built-in job a seconds-long run (at the beta the tests' expectations assume)
    "dpo.beta=0.1",
    "synthetic.n_sft=128",
    "synthetic.n_train=128",
    "synthetic.n_eval=32",
    "sft.steps=10",
    "sft.batch_size=16",
    "optim.steps=20",
    "optim.batch_size=16",
    "eval.every=10",
    "eval.batch_size=16",
    "eval.num_prompts=16",
    "checkpoint.every=5",
    "log_every=5",
    "wandb.enabled=False",
    "model.hidden_size=32",
    "model.intermediate_size=64",
]


def _parse(value: str):
    """A ``--config.x=value`` as the command reads it: True / False, a JSON value, else the string itself."""
    if value in ("True", "False"):
        return value == "True"
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def tiny_config(*extra, cache_dir=None):
    cfg = load_config_file(str(ROOT / "configs/default.py"))
    for item in (*TINY, *extra):
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[leaf] = type(node[leaf])(_parse(value))
    if cache_dir is not None:
        cfg.reference.cache_dir = str(cache_dir)
    return cfg


def dpo_jax(argv: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m dpo_jax <argv>`` to its end, as ``subprocess.run`` gives it (``env``: the whole environment);
    forked from the ``zygote`` (the command's imports done once) where it can be."""
    env = dict(os.environ) if env is None else env
    if ZYGOTE.serves(env):
        return ZYGOTE.run(argv, env, timeout)
    return subprocess.run([sys.executable, "-m", "dpo_jax", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def cli(workdir, *extra, env=None, wait=True):
    """``dpo-jax train`` of the built-in job made tiny (``TINY``) plus ``extra`` overrides, on one device unless
    ``env`` says otherwise. ``wait=False``: a running process (``subprocess.Popen``) to signal or kill."""
    argv = ["train", "--config", str(ROOT / "configs/default.py"), "--workdir", str(workdir),
            *(f"--config.{o}" for o in (*TINY, *extra))]  # fmt: skip
    full_env = {**os.environ, "XLA_FLAGS": xla_env(1), **(env or {})}
    if not wait:
        return subprocess.Popen([sys.executable, "-m", "dpo_jax", *argv], env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return dpo_jax(argv, full_env)


def wait_for_checkpoint(proc, directory: Path, step: int, timeout=240):
    """Orbax renames a step's folder to its plain number only once the save is committed."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
        if done and max(done) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def assert_run_ends_like_einsum(tmp_path, attention: str, block: int, note: str):
    """``dpo-jax train --config.model.attention=<attention> --config.model.attention_block=<block>`` (short: SFT 3,
    DPO 4 steps) ends where the same job ends in-process by the einsum: SFT, train and eval losses within 2e-5, the
    exported weights within 1e-4; its console shows ``note`` (the compile note's kernel)."""
    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from dpo_jax.training import train
    from dpo_jax.training.outputs import read_history

    short = ("sft.steps=3", "optim.steps=4", "eval.every=4", "eval.num_prompts=0", "log_every=1")
    ref = tiny_config(*short, "model.attention=einsum", cache_dir=tmp_path / "cache")
    train.train(ref, tmp_path / "einsum", devices=jax.devices()[:1])
    run = cli(tmp_path / attention, *short, f"model.attention={attention}", f"model.attention_block={block}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert note in run.stdout + run.stderr
    for key in ("sft/loss", "train/loss", "eval/loss"):
        want, got = ([r[key] for r in read_history(tmp_path / d / "metrics.jsonl") if key in r]
                     for d in ("einsum", attention))  # fmt: skip
        assert len(got) == len(want) > 0, key
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=key)
    a, b = (load_file(tmp_path / d / "hf/model.safetensors") for d in ("einsum", attention))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=2e-6, err_msg=key)
