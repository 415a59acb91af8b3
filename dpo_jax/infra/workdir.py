"""The workdir's files: one run at a time (a lock), writes that are never half done, free-space checks, and the
config a stage's checkpoints were made with (compared on every resume).

Every file a later run trusts (the built-in task's data, ``summary.json``, ``run_config.json``, the Hugging Face
export, the W&B run id) is written under a temporary name and renamed, so a kill or a full disk leaves the old
file or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from dpo_jax.errors import DiskFullError, WorkdirError

# --- Atomic writes ---------------------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync'd, then renamed."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, path, needed=len(data)) from e
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an old folder is removed only
    after the new one is in place), on failure it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, path) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """``safetensors.numpy.save_file`` (torch's metadata), its I/O errors as ``OSError``s (safetensors raises its own
    error type with the OS error in the text): a full disk then reads as one."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        code = errno.ENOSPC if "os error 28" in str(e) or "No space left" in str(e) else errno.EIO
        raise OSError(code, str(e), str(path)) from e


def write_float32_tensors(
    path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], value: Callable[[str], Any]
) -> None:
    """A safetensors file of float32 tensors written one tensor at a time: ``value(name)`` is asked for each in turn
    and dropped once written, so the file never needs all of them in memory (``save_file`` does). The header
    (torch's metadata, offsets in ``shapes``' order, padded to 8 bytes) comes first, from the shapes alone."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape in shapes.items():
            array = np.require(value(name), dtype="<f4", requirements="C")
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: shape {array.shape}, the header says {tuple(shape)}")
            f.write(memoryview(array).cast("B"))


def tree_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- Disk and permission errors -----------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    return shutil.disk_usage(_existing(Path(path).resolve())).free


def os_error(e: OSError, path: str | os.PathLike, *, needed: int | None = None) -> Exception:
    """A user-facing error for a full disk, a read-only or forbidden path; other OSErrors unchanged."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f", about {_mib(needed)} needed" if needed else ""
        return DiskFullError(
            f"disk full in {path}: {_mib(free_bytes(path))} free{need}; free some space and rerun (the last checkpoint "
            "is kept)"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return WorkdirError(f"cannot write in {path}: {os.strerror(e.errno)}; choose a writable --workdir")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # a folder was expected where a file is
        file = _existing(Path(e.filename) if e.filename else Path(path))
        return WorkdirError(f"{file} is a file, not a folder: expected a folder here; choose another --workdir")
    return e


def ensure_free_space(path: str | os.PathLike, needed: int, what: str, reserve_mb: float = 0.0) -> None:
    """Raise ``DiskFullError`` (naming ``path`` and the bytes) unless ``needed`` bytes plus the reserve are free."""
    free = free_bytes(path)
    reserve = int(reserve_mb * 2**20)
    if free < needed + reserve:
        extra = f" + {_mib(reserve)} reserve (checkpoint.reserve_mb)" if reserve else ""
        raise DiskFullError(
            f"not enough disk space in {path}: {_mib(free)} free, {_mib(needed)} needed for {what}{extra}; "
            "free some space and rerun (the last checkpoint is kept)"
        )


def ensure_writable(workdir: str | os.PathLike) -> Path:
    """Create the workdir, or raise a one-line ``WorkdirError`` if that or writing in it is impossible."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise os_error(e, workdir) from e
    return workdir


_TMP = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:\.\w+)?$|^\.write-probe-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid != 0


def clean_stale_tmp(*folders: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that atomic writes of a process that no longer runs left in
    ``folders`` and their sub-folders (a kill between write and rename); returns what was removed."""
    removed = []
    for folder in map(Path, folders):
        for p in [*folder.glob(".*"), *folder.glob("*/.*")]:
            m = _TMP.match(p.name)
            if m and not _alive(int(m.group(1) or m.group(2))):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# --- One run per workdir --------------------------------------------------------------------------------------


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/.lock``. The kernel drops it when its process dies, so a killed
    run's lock never blocks the resume; a live holder is named (pid, host, start time) in the error."""

    def __init__(self, workdir: str | os.PathLike, *, wait: bool = False):
        """``wait``: block until the holder releases it (saying so once), instead of refusing."""
        self.path = Path(workdir) / ".lock"
        self.fd: int | None = None
        self.wait = wait

    def acquire(self) -> WorkdirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, self.path.parent) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']} (since {h['started']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            if self.wait:
                print(f"waiting for {self.path.parent}: in use by {who}", flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by {who}: wait for that run to end, stop it, or use "
                    "another --workdir"
                ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --- The config a stage's checkpoints were made with ---------------------------------------------------------

RUN_CONFIG = "run_config.json"
PENDING_RUN_CONFIG = "run_config.pending.json"  # a resume's changed config, until its first checkpoint
# Fields that never change what is trained (cadence, logging, layout, where shared files live): free on resume.
FREE_ON_RESUME = (
    "eval.", "log_every", "checkpoint.", "wandb.", "export_hf", "peak_flops", "mesh.", "logprobs.", "data.buckets",
    "data.packing", "data.share_prompt", "data.pack_length", "data.max_shapes", "model.attention",
    "model.attention_block", "model.mlp_chunk", "model.context_attention",
    "reference.cache_dir", "sft.dir", "resume.", "rounds.", "reward", "reward_timeout_s",
)  # fmt: skip
# ... except what makes an online run's pairs (rounds.online: every step samples them), and the switch itself
ONLINE_FIELDS = ("rounds.online", "rounds.samples", "rounds.temperature", "rounds.max_new_tokens", "rounds.cut_samples",
                 "reward")  # fmt: skip


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; tuples become lists (as JSON stores them)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v, default=str))
    return out


DIGEST = ":digest"  # a record key "<field>:digest" holds the sha256 of the file or folder that field names


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (their relative names and bytes, in sorted order); of
    several shards joined by ``os.pathsep`` (a hub dataset's split), all of them in order."""
    h = hashlib.sha256()
    for part in str(path).split(os.pathsep):
        root = Path(part)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def _free(key: str, online: bool = False) -> bool:
    if key == "rounds.online" or (online and key in ONLINE_FIELDS):
        return False
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_ON_RESUME)


def _added_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """Fields added after a run was recorded, with the values that reproduce what that run trained on."""
    bco = "bco_pair" in str(saved.get("dpo.loss_type", ""))
    return {
        "dpo.f_divergence_type": "reverse_kl", "dpo.f_alpha_divergence_coef": 0.5, "dpo.discopop_tau": 0.05,
        "dpo.simpo_gamma": 0.5, "dpo.ld_alpha": 1.0, "dpo.use_weighting": False, "dpo.desirable_weight": 1.0,
        "dpo.undesirable_weight": 1.0, "reference.sync": False, "reference.ref_model_mixup_alpha": 0.6,
        "reference.ref_model_sync_steps": 512, "lora.rank": 0, "lora.alpha": 16.0, "lora.targets": "all-linear",
        "lora.base_dtype": "float32", "lora.dropout": 0.0, "reference.hf_path": "", "reward": "",
        "dpo.bco_delta": "batch" if bco else "zero",  # bco_pair used the batch mean before TRL 1.16's zero
        "data.max_row_chars": 0, "reference.bema": False, "reference.bema_update_freq": 400,
        "reference.bema_ema_power": 0.5, "reference.bema_bias_power": 0.2, "reference.bema_lag": 10.0,
        "reference.bema_update_after": 0, "reference.bema_multiplier": 1.0, "reference.bema_min_ema_multiplier": 0.0,
        "reference.bema_ref_model_update_freq": 400, "reference.bema_ref_model_update_after": 0,
        "rounds.online": False,
    }  # fmt: skip


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for every field that differs and matters for training."""
    # a record from before some fields existed (or of a stage that records them only when set, as an SFT stage
    # records lora.* when lora.rank > 0): the values that reproduce what it trained with
    saved = {**{k: v for k, v in _added_fields(saved).items() if k in current}, **saved}
    online = bool(saved.get("rounds.online") or current.get("rounds.online"))
    keys = sorted(set(saved) | set(current))
    recorded = lambda k: not k.endswith(DIGEST) or k in saved  # noqa: E731 (records from before data digests)
    return [
        (k, saved.get(k), current.get(k))
        for k in keys
        if not _free(k, online) and recorded(k) and saved.get(k) != current.get(k)
    ]


def _describe(changes, current) -> str:
    def one(k, old, new):
        if k.endswith(DIGEST):
            field = k[: -len(DIGEST)]
            return f"the contents of {field} ({current.get(field)}: sha256 {str(old)[:12]}… -> {str(new)[:12]}…)"
        return f"{k} {old!r} -> {new!r}"

    return ", ".join(one(*c) for c in changes)


def allowed_changes(spec: str) -> set[str]:
    """``resume.allow_changes`` ("dpo.beta,optim.steps") as a set of field names."""
    return {s.strip() for s in spec.split(",") if s.strip()}


def check_resume_config(
    folder: str | os.PathLike, current: dict[str, Any], *, allow: set[str], step: int | None, changeable
) -> list[tuple[str, Any, Any]]:
    """Compare ``current`` (flattened) with the config saved in ``folder`` and save ``current`` there (with allowed
    changes: once the run writes a checkpoint, ``promote_pending_record``). ``changeable``: the fields whose change
    on resume is meaningful (``dpo_jax.config.CHANGEABLE_ON_RESUME``), allowed when also in ``allow``.

    Returns the allowed changes applied; raises ``WorkdirError`` naming the fields that differ otherwise.
    With no checkpoint yet (``step`` None) the current config simply becomes the record.
    """
    path = Path(folder) / RUN_CONFIG
    changes: list[tuple[str, Any, Any]] = []
    if step is not None and path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None  # a damaged record: the checkpoint is still the source of truth; rewrite it
        if saved is not None:
            changes = config_changes(saved, current)
            field = lambda k: k.removesuffix(DIGEST)  # noqa: E731 (new contents are allowed as a new path is)
            fixed = [c for c in changes if field(c[0]) not in changeable]
            refused = [c for c in changes if field(c[0]) in changeable and field(c[0]) not in allow]
            desc = lambda cs: _describe(cs, current)  # noqa: E731
            if fixed:
                raise WorkdirError(
                    f"config changed since the checkpoint (step {step}) in {folder}: {desc(fixed)}: these fields "
                    "cannot change on resume; rerun with the original values or use a new --workdir"
                )
            if refused:
                names = ",".join(dict.fromkeys(field(k) for k, _, _ in refused))
                raise WorkdirError(
                    f"config changed since the checkpoint (step {step}) in {folder}: {desc(refused)}: rerun with the "
                    f"original values, use a new --workdir, or continue with the new values by adding "
                    f"--config.resume.allow_changes={names}"
                )
    Path(folder).mkdir(parents=True, exist_ok=True)
    text = json.dumps(current, indent=1, sort_keys=True) + "\n"
    pending = Path(folder) / PENDING_RUN_CONFIG
    if changes:  # the checkpoints on disk were made with the record: it changes when a checkpoint is made with these
        atomic_write_text(pending, text)
    else:
        atomic_write_text(path, text)
        pending.unlink(missing_ok=True)
    return changes


def promote_pending_record(folder: str | os.PathLike) -> None:
    """A checkpoint is being made in ``folder``'s stage with a config a resume changed: that config becomes the
    stage's record (``check_resume_config``). A run that stops before saving keeps the old record."""
    pending = Path(folder) / PENDING_RUN_CONFIG
    if pending.exists():
        os.replace(pending, Path(folder) / RUN_CONFIG)
