"""The dpo-jax command as a user meets it: every error a user can cause is one line and exit 2; a resume with a
changed config refuses (or continues with the new values when allowed); a full disk keeps the last checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COMMON, xla_env
from helpers import ROOT, TINY, cli, dpo_jax
from safetensors.numpy import load_file, save_file
from test_workdir import tmpfs
from zygote import ZYGOTE

from dpo_jax.data import synthetic


def run(args, env=None):
    return dpo_jax(args, {**os.environ, "XLA_FLAGS": xla_env(1), **(env or {})})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tokenizer folder, valid train/eval files, and a tiny transformers Llama folder with that tokenizer."""
    import transformers

    root = tmp_path_factory.mktemp("inputs")
    task = synthetic.write_task(root / "task", synthetic.TaskConfig(n_sft=4, n_train=64, n_eval=16))
    tok = synthetic.build_tokenizer()
    cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": tok.vocab_size})
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save(root / "model")
    return {"root": root, **task}


def _files(inputs, train=None, **extra):
    args = {
        "task": "files", "data.tokenizer_path": str(inputs["tokenizer"]), "data.train_path": str(train or
        inputs["train"]), "data.eval_path": str(inputs["eval"]), "sft.steps": 0, **extra,
    }  # fmt: skip
    return [f"--config.{k}={v}" for k, v in args.items()]


def _hf_folder(inputs, name, edit):
    """A copy of the tiny model folder with ``edit(folder)`` applied."""
    folder = inputs["root"] / name
    if not folder.exists():
        subprocess.run(["cp", "-r", str(inputs["root"] / "model"), str(folder)], check=True)
        edit(folder)
    return _files(inputs, **{"model.init": "hf", "model.hf_path": str(folder)})


def _edit_tensors(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def _write(inputs, name, data: bytes):
    path = inputs["root"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


GOOD = json.dumps({"prompt": "ab:", "chosen": "abc", "rejected": "mno"}).encode() + b"\n"


def _norm_31(t):
    t["model.norm.weight"] = np.ones(31, np.float32)


def _truncate(f):
    (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000])


# name -> (the arguments that cause it, fragments of the one line it must print)
CASES = {
    "mistyped field": (
        lambda i: ["--config.dpo.bta=0.3"], "unknown config field in --config.dpo.bta", "did you mean --config.dpo.beta"
    ),
    "missing config file": (lambda i: ["--config", "configs/nope.py"], "config file not found in --config: configs/no"),
    "grad_accum=0": (lambda i: ["--config.optim.grad_accum=0"], "config.optim.grad_accum: expected >= 1, got 0"),
    "steps past int32": (
        lambda i: ["--config.optim.steps=3000000000"], "config.optim.steps: expected an integer in [1, 2147483647]"
    ),
    "too few rows": (
        lambda i: _files(i, _write(i, "few.jsonl", GOOD * 5)), "too few valid pairs in", "needs 16 (optim.batch_size)"
    ),
    "empty file": (lambda i: _files(i, _write(i, "empty.jsonl", b"")), "no rows in", "empty.jsonl"),
    "non-UTF-8": (
        lambda i: _files(i, _write(i, "latin.jsonl", GOOD + b'{"prompt": "\xe9"}\n')),
        "latin.jsonl:line 2", f"byte offset {len(GOOD) + 12} (0xe9)",
    ),
    "bad parquet": (lambda i: _files(i, _write(i, "x.parquet", b"PAR1 junk")), "unreadable Parquet file", "x.parquet"),
    "bad save_to_disk": (
        lambda i: _files(i, _write(i, "ds/state.json", b"{").parent), "unreadable state.json in", "/ds"
    ),
    "unsupported architecture": (
        lambda i: _hf_folder(i, "gpt2", lambda f: _edit_config(f, architectures=["GPT2LMHeadModel"])),
        "architectures ['GPT2LMHeadModel'] are not supported", "supported: LlamaForCausalLM",
    ),
    "wrong tensor shape": (
        lambda i: _hf_folder(i, "shape", lambda f: _edit_tensors(f, _norm_31)),
        "tensor model.norm.weight has shape (31,)", "config.json implies (32,)",
    ),
    "missing tensor": (
        lambda i: _hf_folder(i, "missing", lambda f: _edit_tensors(f, lambda t: t.pop("lm_head.weight"))),
        "missing tensors in", "['lm_head.weight']",
    ),
    "truncated safetensors": (
        lambda i: _hf_folder(i, "trunc", _truncate), "invalid or truncated safetensors file", "trunc/model.safetensors"
    ),
    "reward that cannot load": (
        lambda i: ["--config.reward=no_such_module_xyz:f"], "config.reward: expected", "cannot import no_such_module"
    ),
    "max_shapes not an integer": (
        lambda i: ["--config.data.max_shapes=4.5"], "config.data.max_shapes: expected an integer (like its default 4), "
                                                    "got '4.5'",
    ),
    "reference folder missing": (
        lambda i: ["--config.reference.hf_path=/nonexistent"], "config.reference.hf_path: expected '' or a local"
    ),
    "reference of another architecture": (
        lambda i: [f"--config.reference.hf_path={i['root'] / 'model'}"],
        "config.reference.hf_path: expected a model of the policy's architecture; got", "intermediate_size",
    ),
}  # fmt: skip


@pytest.mark.slow
def test_every_user_error_is_one_line_and_exit_2(inputs, tmp_path):
    def argv(name, build):
        args = build(inputs)
        config = [] if "--config" in args else ["--config", str(ROOT / "configs/default.py")]
        overrides = [f"--config.{o}" for o in TINY]
        return ["train", *config, "--workdir", str(tmp_path / name.replace(" ", "_")), *overrides, *args]

    env = {**os.environ, "XLA_FLAGS": xla_env(1)}
    outs = ZYGOTE.run_many([(argv(name, build), env) for name, (build, *_) in CASES.items()])
    for (name, (_, *fragments)), out in zip(CASES.items(), outs, strict=True):
        lines = [x for x in out.stderr.strip().splitlines() if not x.startswith("dpo-jax: warning:")]  # warnings first
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("dpo-jax: "), (name, out.stderr[-2000:])
        assert all(f in lines[0] for f in fragments), (name, lines[0])
    rounds = run(["rounds", "--config", str(ROOT / "configs/rounds.py"), "--workdir", str(tmp_path / "r"),
                  "--config.rounds.reference=sometimes"])  # fmt: skip
    assert rounds.returncode == 2 and rounds.stderr.strip().splitlines() == [
        "dpo-jax: config.rounds.reference: expected 'keep' or 'refresh', got 'sometimes'"
    ]
    verbose = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_jax",
            "train",
            "--config",
            str(ROOT / "configs/default.py"),
            "--workdir",
            str(tmp_path / "v"),
            "--config.optim.grad_accum=0",
            "--verbose",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # a process started as users do
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_read_only_workdir_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as disk:
        out = run(["train", "--config", str(ROOT / "configs/default.py"), "--workdir", str(disk / "run")])
    assert out.returncode == 2
    assert (
        out.stderr.strip() == f"dpo-jax: cannot write in {disk}/run: Read-only file system; choose a writable --workdir"
    )


def _checkpoint_hparams(step_dir: Path) -> dict:
    """The hyper-parameters a checkpoint's steps were trained with (recorded in its meta, not in the state)."""
    return json.loads((step_dir / "meta" / "metadata").read_text())["hparams"]


@pytest.mark.slow
def test_resume_with_a_changed_config_refuses_or_continues_with_the_new_values(tmp_path):
    base = ["optim.steps=10", "sft.steps=5", "eval.num_prompts=0", "export_hf=False"]
    first = cli(tmp_path / "run", *base)
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "run/summary.json").read_text())

    again = cli(tmp_path / "run", *base)  # finished: says so, changes nothing
    assert again.returncode == 0 and "is a finished run" in again.stdout
    assert json.loads((tmp_path / "run/summary.json").read_text())["wall_time_s"] == summary["wall_time_s"]

    refused = cli(tmp_path / "run", *base, "dpo.beta=5.0")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1
    assert "dpo.beta 0.1 -> 5.0" in lines[0] and "--config.resume.allow_changes=dpo.beta" in lines[0]
    model = cli(tmp_path / "run", *base, "model.hidden_size=16")
    assert model.returncode == 2 and "model.hidden_size 32 -> 16: these fields cannot change" in model.stderr

    ckpts = tmp_path / "run/dpo/checkpoints"
    assert _checkpoint_hparams(ckpts / "10")["beta"] == pytest.approx(0.1)
    longer = [*base[1:], "optim.steps=20", "dpo.beta=5.0", "resume.allow_changes=dpo.beta,optim.steps"]
    resumed = cli(tmp_path / "run", *longer)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with dpo.beta = 5.0" in resumed.stdout and "[dpo] resumed from step 10" in resumed.stdout
    assert _checkpoint_hparams(ckpts / "20")["beta"] == pytest.approx(5.0)  # steps 11-20 trained with the new beta
    rows = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(set(train_steps)) and max(train_steps) == 5 + 20  # SFT offset + DPO steps, once each
    assert json.loads((tmp_path / "run/summary.json").read_text())["resume/changes"] == [
        "dpo.beta: 0.1 -> 5.0", "optim.steps: 10 -> 20"
    ]  # fmt: skip
    # A resume with a change that stops on NaN before its first checkpoint: the record stays that of the
    # checkpoints, so the command that made them still runs (once refused: the record had taken the NaN run's values)
    diverge = [*longer[:-1], "optim.steps=30", "optim.learning_rate=1e30",
               "resume.allow_changes=dpo.beta,optim.steps,optim.learning_rate"]  # fmt: skip
    nan = cli(tmp_path / "run", *diverge)
    assert nan.returncode == 1 and "NaN/Inf" in nan.stderr and not (ckpts / "30").exists()
    original = cli(tmp_path / "run", *longer)
    assert original.returncode == 0 and "is a finished run" in original.stdout, original.stderr


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    # 1200k holds the data and two SFT checkpoints (about 280k each) with the save slack (512k), not a third.
    with tmpfs(tmp_path / "disk", "1200k") as disk:
        full = cli(disk / "run", "optim.steps=10", "sft.steps=10", "eval.num_prompts=0", "wandb.enabled=False")
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 2 and str(disk) in lines[-1] and "MiB needed" in lines[-1], full.stderr
        assert lines[-1].startswith("dpo-jax: not enough disk space in")
        assert "Traceback" not in full.stderr
        kept = [p for p in (disk / "run").rglob("checkpoints/*") if p.name.isdigit()]
        assert kept  # the last good checkpoint
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # the user frees space
        resumed = cli(disk / "run", "optim.steps=10", "sft.steps=10", "eval.num_prompts=0", "wandb.enabled=False")
        assert resumed.returncode == 0 and "resumed from step" in resumed.stdout, resumed.stderr


def test_library_tracebacks_are_not_printed_without_verbose(monkeypatch, capfd):
    """Orbax's writer threads report a full disk from each thread and task: without --verbose none of it is
    printed (the run's own error is one line); a library's ordinary warning still is."""
    import logging
    import threading

    from absl import logging as absl_logging

    from dpo_jax import main

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    handler = absl_logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", list(handler.filters))
    monkeypatch.setattr(logging.getLogger("asyncio"), "level", logging.getLogger("asyncio").level)
    main.quiet_library_errors()
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()

    def record(path, message):
        return logging.LogRecord("absl", logging.ERROR, path, 1, message, None, None)

    assert not handler.filter(record("/x/site-packages/orbax/checkpoint/future.py", "ENOSPC"))
    assert handler.filter(record("/x/site-packages/jax/_src/xla_bridge.py", "a JAX warning"))
    assert "ZeroDivisionError" not in capfd.readouterr().err
