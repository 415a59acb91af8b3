"""Label-softness ablation: hard labels vs conservative DPO (label smoothing) vs per-pair soft targets, under
increasing label noise on the built-in task (``configs/label_softness_sweep.py``; members run sequentially,
sharing one SFT reference and one reference cache).

    python experiments/label_softness.py                     # 9 runs, ~12 min on 2 CPU cores
    python experiments/label_softness.py --config configs/label_softness_sweep.py:runlocal   # smoke

Writes <workdir>/label_softness.png (held-out accuracy on clean labels, true reward and sampled KL against
the noise rate, one line per label treatment; error bars ±2 s.e.) and label_softness.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import jax

from dpo_jax.research import sweep

ROOT = Path(__file__).resolve().parents[1]
PANELS = (
    ("eval/rewards/accuracies", None, "held-out accuracy (clean labels)"),
    ("eval/reward", "eval/reward_se", "true reward of samples"),
    ("eval/kl_sampled", "eval/kl_sampled_se", "sampled KL(pi || pi_ref) [nats]"),
)


def treatment(row: dict) -> str:
    if row["dpo.use_soft_targets"]:
        return "soft targets"
    eps = row["dpo.label_smoothing"]
    return f"cDPO eps = {eps:g}" if eps > 0 else "hard labels"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 3.8))
    names = list(dict.fromkeys(r["treatment"] for r in rows))
    for ax, (key, se_key, title) in zip(axes, PANELS, strict=True):
        for i, name in enumerate(names):
            rs = sorted((r for r in rows if r["treatment"] == name), key=lambda r: r["noise"])
            x = [r["noise"] + (i - 1) * 0.004 for r in rs]  # a small dodge so error bars do not overlap
            y = [r[key] for r in rs]
            # Accuracy: binomial standard error over the held-out pairs.
            err = [2 * (r[se_key] if se_key else math.sqrt(r[key] * (1 - r[key]) / r["n_eval"])) for r in rs]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        if key == "eval/reward":
            ax.axhline(rows[0]["reference/reward"], color="gray", ls="--", label="reference")
        ax.set_title(title)
        ax.set_xlabel("label noise (fraction of train labels flipped)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description="hard vs cDPO vs soft targets under label noise")
    ap.add_argument("--config", default=str(ROOT / "configs/label_softness_sweep.py"))
    ap.add_argument("--workdir", default="runs/label_softness")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    members = sweep.run_sweep(args.config, workdir, devices=jax.devices()[:1])
    keep = ["treatment", "noise", "dpo.label_smoothing", "dpo.use_soft_targets", "n_eval", *sweep.SUMMARY_COLUMNS]
    base, _ = sweep.load_sweep(args.config)
    rows = [
        {**m, "treatment": treatment(m), "noise": m["synthetic.label_noise"], "n_eval": base.synthetic.n_eval}
        for m in members
    ]
    with (workdir / "label_softness.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, keep, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, workdir / "label_softness.png")
    print(f"{'noise':>6} {'treatment':<16} {'accuracy':>9} {'reward':>14} {'KL':>14}")
    for r in rows:
        print(
            f"{r['noise']:>6g} {r['treatment']:<16} {r['eval/rewards/accuracies']:>9.3f} "
            f"{r['eval/reward']:>7.3f} ± {r['eval/reward_se']:.3f} "
            f"{r['eval/kl_sampled']:>7.2f} ± {r['eval/kl_sampled_se']:.2f}"
        )
    print(f"wrote {workdir / 'label_softness.png'} and label_softness.csv")
    return rows


if __name__ == "__main__":
    main()
