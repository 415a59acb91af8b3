"""What a finished run leaves behind: plots, the summary (``summary.json`` / ``summary.md``) and the Hugging Face
export of the final policy (and of its LoRA adapter alone). Process 0 writes; nothing non-finite is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dpo_jax.errors import NonFiniteLoss
from dpo_jax.infra import hf
from dpo_jax.infra.checkpoint import all_finite
from dpo_jax.infra.logging import read_jsonl
from dpo_jax.infra.workdir import atomic_dir, atomic_write_text
from dpo_jax.models import lora
from dpo_jax.training.evaluate import FALLING_CHOSEN

PLOTS = (
    ("loss", ("sft/loss", "train/loss", "eval/loss")),
    ("implicit reward margin", ("train/rewards/margins", "eval/rewards/margins")),
    ("preference accuracy", ("train/rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/ties")),
    ("KL(pi || pi_ref)", ("eval/kl_sampled", "eval/kl_seq_exact")),
    ("true reward of samples", ("eval/reward",)),
    ("experts: load (1 = balanced), router drift KL", ("train/moe/load_max", "train/moe/load_min",
                                                        "eval/moe/router_kl")),
    ("load-balancing loss", ("train/aux_loss", "sft/aux_loss")),
    ("PBT hyper-parameters", ("pbt/beta", "pbt/lr_scale", "pbt/label_smoothing", "pbt/target_temperature")),
    ("log pi - log pi_ref per token", ("train/logratio/chosen_per_token", "train/logratio/rejected_per_token",
                                       "eval/logratio/chosen_per_token", "eval/logratio/rejected_per_token")),
)  # fmt: skip
# Metrics with a standard error: plotted with +-2 s.e. bars.
STDERR = {"eval/kl_sampled": "eval/kl_sampled_se", "eval/reward": "eval/reward_se"}


def read_history(path: Path) -> list[dict]:
    return read_jsonl(Path(path))


def plot_panels(history: list[dict]) -> list[tuple[str, list[str]]]:
    """(title, metric keys with data) of every panel that has something to show."""
    present = {k for r in history for k, v in r.items() if isinstance(v, float)}
    panels = [(title, [k for k in keys if k in present]) for title, keys in PLOTS]
    return [(title, keys) for title, keys in panels if keys]


def write_plots(history: list[dict], summary: dict, path: Path) -> Path:
    """One panel per metric group that has data (a files task has no true reward: no empty panel), three to a row;
    eval metrics with a standard error get +-2 s.e. bars. The x axis counts DPO steps: step 0 is the reference
    itself (where every pair's rewards tie: accuracy 0, ties 1), an SFT stage's steps are negative."""
    import matplotlib  # heavy (about a second to import): only a finished run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offset = summary.get("sft/steps", 0)  # logged steps count the SFT stage's first (W&B's axis)

    def series(key):
        return [r for r in history if isinstance(r.get(key), float)]

    panels = plot_panels(history)
    cols = min(3, max(len(panels), 1))
    rows_ = -(-max(len(panels), 1) // cols)
    width, height = 4.6 * cols, 3.6 * rows_
    fig, axes = plt.subplots(rows_, cols, figsize=(width, height), squeeze=False)
    # Margins in inches, not tight_layout: it measures every label (~0.4 s of the ~1.3 s a finished run spends here)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.35 / height,
                        wspace=0.25, hspace=0.35)  # fmt: skip
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            rows = series(key)
            steps, values = [r["step"] - offset for r in rows], [r[key] for r in rows]
            se = [2 * r.get(STDERR.get(key, ""), float("nan")) for r in rows]
            if key in STDERR and all(np.isfinite(se)):
                ax.errorbar(steps, values, yerr=se, marker="o", ms=3, capsize=2, label=f"{key} ± 2 s.e.")
            else:
                ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, ms=3, label=key)
        if title.startswith("true reward") and "reference/reward" in summary:
            ax.axhline(summary["reference/reward"], color="gray", ls="--", label="reference")
        if title.startswith("log pi"):
            ax.axhline(0.0, color="gray", ls="--", lw=0.8)
        for r in series(FALLING_CHOSEN)[:1]:
            ax.axvline(r["step"] - offset, color="red", ls=":", label="chosen below reference")
        ax.set_title(title)
        ax.set_xlabel("DPO step" + (" (SFT before 0)" if offset else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


SUMMARY_KEYS = (
    "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl_token", "eval/kl_seq_exact",
    "eval/kl_sampled", "eval/kl_sampled_se", "eval/reward", "eval/reward_se", "reference/reward",
    "reference/reward_se", "reference/mode", "reference/cache_hit", "reference/pass_s", "params", "devices",
    "processes", "wall_time_s",
)  # fmt: skip


def summary_table(summary: dict) -> str:
    rows = [(k, summary[k]) for k in SUMMARY_KEYS if k in summary]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {fmt(v)} |" for k, v in rows) + "\n"
    notes = [*summary.get("warnings", ()), *summary.get("resume/changes", ())]
    return table + ("\nWarnings and resume changes:\n" + "".join(f"- {n}\n" for n in notes) if notes else "")


def generation_config(model_config, tokenizer, cfg) -> dict:
    """``generation_config.json`` for the export: the source checkpoint's own, as it was, when it has one (DPO
    changes the weights, not how the model is meant to be sampled); otherwise only the special tokens, so that
    ``generate`` keeps transformers' defaults (greedy) rather than this run's eval settings."""
    if cfg.model.init == "hf":
        src = Path(cfg.model.hf_path) / "generation_config.json"
        if src.exists():
            return json.loads(src.read_text())
    eos = model_config.eos_token_id if model_config.eos_token_id is not None else tokenizer.eos_token_id
    out = {
        "bos_token_id": model_config.bos_token_id if model_config.bos_token_id is not None else tokenizer.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": model_config.pad_token_id if model_config.pad_token_id is not None else tokenizer.pad_token_id,
    }
    return {k: v for k, v in out.items() if v is not None}


def write_outputs(cfg, workdir: Path, graphdef, params, tokenizer, summary: dict) -> None:
    """HF export of the final policy, summary.json / summary.md, and plots.png (process 0 writes). Parameters
    with a NaN/Inf are never exported or reported: that is an error naming the workdir."""
    if not all_finite(params):
        raise NonFiniteLoss(f"the final parameters in {workdir} contain NaN/Inf: not exported, no summary written")
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
        return
    if cfg.export_hf:
        model = nnx.merge(graphdef, params)  # read a tensor at a time by the export, not copied whole
        if model.config.lora_rank:  # the adapter alone (PEFT's layout), and the merged model below
            with atomic_dir(workdir / "adapter") as tmp:
                hf.save_peft(lora.split(nnx.state(model))[0], model.config, tmp, base_model=cfg.model.hf_path)
            summary["export_adapter"] = str(workdir / "adapter")
            model = lora.detach(model)
        with atomic_dir(workdir / "hf") as tmp:  # the previous export stays whole until the new one is complete
            hf.save_pretrained(model, tmp, tokenizer)
            (tmp / "generation_config.json").write_text(
                json.dumps(generation_config(model.config, tokenizer, cfg), indent=2) + "\n"
            )
        summary["export"] = str(workdir / "hf")
    history = read_history(workdir / "metrics.jsonl")
    summary["plots"] = str(write_plots(history, summary, workdir / "plots.png"))
    table = summary_table(summary)
    atomic_write_text(workdir / "summary.md", table)
    atomic_write_text(workdir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")  # last: "done"
    print("\n" + table, flush=True)
