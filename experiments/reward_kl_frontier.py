"""The reward-KL frontier on the built-in task (the DPO paper's IMDb figure, on one CPU).

A beta sweep of the main job (``configs/beta_sweep.py``, all members in one vectorised program): each trained
policy is a point (sampled sequence KL(pi || pi_ref), true reward of its samples) on the held-out prompts,
with its eval trajectory. Against it: the reference (KL 0) and best-of-N sampling from the reference, whose
KL is log N - (N - 1) / N and whose expected reward is estimated from M samples per prompt
(``dpo_jax/research/best_of_n.py``). Each DPO point is compared with best-of-N at the same KL.

    python experiments/reward_kl_frontier.py                      # ~10 min on 2 CPU cores
    python experiments/reward_kl_frontier.py --config configs/beta_sweep.py:runlocal --samples 64  # smoke

Writes <workdir>/frontier.png, frontier.csv (one row per beta) and best_of_n.csv (one row per N).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dpo_jax.core import sampling
from dpo_jax.infra.logging import Writer
from dpo_jax.research import best_of_n, sweep
from dpo_jax.training import train
from dpo_jax.training.outputs import read_history

ROOT = Path(__file__).resolve().parents[1]


def reference_rewards(cfg, workdir: Path, samples: int, batch_rows: int = 4096, seed: int = 1234) -> np.ndarray:
    """[P, M] true rewards of M completions sampled from the reference for each held-out eval prompt."""
    job = train.build_job(cfg, workdir, jax.devices()[:1], Writer())  # finished SFT and cached reference: cheap
    evaluator = job.evaluator([cfg])
    prompt, mask, texts = evaluator.prompts
    model = nnx.merge(job.policy.graphdef, job.reference)
    tok = job.tokenizer
    per_call = max(batch_rows // len(texts), 1)
    rewards, key = [], jax.random.PRNGKey(seed)
    for start in range(0, samples, per_call):
        reps = min(per_call, samples - start)
        key, sub = jax.random.split(key)
        out = sampling.generate(
            model,
            np.tile(prompt, (reps, 1)),
            np.tile(mask, (reps, 1)),
            key=sub,
            max_new_tokens=cfg.eval.max_new_tokens,
            temperature=cfg.eval.temperature,
            eos_ids=(tok.eos_token_id,),
            pad_id=tok.pad_token_id or 0,
        )
        tokens, valid = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
        r = evaluator.reward_fn(texts * reps, [tok.decode(x[v]) for x, v in zip(tokens, valid, strict=True)])
        rewards.append(np.asarray(r).reshape(reps, len(texts)).T)
    return np.concatenate(rewards, axis=1)


def bon_curve(rewards_PxM: np.ndarray) -> list[dict]:
    m = rewards_PxM.shape[1]
    ns = sorted({int(round(x)) for x in np.geomspace(1, m, 40)})
    per_prompt = best_of_n.expected_max(rewards_PxM, ns)  # [P, len(ns)]
    se = per_prompt.std(axis=0, ddof=1) / np.sqrt(len(per_prompt))
    kl_ties = np.mean([best_of_n.bon_kl_levels(r, ns) for r in rewards_PxM], axis=0)
    return [
        {"n": n, "kl": float(best_of_n.bon_kl(n)), "kl_ties": float(kt), "reward": float(r), "reward_se": float(s)}
        for n, kt, r, s in zip(ns, kl_ties, per_prompt.mean(axis=0), se, strict=True)
    ]


def matched(curve: list[dict], kl: float, key: str = "kl") -> tuple[float, float]:
    """Best-of-N reward and N at ``kl`` (interpolated in KL, ``key`` "kl": log N - (N-1)/N, "kl_ties": the
    exact tie-aware KL); NaN beyond the largest N sampled."""
    kls, rs, ns = (np.array([c[k] for c in curve], np.float64) for k in (key, "reward", "n"))
    if kl > kls[-1]:
        return float("nan"), float("nan")
    return float(np.interp(kl, kls, rs)), float(np.exp(np.interp(kl, kls, np.log(ns))))


def plot(rows, curve, trajectories, reference, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    kls = [c["kl"] for c in curve]
    rs = np.array([c["reward"] for c in curve])
    se = np.array([c["reward_se"] for c in curve])
    ax.plot(kls, rs, color="C1", label=f"best-of-N, KL = log N - (N-1)/N (N = 1 ... {curve[-1]['n']})")
    ax.fill_between(kls, rs - 2 * se, rs + 2 * se, color="C1", alpha=0.2)
    ax.plot([c["kl_ties"] for c in curve], rs, color="C1", ls=":", label="best-of-N, exact KL with tied rewards")
    for r, (traj, color) in zip(rows, trajectories, strict=True):
        if traj:
            ax.plot(*zip(*traj, strict=True), color=color, alpha=0.35, lw=1, marker=".", ms=3)
        ax.errorbar(
            r["kl"], r["reward"], xerr=2 * r["kl_se"], yerr=2 * r["reward_se"], fmt="o", color=color,
            label=f"DPO beta = {r['beta']:g}",
        )  # fmt: skip
    ax.scatter([0.0], [reference], color="k", marker="s", zorder=5, label="reference (SFT)")
    ax.set_xlabel("sampled sequence KL(pi || pi_ref) [nats]")
    ax.set_ylabel("true reward of samples (held-out prompts)")
    ax.set_title("Reward-KL frontier: DPO beta sweep vs best-of-N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/beta_sweep.py"))
    ap.add_argument("--workdir", default="runs/frontier")
    ap.add_argument("--mode", default="vectorized", choices=("vectorized", "sequential"))
    ap.add_argument("--samples", type=int, default=2048, help="reference samples per prompt (largest N)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)

    t0 = time.perf_counter()
    members = sweep.run_sweep(args.config, workdir, mode=args.mode, devices=jax.devices()[:1])
    t_sweep = time.perf_counter() - t0
    base, declared = sweep.load_sweep(args.config)
    cfg = sweep.member_config(base, declared[0], workdir)

    t0 = time.perf_counter()
    rewards = reference_rewards(cfg, workdir / "_best_of_n", args.samples)
    curve = bon_curve(rewards)
    t_bon = time.perf_counter() - t0
    reference = float(rewards.mean())

    rows, trajectories = [], []
    for i, m in enumerate(members):
        bon_r, bon_n = matched(curve, m["eval/kl_sampled"])
        ties_r, ties_n = matched(curve, m["eval/kl_sampled"], "kl_ties")
        rows.append(
            {
                "beta": m["dpo.beta"],
                "kl": m["eval/kl_sampled"],
                "kl_se": m["eval/kl_sampled_se"],
                "reward": m["eval/reward"],
                "reward_se": m["eval/reward_se"],
                "accuracy": m["eval/rewards/accuracies"],
                "bon_n_at_kl": bon_n,
                "bon_reward_at_kl": bon_r,
                "dpo_minus_bon": m["eval/reward"] - bon_r,
                "bon_ties_n_at_kl": ties_n,
                "bon_ties_reward_at_kl": ties_r,
            }
        )
        hist = read_history(workdir / m["member"] / "metrics.jsonl")
        traj = [(0.0, m["reference/reward"])] + [
            (h["eval/kl_sampled"], h["eval/reward"]) for h in hist if "eval/reward" in h
        ]
        trajectories.append((traj, f"C{[0, 2, 3, 4, 5, 6, 7, 8, 9][i % 9]}"))
    _write_csv(workdir / "frontier.csv", rows)
    _write_csv(workdir / "best_of_n.csv", curve)
    plot(rows, curve, trajectories, reference, workdir / "frontier.png")

    print(f"\nsweep {t_sweep:.0f} s ({args.mode}); best-of-N {rewards.shape[1]} samples x {len(rewards)} prompts "
          f"{t_bon:.0f} s; reference reward {reference:.3f}")  # fmt: skip
    print(f"{'beta':>6} {'KL':>12} {'DPO reward':>16} {'BoN at KL':>10} {'N':>7} {'DPO - BoN':>10} {'BoN, tie KL':>12}")
    for r in rows:
        print(
            f"{r['beta']:>6g} {r['kl']:>6.2f} ± {r['kl_se']:<4.2f} {r['reward']:>8.3f} ± {r['reward_se']:<5.3f} "
            f"{r['bon_reward_at_kl']:>10.3f} {r['bon_n_at_kl']:>7.1f} {r['dpo_minus_bon']:>+10.3f} "
            f"{r['bon_ties_reward_at_kl']:>12.3f}"
        )
    print(f"wrote {workdir / 'frontier.png'}, frontier.csv, best_of_n.csv")
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
