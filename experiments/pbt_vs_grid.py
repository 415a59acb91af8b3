"""PBT against the equal-compute grid: the same members (beta x learning rate, ``configs/pbt.py``) trained once with
population-based training and once as a fixed grid, both as one vectorised population, side by side in one
invocation; every member on the reward-KL plane with +-2 s.e., the lineage of PBT's best member.

    python experiments/pbt_vs_grid.py                                   # 8 members, the main job's length
    python experiments/pbt_vs_grid.py --config configs/pbt.py:runlocal  # smoke (4 members, 40 steps)

Writes <workdir>/pbt_vs_grid.png, pbt_trajectories.png (each PBT member's beta, learning-rate scale and true reward
over steps), pbt_vs_grid.md (the table) and prints it, with the best PBT member's lineage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from dpo_jax.research import sweep
from dpo_jax.research.pbt import Lineage
from dpo_jax.training import runs
from dpo_jax.training.outputs import read_history

ROOT = Path(__file__).resolve().parents[1]


def plot(results: dict[str, list[dict]], reference: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for (name, rows), marker in zip(results.items(), ("o", "s"), strict=True):
        ax.errorbar([r["eval/kl_sampled"] for r in rows], [r["eval/reward"] for r in rows],
                    xerr=[2 * r["eval/kl_sampled_se"] for r in rows], yerr=[2 * r["eval/reward_se"] for r in rows],
                    fmt=marker, capsize=3, label=name, alpha=0.85)  # fmt: skip
    ax.axhline(reference, color="gray", ls="--", label="reference")
    ax.set_xlabel("sampled KL(pi || pi_ref) [nats], ±2 s.e.")
    ax.set_ylabel("true reward of samples, ±2 s.e.")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectories(workdir: Path, rows: list[dict], path: Path) -> None:
    """Each PBT member's beta, learning-rate scale and true reward over DPO steps (its own log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("pbt/beta", "beta"), ("pbt/lr_scale", "learning-rate scale"), ("eval/reward", "true reward of samples"))
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 3.8))
    for r in rows:
        hist = read_history(workdir / r["member"] / "metrics.jsonl")
        sft = runs.load_summary(workdir / r["member"]).get("sft/steps", 0)  # logged steps count SFT's first
        for ax, (key, _) in zip(axes, keys, strict=True):
            pts = [(h.get("dpo/step", h["step"] - sft), h[key]) for h in hist if key in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=r["member"])
    for ax, (key, title) in zip(axes, keys, strict=True):
        ax.set_title(title)
        ax.set_xlabel("DPO step")
        ax.grid(alpha=0.3)
        if key != "eval/reward":
            ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| run | member (initial) | final beta, lr scale | true reward ± s.e. | sampled KL ± s.e. |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r in sorted(rows, key=lambda r: -r["eval/reward"]):
            final = r.get("pbt/final") or {}
            hp = f"{final.get('beta', r['dpo.beta']):.3g}, {final.get('lr_scale', 1.0):.3g}" if final else "–"
            lines.append(f"| {name} | {r['member']} | {hp} | {r['eval/reward']:.3f} ± {r['eval/reward_se']:.3f} | "
                         f"{r['eval/kl_sampled']:.2f} ± {r['eval/kl_sampled_se']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description="PBT vs the equal-compute grid on the reward-KL plane")
    ap.add_argument("--config", default=str(ROOT / "configs/pbt.py"))
    ap.add_argument("--workdir", default="runs/pbt_vs_grid")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    base, members = sweep.load_sweep(args.config)
    grid = base.copy_and_resolve_references()
    grid.pbt.enabled = False
    results = {}
    for name, cfg in (("PBT", base), ("grid", grid)):
        rows = sweep.run_sweep(args.config, workdir / name, base=cfg, members=members, mode="vectorized",
                               devices=jax.devices())  # fmt: skip
        for r in rows:
            summary = runs.load_summary(workdir / name / r["member"])
            r["pbt/final"] = summary.get("pbt/final")
        results[name] = rows
    plot(results, results["grid"][0]["reference/reward"], workdir / "pbt_vs_grid.png")
    trajectories(workdir / "PBT", results["PBT"], workdir / "pbt_trajectories.png")
    text = table(results)
    (workdir / "pbt_vs_grid.md").write_text(text + "\n")
    print(text)
    best = max(results["PBT"], key=lambda r: r["eval/reward"])
    grid_best = max(results["grid"], key=lambda r: r["eval/reward"])
    print(f"best PBT member {best['member']}: reward {best['eval/reward']:.3f} ± {best['eval/reward_se']:.3f} at "
          f"KL {best['eval/kl_sampled']:.2f}; best grid member {grid_best['member']}: {grid_best['eval/reward']:.3f} "
          f"± {grid_best['eval/reward_se']:.3f} at KL {grid_best['eval/kl_sampled']:.2f}")  # fmt: skip
    print("lineage of the best PBT member (each exploit it or its ancestors took):")
    rows, who = Lineage(workdir / "PBT" / "lineage.jsonl").read(), best["member"]
    for row in sorted(rows, key=lambda r: -r["step"]):
        if row["member"] == who:
            print(f"  step {row['step']}: {row['member']} <- {row['parent']} {row['before']} -> {row['after']}")
            who = row["parent"]
    print(f"wrote {workdir / 'pbt_vs_grid.png'}, pbt_trajectories.png and pbt_vs_grid.md")
    return results


if __name__ == "__main__":
    main()
