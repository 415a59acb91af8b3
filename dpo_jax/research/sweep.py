"""Sweeps declared beside the config they sweep: ``get_sweep(arg)`` in the config file lists the members.

    dpo-jax sweep --config configs/beta_sweep.py --workdir runs/beta                    # run all members
    dpo-jax sweep --config configs/beta_sweep.py --workdir runs/beta --mode vectorized  # all in one program
    dpo-jax sweep --config configs/beta_sweep.py --workdir runs/beta --mode export      # W&B sweep + commands

A member is a dict of dotted config overrides (``{"dpo.beta": 0.3}``); ``grid`` builds the product of axes.
With ``--mode vectorized`` members train as a population in one ``jax.vmap``-ed program (``train.train_population``,
members split over the mesh's ``member`` axis, across devices and hosts) and are written out as ordinary runs.
Members may differ there in ``VECTOR_KEYS`` (traced values: beta, label smoothing, soft-target temperature, data
seed, learning rate, loss type and weights, f-divergence and its alpha, DiscoPOP's tau, SimPO's gamma, LD-DPO's
alpha, reference-free or not); members that differ in anything else (model, data, steps) are
grouped automatically: as few populations as possible, one after another. Otherwise
members run one after another in one process, each in ``<workdir>/<member>`` as an ordinary run (its own
checkpoints, metrics, W&B run in the sweep's group with the member's values as tags). The compiled train
step is reused across members (beta and label smoothing are traced), members share one SFT reference stage
(``<workdir>/_shared``, when their SFT-relevant settings agree) and one reference log-prob cache. Re-running
the command skips finished members and resumes an unfinished one. At the end: ``summary.csv``,
``summary.md`` and ``sweep.png`` across members.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from dpo_jax.config import SFT_FIELDS, ConfigError, load_config_module
from dpo_jax.core.hparams import traced_fields
from dpo_jax.research.pbt import pbt_hook
from dpo_jax.training.loop import StepCache
from dpo_jax.training.runs import load_summary
from dpo_jax.training.train import train, train_population

SUMMARY_COLUMNS = (
    "eval/loss",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/kl_token",
    "eval/kl_sampled",
    "eval/kl_sampled_se",
    "eval/reward",
    "eval/reward_se",
    "reference/reward",
)


VECTOR_KEYS = traced_fields()  # declared with the hyper-parameters (dpo_jax.core.hparams)


def vector_groups(members: list[dict[str, Any]]) -> list[list[int]]:
    """Member indices grouped by everything but ``VECTOR_KEYS`` (first appearance order): one program each."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        kto = "kto" in str(m.get("dpo.loss_type", ""))  # unpaired data: never in a population with paired types
        key = json.dumps([kto, sorted((k, v) for k, v in m.items() if k not in VECTOR_KEYS)], default=str)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def grid(axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The product of ``{"dpo.beta": [...], "dpo.label_smoothing": [...]}``, one dict per member."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(axes[k] for k in keys))]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).replace("/", "-").replace(" ", "")


def member_name(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in overrides.items()) or "base"


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any], where: str = "sweep"):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = cfg
        for p in path:
            if p not in node:
                raise ConfigError(f"{where}: member key {key!r}: no config section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"{where}: member key {key!r}: no config field {leaf!r}")
        node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
    return cfg


def load_sweep(spec: str, base=None) -> tuple[ml_collections.ConfigDict, list[dict[str, Any]]]:
    """The base config (``base``: one already loaded with command-line overrides) and the member list."""
    module, arg = load_config_module(spec)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"--config: {spec.split(':')[0]} declares no get_sweep(arg=None)")
    members = list(module.get_sweep(arg))
    names = [member_name(m) for m in members]
    if len(set(names)) != len(names):
        raise ConfigError(f"--config: sweep members are not distinct: {names}")
    return (module.get_config(arg) if base is None else base), members


def _sft_key(cfg) -> str:
    values = {}
    for field in SFT_FIELDS:
        node = cfg.to_dict()
        for part in field.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if field == "data.max_row_chars" and not node:
            continue  # added later: a key of the default stays as it was (sweeps resume into the same folder)
        if field == "model" and isinstance(node, dict):  # how attention is computed does not change the stage
            how = ("attention", "attention_block", "mlp_chunk", "context_attention")
            node = {k: v for k, v in node.items() if k not in how}
        values[field] = node
    if cfg.lora.rank:  # a LoRA SFT stage trains adapters (keys of full-parameter runs stay as they were)
        values["lora"] = {k: v for k, v in cfg.lora.to_dict().items() if k != "dropout" or v}  # keys before it
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def member_config(base, overrides: dict[str, Any], workdir: Path):
    cfg = apply_overrides(base, overrides)
    cfg.wandb.group = cfg.wandb.group or workdir.name
    cfg.wandb.name = f"{workdir.name}/{member_name(overrides)}"
    cfg.wandb.tags = (*cfg.wandb.tags, workdir.name, *(f"{k}={_fmt(v)}" for k, v in overrides.items()))
    cfg.sft.dir = cfg.sft.dir or str(workdir / "_shared" / _sft_key(cfg))
    cfg.reference.cache_dir = cfg.reference.cache_dir or str(workdir / "reference_cache")
    return cfg


def run_sweep(
    spec: str,
    workdir: str | Path,
    *,
    base=None,
    members=None,
    mode: str = "sequential",
    devices=None,
    cache: StepCache | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every member, one after another or (``mode="vectorized"``) all in one vmapped program;
    returns one summary row per member. ``members`` replaces the file's list; ``cache``: compiled steps to share
    (default: the sweep's own, so members that differ only in traced values compile each step once)."""
    base, declared = load_sweep(spec, base)
    members = declared if members is None else list(members)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [member_name(m) for m in members]
    todo = [i for i, n in enumerate(names) if not (workdir / n / "summary.json").exists()]
    for i in sorted(set(range(len(members))) - set(todo)):
        print(f"[sweep] {i + 1}/{len(members)} {names[i]}: finished, skipped", flush=True)
    cache = StepCache() if cache is None else cache
    if mode == "vectorized" and todo:
        groups = [[todo[j] for j in g] for g in vector_groups([members[i] for i in todo])]
        for n, group in enumerate(groups):
            print(
                f"[sweep] population {n + 1}/{len(groups)}: {len(group)} members in one program: "
                f"{[names[i] for i in group]}",
                flush=True,
            )
            cfgs = [member_config(base, members[i], workdir) for i in group]
            hooks = (
                [pbt_hook(cfgs[0], workdir / "lineage.jsonl", [names[i] for i in group])] if base.pbt.enabled else []
            )
            train_population(cfgs, [workdir / names[i] for i in group], devices=devices, cache=cache, hooks=hooks)
    elif todo:
        for i in todo:
            print(f"[sweep] {i + 1}/{len(members)} {names[i]}", flush=True)
            train(member_config(base, members[i], workdir), workdir / names[i], devices=devices, cache=cache)
    swept = list(dict.fromkeys(k for m in members for k in m))  # every key any member sets, in order
    rows = []
    for name, overrides in zip(names, members, strict=True):
        summary = load_summary(workdir / name)
        values = {k: overrides.get(k, _get(base, k)) for k in swept}  # the member's effective values
        rows.append({"member": name, **values, **{k: summary.get(k) for k in SUMMARY_COLUMNS}})
    if jax.process_index() == 0:
        write_summary(rows, swept, workdir)
    return rows


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def write_summary(rows: list[dict], swept: list[str], workdir: Path) -> None:
    columns = ["member", *swept, *SUMMARY_COLUMNS]
    with (workdir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    table += "".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |\n" for r in rows)
    (workdir / "summary.md").write_text(table)
    print("\n" + table, flush=True)
    if rows and swept:
        plot_members(rows, swept, workdir / "sweep.png")


def _reward_vs_kl_frame(ax, rows, title: str) -> None:
    """The reward-vs-KL panel's reference line, title and axes."""
    ref = next((r["reference/reward"] for r in rows if isinstance(r.get("reference/reward"), float)), None)
    if ref is not None:
        ax.axhline(ref, color="gray", ls="--", label="reference")
        ax.legend(fontsize=7)
    ax.set_title(title)
    ax.set_xlabel("sampled KL(pi || pi_ref)")
    ax.grid(alpha=0.3)


def _plot_categorical(rows, panels, axes) -> None:
    """One point per member (±2 s.e. where logged), labelled by the member's name; reward vs KL annotated."""
    names = [str(r["member"]).replace("loss_type=", "") for r in rows]
    for ax, (key, title) in zip(axes, panels, strict=False):
        for i, r in enumerate(rows):
            if isinstance(r.get(key), float):
                se = r.get(f"{key}_se")
                ax.errorbar(i, r[key], yerr=2 * se if isinstance(se, float) else None, fmt="o", capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=6)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for r, name in zip(rows, names, strict=True):
        if isinstance(r.get("eval/reward"), float):
            ax.errorbar(r["eval/kl_sampled"], r["eval/reward"], xerr=2 * r.get("eval/kl_sampled_se", 0.0),
                        yerr=2 * r.get("eval/reward_se", 0.0), fmt="o", capsize=2)  # fmt: skip
            ax.annotate(name, (r["eval/kl_sampled"], r["eval/reward"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    _reward_vs_kl_frame(ax, rows, "reward vs KL (±2 s.e.)")


def _plot_numeric(rows, panels, axes, x_key, line_key) -> None:
    """Each panel against the first swept value, one line per value of the second; reward vs KL scattered."""
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get(line_key) if line_key else None, []).append(r)
    label = lambda g: f"{line_key.split('.')[-1]}={g}" if line_key else None  # noqa: E731
    for ax, (key, title) in zip(axes, panels, strict=False):
        for g, rs in groups.items():
            pts = sorted((r[x_key], r[key]) for r in rs if isinstance(r.get(key), float))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label(g))
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if line_key:
            ax.legend(fontsize=7)
    ax = axes[-1]
    for g, rs in groups.items():
        pts = [(r["eval/kl_sampled"], r["eval/reward"]) for r in rs if isinstance(r.get("eval/reward"), float)]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=label(g))
    _reward_vs_kl_frame(ax, rows, "reward vs KL")


def plot_members(rows: list[dict], swept: list[str], path: Path) -> None:
    """Eval metrics against the first swept value (one line per value of the second; one point per member when
    the values are not numbers, e.g. loss types), and reward vs KL."""
    import matplotlib  # heavy (about a second to import): only a finished sweep draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, line_key = swept[0], (swept[1] if len(swept) > 1 else None)
    panels = [
        ("eval/reward", "true reward"),
        ("eval/kl_sampled", "sampled KL(pi || pi_ref)"),
        ("eval/rewards/accuracies", "held-out accuracy"),
        ("eval/rewards/margins", "held-out margin"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.4))
    if all(isinstance(r.get(x_key), int | float) for r in rows):
        _plot_numeric(rows, panels, axes, x_key, line_key)
    else:
        _plot_categorical(rows, panels, axes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_sweep(spec: str, workdir: str | Path, *, base=None) -> dict[str, Path]:
    """``commands.sh`` (one ``dpo-jax train`` per member, each with its own workdir) and, for grid sweeps, a W&B
    sweep definition ``wandb_sweep.yaml`` whose agent runs the same command (``wandb sweep`` / ``wandb agent``)."""
    base, members = load_sweep(spec, base)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = ["#!/usr/bin/env bash", f"# {len(members)} members of {spec}; run them anywhere (one job each).", "set -e"]
    for m in members:
        cfg = member_config(base, m, workdir)
        args = [f"--config.{k}={_cli(v)}" for k, v in m.items()]
        args += [
            f"--config.wandb.group={workdir.name}",
            f"--config.wandb.name={cfg.wandb.name}",
            f"--config.sft.dir={cfg.sft.dir}",
            f"--config.reference.cache_dir={cfg.reference.cache_dir}",
        ]
        cmd = ["dpo-jax", "train", "--config", spec, "--workdir", str(workdir / member_name(m)), *args]
        lines.append(shlex.join(cmd))
    out = {"commands": workdir / "commands.sh"}
    out["commands"].write_text("\n".join(lines) + "\n")
    keys = list(members[0]) if members else []
    axes = {k: sorted({m[k] for m in members}, key=str) for k in keys}
    if members and len(grid(axes)) == len(members):
        params = "\n".join(f"  config.{k}:\n    values: {json.dumps(list(v))}" for k, v in axes.items())
        command = [
            "${env}",
            "dpo-jax",
            "train",
            "--config",
            spec,
            "--workdir",
            str(workdir),
            "--member_subdir",
            f"--config.wandb.group={workdir.name}",
            "${args}",
        ]
        yaml = (
            f"# wandb sweep {workdir / 'wandb_sweep.yaml'} && wandb agent <sweep id>\n"
            f"name: {workdir.name}\nmethod: grid\nparameters:\n{params}\ncommand:\n"
            + "".join(f"  - {json.dumps(c)}\n" for c in command)
        )
        out["wandb"] = workdir / "wandb_sweep.yaml"
        out["wandb"].write_text(yaml)
    return out


def _cli(v) -> str:
    return json.dumps(list(v)) if isinstance(v, tuple | list) else json.dumps(v) if isinstance(v, str) else str(v)
