"""Workdir: one run at a time, writes that are never half done, full / read-only disks, the resume config check."""

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from dpo_jax.config import CHANGEABLE_ON_RESUME
from dpo_jax.errors import DiskFullError, WorkdirError
from dpo_jax.infra import workdir
from dpo_jax.infra.workdir import (
    WorkdirLock,
    atomic_dir,
    atomic_write_text,
    clean_stale_tmp,
    ensure_free_space,
    ensure_writable,
    promote_pending_record,
    save_tensors,
)

check_resume_config = functools.partial(workdir.check_resume_config, changeable=CHANGEABLE_ON_RESUME)


@contextlib.contextmanager
def tmpfs(path, size, *, readonly=False):
    """A real small (or read-only) filesystem; skipped where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_second_process_is_refused_with_the_holder_named_and_a_dead_holder_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dpo_jax.infra.workdir import WorkdirLock; "
         f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirError) as err:
            WorkdirLock(tmp_path).acquire()
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(err.value) and str(tmp_path) in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WorkdirLock(tmp_path) as lock:  # the killed holder's lock is gone with its process
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid() and lock.fd is not None


def test_atomic_writes_keep_the_old_file_whole_when_the_disk_fills(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as disk:
        target = atomic_write_text(disk / "summary.json", '{"done": true}')
        with pytest.raises(DiskFullError, match=rf"disk full in {disk}/summary\.json.*MiB needed"):
            atomic_write_text(target, "x" * 200_000)
        assert target.read_text() == '{"done": true}' and sorted(p.name for p in disk.iterdir()) == ["summary.json"]
        with pytest.raises(DiskFullError, match=r"not enough disk space in .*small: .* MiB free, 1\.0 MiB needed for"):
            ensure_free_space(disk, 2**20, "a checkpoint")


def test_a_full_disk_during_an_export_or_an_async_checkpoint_is_one_line(tmp_path):
    """safetensors reports ENOSPC as its own error, Orbax from its writer threads: both end as DiskFullError."""
    import jax.numpy as jnp
    import numpy as np

    from dpo_jax.infra import checkpoint

    with tmpfs(tmp_path / "small", "256k") as disk:
        with pytest.raises(DiskFullError, match=rf"disk full in {disk}/hf"), atomic_dir(disk / "hf") as tmp:
            save_tensors({"w": np.zeros((512, 512), np.float32)}, tmp / "model.safetensors")  # 1 MiB
        assert list(disk.iterdir()) == []  # the half-written folder is gone
        ckpt = checkpoint.Checkpointer(disk / "ckpt", every=1, keep=1, name="test")
        state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)}  # 256 KiB
        original, checkpoint.SAVE_SLACK_BYTES = checkpoint.SAVE_SLACK_BYTES, -(2**20)
        try:
            with pytest.raises(DiskFullError, match=rf"disk full in {disk}/ckpt: .*; free some space and rerun"):
                ckpt.save(1, state, {"data_step": 1}, force=True)
                ckpt.wait()
        finally:
            checkpoint.SAVE_SLACK_BYTES = original


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    for target in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(WorkdirError) as err:
            ensure_writable(target)
        assert (
            str(err.value) == f"{tmp_path / 'afile'} is a file, not a folder: expected a folder here; choose "
            "another --workdir"
        )


def test_temporary_files_of_killed_runs_are_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".summary.json.tmp-{dead.pid}").write_text("{")
    (tmp_path / "hf" / f".config.json.tmp-{dead.pid}").parent.mkdir()
    (tmp_path / "hf" / f".config.json.tmp-{dead.pid}").write_text("{")
    (tmp_path / f".hf.tmp-{dead.pid}").mkdir()
    (tmp_path / f".plots.tmp-{dead.pid}.png").write_bytes(b"")
    (tmp_path / f".data.tmp-{os.getpid()}").mkdir()  # a live process's: kept
    (tmp_path / ".lock").write_text("")
    removed = clean_stale_tmp(tmp_path)
    assert len(removed) == 4 and sorted(p.name for p in tmp_path.iterdir()) == [
        f".data.tmp-{os.getpid()}", ".lock", "hf"
    ]  # fmt: skip
    assert list((tmp_path / "hf").iterdir()) == []


def test_a_shared_folder_lock_waits_for_its_holder(tmp_path):
    import threading
    import time

    held = WorkdirLock(tmp_path).acquire()
    got = threading.Event()

    def second():
        with WorkdirLock(tmp_path, wait=True):
            got.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert not got.is_set()  # waits, does not refuse
    held.release()
    t.join(10)
    assert got.is_set()


def test_atomic_dir_replaces_a_folder_only_when_complete(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("old\n")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "data") as tmp:
        (tmp / "train.jsonl").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "data" / "train.jsonl").read_text() == "old\n" and len(list(tmp_path.iterdir())) == 1
    with atomic_dir(tmp_path / "data") as tmp:
        (tmp / "train.jsonl").write_text("new\n")
    assert (tmp_path / "data" / "train.jsonl").read_text() == "new\n" and len(list(tmp_path.iterdir())) == 1


def test_a_read_only_workdir_is_one_clear_error(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as disk, pytest.raises(WorkdirError) as err:
        ensure_writable(disk / "run")
    assert str(err.value) == f"cannot write in {disk}/run: Read-only file system; choose a writable --workdir"


SAVED = {"dpo.beta": 0.1, "optim.steps": 20, "model.hidden_size": 64, "eval.every": 10, "seed": 0}


@pytest.mark.parametrize(
    "change,allow,expected",
    [
        ({"eval.every": 5}, set(), None),  # cadence: free
        ({"dpo.beta": 5.0}, set(), "dpo.beta 0.1 -> 5.0: rerun with the original values, use a new --workdir, "
         "or continue with the new values by adding --config.resume.allow_changes=dpo.beta"),
        ({"dpo.beta": 5.0, "optim.steps": 40}, {"dpo.beta", "optim.steps"}, None),
        ({"dpo.beta": 5.0, "optim.steps": 40}, {"dpo.beta"}, "allow_changes=optim.steps"),
        ({"model.hidden_size": 32}, {"dpo.beta"}, "model.hidden_size 64 -> 32: these fields cannot change on resume"),
        ({"seed": 1}, set(), "seed 0 -> 1: these fields cannot change"),
    ],
)  # fmt: skip
def test_resume_config_check(tmp_path, change, allow, expected):
    assert check_resume_config(tmp_path, SAVED, allow=set(), step=None) == []  # first run: the record is written
    current = {**SAVED, **change}
    if expected is None:
        changes = check_resume_config(tmp_path, current, allow=allow, step=10)
        assert {k for k, _, _ in changes} == {k for k in change if k != "eval.every"}
        # the checkpoints on disk were made with the record: it follows the run once a checkpoint is written
        assert json.loads((tmp_path / "run_config.json").read_text()) == (SAVED if changes else current)
        promote_pending_record(tmp_path)
        assert json.loads((tmp_path / "run_config.json").read_text()) == current
    else:
        with pytest.raises(WorkdirError, match="step 10") as err:
            check_resume_config(tmp_path, current, allow=allow, step=10)
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert json.loads((tmp_path / "run_config.json").read_text()) == SAVED  # a refusal changes nothing


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with WorkdirLock(tmp_path), pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
        WorkdirLock(tmp_path).acquire()
    WorkdirLock(tmp_path).acquire().release()  # released on exit: free again


def test_the_sft_stage_records_its_lora_fields_and_refuses_their_change(tmp_path):
    from helpers import tiny_config

    from dpo_jax.training.runs import stage_records

    def sft_record(*extra):
        (folder, record), *_ = stage_records(tiny_config(*extra), tmp_path).items()
        assert folder.name == "sft"
        return record

    full = sft_record()
    assert not any(k.startswith("lora.") for k in full)  # full fine-tuning: lora.* play no part
    check_resume_config(tmp_path / "sft", full, allow=set(), step=None)
    assert check_resume_config(tmp_path / "sft", sft_record("lora.alpha=32.0"), allow=set(), step=5) == []
    with pytest.raises(WorkdirError, match="lora.rank 0 -> 4: these fields cannot change"):
        check_resume_config(tmp_path / "sft", sft_record("lora.rank=4"), allow=set(), step=5)
    check_resume_config(tmp_path / "lora", sft_record("lora.rank=4"), allow=set(), step=None)
    for change, message in (("lora.alpha=32.0", "lora.alpha 16.0 -> 32.0"), ("lora.rank=8", "lora.rank 4 -> 8")):
        with pytest.raises(WorkdirError, match=message):
            check_resume_config(tmp_path / "lora", sft_record("lora.rank=4", change), allow=set(), step=5)


def test_data_changed_between_stop_and_resume_is_refused_unless_allowed(tmp_path):
    from helpers import tiny_config

    from dpo_jax.training.runs import stage_records

    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    for f in (train, evals):
        f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    paths = ('task="files"', f'data.train_path="{train}"', f'data.eval_path="{evals}"')

    def check(*extra, allow=frozenset()):
        return check_resume_config(
            tmp_path / "dpo", stage_records(tiny_config(*paths, *extra), tmp_path)[tmp_path / "dpo"],
            allow=set(allow), step=10,
        )  # fmt: skip

    check_resume_config(tmp_path / "dpo", stage_records(tiny_config(*paths), tmp_path)[tmp_path / "dpo"],
                        allow=set(), step=None)  # fmt: skip
    assert check() == []  # the same bytes
    train.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')  # one letter of one row
    with pytest.raises(WorkdirError, match=r"the contents of data.train_path \(.*train.jsonl: sha256") as err:
        check()
    assert "--config.resume.allow_changes=data.train_path" in str(err.value) and "\n" not in str(err.value)
    assert [k for k, _, _ in check(allow={"data.train_path"})] == ["data.train_path:digest"]
    record = json.loads((tmp_path / "dpo" / "run_config.json").read_text())
    del record["data.train_path:digest"], record["data.eval_path:digest"]  # a record from before data digests
    (tmp_path / "dpo" / "run_config.json").write_text(json.dumps(record))
    assert check() == []
