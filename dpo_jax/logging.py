"""Metric writers behind one interface: JSONL (always), Weights & Biases (offline by default), console.

Only process 0 writes. W&B runs offline unless ``WANDB_MODE`` says otherwise or ``WANDB_API_KEY`` is set; its
files live under the workdir, and a restarted run resumes the same W&B run id.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path


class Writer:
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlWriter(Writer):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step, metrics):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")


def _plain(v):
    v = float(v) if not isinstance(v, str) else v
    return v if isinstance(v, str) or math.isfinite(v) else str(v)


def wandb_mode(configured: str) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else configured


class WandbWriter(Writer):
    def __init__(self, wandb_cfg, workdir: str | os.PathLike, config: dict, job_type: str):
        import wandb

        workdir = Path(workdir)
        id_file = workdir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity or None,
            group=wandb_cfg.group or None,
            tags=list(wandb_cfg.tags),
            name=wandb_cfg.name or workdir.name,
            job_type=job_type,
            dir=str(workdir),
            config=config,
            id=run_id,
            resume="allow",
            reinit="create_new",  # vectorised sweeps keep one run per member open in one process
            mode=wandb_mode(wandb_cfg.mode),
            settings=wandb.Settings(console="off", silent=True),
        )

    def write(self, step, metrics):
        self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self):
        self.run.finish()


class ConsoleWriter(Writer):
    """A progress bar with loss and throughput, and one line per eval."""

    def __init__(self, total: int, initial: int, desc: str, offset: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        self.last, self.offset = initial, offset

    def write(self, step, metrics):
        step -= self.offset
        self.bar.update(step - self.last)
        self.last = step
        keys = {"train/loss": "loss", "train/pairs_per_s": "pairs/s", "train/rewards/accuracies": "acc"}
        post = {short: f"{metrics[k]:.4g}" for k, short in keys.items() if k in metrics}
        if post:
            self.bar.set_postfix(post, refresh=False)
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            shown = ("eval/loss", "eval/rewards/accuracies", "eval/reward", "eval/kl_sampled", "eval/kl_token")
            self.bar.write(f"step {step}: " + ", ".join(f"{k[5:]}={evals[k]:.4g}" for k in shown if k in evals))

    def close(self):
        self.bar.close()


class MultiWriter(Writer):
    def __init__(self, writers):
        self.writers = list(writers)

    def write(self, step, metrics):
        for w in self.writers:
            w.write(step, metrics)

    def close(self):
        for w in self.writers:
            w.close()
