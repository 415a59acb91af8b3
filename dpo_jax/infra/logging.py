"""Metric writers behind one interface: JSONL (always), Weights & Biases (offline by default), console.

Only process 0 writes. W&B runs offline unless ``WANDB_MODE`` says otherwise or ``WANDB_API_KEY`` is set; its
files live under the workdir, and a restarted run resumes the same W&B run id. An online run whose server does
not answer within a few seconds falls back to offline with one warning (``wandb sync`` uploads it later).
A resumed run first ``rewind``s the writers to the checkpoint's step, so steps that are redone are not logged
twice (W&B itself ignores steps it has already seen).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

import jax
from tqdm import tqdm

from dpo_jax.infra.workdir import atomic_write_text


class Writer:
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def rewind(self, step: int, *, stage: str = "dpo", keep_evals: bool = True) -> None:
        """Forget ``stage``'s rows after ``step`` (and its eval rows at ``step`` unless ``keep_evals``): they are about
        to be redone. Another stage's rows stay: an SFT stage that falls back to an older checkpoint and is redone
        keeps the DPO rows logged after it."""

    def note(self, line: str) -> None: ...

    def restart_clock(self) -> None: ...

    def close(self) -> None: ...


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a metrics file; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class JsonlWriter(Writer):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step, metrics):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")

    def rewind(self, step, *, stage="dpo", keep_evals=True):
        if not self.path.exists():
            return
        rows = read_jsonl(self.path)

        def keep(r):
            at = r.get("step", 0)
            if row_stage(r) != stage:
                return True
            return at < step or (at == step and (keep_evals or not any(k.startswith("eval/") for k in r)))

        kept = [r for r in rows if keep(r)]
        if len(kept) != len(rows) or self.path.read_text().count("\n") != len(rows):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def row_stage(row: dict) -> str:
    """The stage a logged row belongs to: "sft" (its metrics are under ``sft/``) or "dpo"."""
    return "sft" if any(k.startswith("sft/") for k in row) else "dpo"


def _plain(v):
    v = float(v) if not isinstance(v, str) else v
    return v if isinstance(v, str) or math.isfinite(v) else str(v)


def wandb_mode(configured: str) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else configured


def wandb_reachable(timeout: float = 5.0) -> bool:
    """Whether the W&B server (``WANDB_BASE_URL``, default api.wandb.ai) accepts a TCP connection within
    ``timeout`` seconds; name resolution is bounded too (it runs in a thread)."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


class WandbWriter(Writer):
    def __init__(self, wandb_cfg, workdir: str | os.PathLike, config: dict, job_type: str):
        import wandb  # heavy (seconds to import): only runs that log to W&B

        workdir = Path(workdir)
        id_file = workdir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id)
        mode = wandb_mode(wandb_cfg.mode)
        if mode == "online" and not wandb_reachable():
            print(
                "dpo-jax: warning: W&B server unreachable; logging offline instead "
                f"(upload later with `wandb sync {workdir / 'wandb'}/offline-run-*`)",
                file=sys.stderr,
                flush=True,
            )
            mode = "offline"
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
            mode=mode,
            settings=wandb.Settings(console="off", silent=True, init_timeout=30),
        )

    def write(self, step, metrics):
        self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self):
        self.run.finish()


class ConsoleWriter(Writer):
    """A progress bar with loss and throughput, and one line per eval."""

    def __init__(self, total: int, initial: int, desc: str, offset: int = 0, *, file=None, mininterval: float = 1.0):
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            file=file or sys.stderr,
            dynamic_ncols=True,
            mininterval=mininterval,
        )
        self.last, self.offset = initial, offset

    def write(self, step, metrics):
        step -= self.offset
        keys = {"train/loss": "loss", "train/pairs_per_s": "pairs/s", "train/rewards/accuracies": "acc"}
        keys.update({"sft/loss": "loss", "sft/pairs_per_s": "seq/s"} if "sft/loss" in metrics else {})
        post = {short: f"{metrics[k]:.4g}" for k, short in keys.items() if k in metrics}
        if post:  # before update(), which redraws: the bar shows this step's values, not the previous interval's
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(step - self.last)
        self.last = step
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            shown = ("eval/loss", "eval/rewards/accuracies", "eval/reward", "eval/kl_sampled", "eval/kl_token")
            self.bar.write(f"step {step}: " + ", ".join(f"{k[5:]}={evals[k]:.4g}" for k in shown if k in evals))

    def restart_clock(self):
        """Rate and ETA from now on (after a pause the bar should not count, such as an eval)."""
        self.bar.unpause()

    def note(self, line: str):
        """A line above the bar."""
        self.bar.write(line)

    def close(self):
        self.bar.close()


class MultiWriter(Writer):
    def __init__(self, writers):
        self.writers = list(writers)

    def write(self, step, metrics):
        for w in self.writers:
            w.write(step, metrics)

    def rewind(self, step, *, stage="dpo", keep_evals=True):
        for w in self.writers:
            w.rewind(step, stage=stage, keep_evals=keep_evals)

    def close(self):
        for w in self.writers:
            w.close()


def progress(iterable, total: int, desc: str):
    """A progress bar with an ETA on process 0's console (stderr); a plain iterator elsewhere."""
    return tqdm(
        iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
        disable=jax.process_index() != 0,
    )  # fmt: skip
