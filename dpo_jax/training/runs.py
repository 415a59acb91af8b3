"""A run's files and records: its writers, its stages' checkpointers and config records (checked on every resume),
its locks, its summary; and the barrier processes of one run meet at."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from dpo_jax.config import CHANGEABLE_ON_RESUME, SFT_FIELDS
from dpo_jax.infra import checkpoint
from dpo_jax.infra.logging import JsonlWriter, MultiWriter, WandbWriter, Writer
from dpo_jax.infra.workdir import DIGEST, WorkdirLock, allowed_changes, check_resume_config, file_digest, flatten


def barrier(name: str) -> None:
    """Every process of the run waits here (nothing to wait for with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def make_writer(cfg, workdir: Path) -> Writer:
    """JSONL (and W&B if enabled) on process 0; nothing elsewhere."""
    if jax.process_index() != 0:
        return Writer()
    writers = [JsonlWriter(workdir / "metrics.jsonl")]
    if cfg.wandb.enabled:
        writers.append(WandbWriter(cfg.wandb, workdir, cfg.to_dict(), job_type="train"))
    return MultiWriter(writers)


def stage_checkpointer(cfg, workdir: Path, name: str, population: bool = False) -> checkpoint.Checkpointer:
    """A stage's checkpoints; a population member keeps at least two, so a kill between two members' saves always
    leaves a step they share (``checkpoint.restore_common``)."""
    root = Path(cfg.sft.dir) if name == "sft" and cfg.sft.get("dir") else workdir
    c = cfg.checkpoint
    keep = max(c.keep, 2) if population else c.keep
    return checkpoint.Checkpointer(
        root / name / "checkpoints", every=c.every, keep=keep, reserve_mb=c.get("reserve_mb", 0.0), name=name
    )


def stage_records(cfg, workdir: Path) -> dict[Path, dict]:
    """{stage folder: the flattened config its checkpoints are made with}: the SFT stage (which sweep members may
    share) depends on ``SFT_FIELDS`` only (and ``lora.*`` when it trains adapters); the DPO stage on everything.
    A files task's records hold a digest of each data file: a changed file is refused on resume."""
    full = flatten(cfg.to_dict())
    sft_dir = Path(cfg.sft.dir) / "sft" if cfg.sft.get("dir") else workdir / "sft"
    if cfg.task == "files":
        for key in ("train_path", "eval_path", "sft_path"):
            if cfg.data[key] and Path(cfg.data[key]).exists():
                full[f"data.{key}{DIGEST}"] = file_digest(cfg.data[key])
    fields = (*SFT_FIELDS, "lora") if cfg.lora.rank else SFT_FIELDS
    sft = {k: v for k, v in full.items() if any(k == f or k.startswith(f + ".") for f in fields)}
    if f"data.sft_path{DIGEST}" in full:
        sft[f"data.sft_path{DIGEST}"] = full[f"data.sft_path{DIGEST}"]
    has_sft = cfg.sft.steps > 0 and (cfg.task == "synthetic" or bool(cfg.data.sft_path))
    return {**({sft_dir: sft} if has_sft else {}), workdir / "dpo": full}


def check_stage_configs(cfg, workdir: Path) -> list:
    """Before anything runs: refuse to resume a stage whose checkpoints were made with another config (unless the
    change is allowed in ``resume.allow_changes``); returns the allowed changes, printed once."""
    changes = []
    for folder, record in stage_records(cfg, workdir).items():
        step = checkpoint.latest_step_on_disk(folder / "checkpoints")
        if jax.process_index() == 0:
            for k, old, new in check_resume_config(
                folder,
                record,
                allow=allowed_changes(cfg.resume.allow_changes),
                step=step,
                changeable=CHANGEABLE_ON_RESUME,
            ):
                print(f"[{folder.name}] resuming with {k} = {new!r} (its checkpoints were made with {old!r})")
                changes.append((k, old, new))
    return changes


@contextlib.contextmanager
def shared_stage_lock(cfg):
    """Process 0 holds the lock of a shared SFT folder (``sft.dir``) while the stage runs, waiting for another
    run that holds it (sweep members started in parallel from ``commands.sh``)."""
    if not cfg.sft.get("dir") or jax.process_index() != 0:
        yield
        return
    Path(cfg.sft.dir).mkdir(parents=True, exist_ok=True)
    with WorkdirLock(cfg.sft.dir, wait=True):
        yield


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Process 0 holds the workdir's lock for the whole run (other processes of the same run share it)."""
    if jax.process_index() != 0:
        yield
        return
    with WorkdirLock(workdir):
        yield


def run_info(n_params: int, devices, t_start: float) -> dict:
    return {
        "params": n_params,
        "wall_time_s": time.perf_counter() - t_start,
        "devices": len(devices),
        "processes": jax.process_count(),
        "backend": jax.default_backend(),
    }


def load_summary(workdir) -> dict:
    return json.loads((Path(workdir) / "summary.json").read_text())
