"""Iterative (online) DPO against offline DPO's beta sweep on the reward-KL frontier of the built-in task.

Offline: the beta sweep of the main job (``configs/beta_sweep.py``, one vectorised program, 300 steps on the task's
Bradley-Terry-labelled pairs of reference samples). Iterative: ``configs/rounds.py`` (3 rounds of 100 steps, each
on best-vs-worst pairs of 8 samples per prompt from the previous round's policy, scored by the true reward), with
the reference kept (the SFT policy) and refreshed (the previous round's). Online: ``configs/rounds.py:online``, rounds
of one step-batch (each of the 300 steps samples 8 completions for each of its 64 prompts from the current policy
and trains on the best vs the worst), at beta 0.1 (the rounds') and 0.3, its points the run's own evals every 50
steps (the same estimator and prompts, another key) and its end measured as the others. Every run starts from the
same SFT
policy (one shared SFT stage) and every point is measured the same way (``dpo_jax.research.rounds.measure``: one
sample per held-out prompt with one key, true reward and sampled sequence KL(pi || pi_SFT), +- 2 standard errors).

    python experiments/iterative_frontier.py                                # ~15 min on 2 CPU cores
    python experiments/iterative_frontier.py --runlocal --workdir runs/iter_smoke    # a few minutes

Writes <workdir>/iterative_frontier.png and .csv, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import jax
import numpy as np

from dpo_jax.config import load_config_file
from dpo_jax.research import rounds, sweep
from dpo_jax.training import train
from dpo_jax.training.outputs import read_history

ROOT = Path(__file__).resolve().parents[1]


def online_run(beta: float, workdir: Path, sft_dir: str, arg: str, devices) -> tuple[list[dict], Path, float]:
    """An online run at ``beta`` from the shared SFT stage: its eval points (step, reward, KL, +- s.e.), its
    workdir and the share of its time spent sampling."""
    cfg = load_config_file(str(ROOT / f"configs/rounds.py:online{arg}"))
    cfg.dpo.beta = beta
    cfg.sft.dir = sft_dir
    cfg.eval.every = max(cfg.optim.steps // 6, 1)
    run = workdir / f"online_beta{beta:g}"
    summary = train.train(cfg, run, devices=devices)
    points = [{"step": r["step"] - cfg.sft.steps, "reward": r["eval/reward"], "reward_se": r["eval/reward_se"],
               "kl": r["eval/kl_sampled"], "kl_se": r["eval/kl_sampled_se"],
               "accuracy": r["eval/rewards/accuracies"] if r["step"] > cfg.sft.steps else float("nan")}
              for r in read_history(run / "metrics.jsonl") if "eval/reward" in r]  # fmt: skip
    share = summary["online/sample_s_total"] / max(summary["wall_time_s"], 1e-9)
    return points, run, share


def plot(offline: list[dict], paths: dict[str, list[dict]], path: Path, online: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    off = sorted(offline, key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in off], [r["reward"] for r in off], color="C0", ls=":", lw=1)
    for r in off:
        ax.errorbar(r["kl"], r["reward"], xerr=2 * r["kl_se"], yerr=2 * r["reward_se"], fmt="o", color="C0", ms=4)
        ax.annotate(f"β={r['beta']:g}", (r["kl"], r["reward"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.plot([], [], "o:", color="C0", label="offline DPO, β sweep (300 steps)")
    for (name, rows), color in zip(paths.items(), ("C3", "C2"), strict=False):
        ax.plot([r["kl"] for r in rows], [r["reward"] for r in rows], "-", color=color, lw=1.2)
        for r in rows:
            ax.errorbar(r["kl"], r["reward"], xerr=2 * r["kl_se"], yerr=2 * r["reward_se"], fmt="s", color=color, ms=4)
            ax.annotate(str(r["round"]), (r["kl"], r["reward"]), fontsize=7, color=color, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.plot([], [], "s-", color=color, label=f"iterative DPO, reference {name} (rounds 0-{rows[-1]['round']})")
    for (beta, rows), color in zip((online or {}).items(), ("C1", "C4", "C5"), strict=False):
        ax.plot([r["kl"] for r in rows], [r["reward"] for r in rows], "-", color=color, lw=1.2)
        for r in rows:
            ax.errorbar(r["kl"], r["reward"], xerr=2 * r["kl_se"], yerr=2 * r["reward_se"], fmt="^", color=color, ms=4)
        last = rows[-1]
        ax.annotate(str(last["step"]), (last["kl"], last["reward"]), fontsize=7, color=color, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
        ax.plot([], [], "^-", color=color, label=f"online DPO, β={beta:g} (steps 0-{last['step']})")
    ax.set_xlabel("sampled sequence KL(π ‖ π_SFT) [nats]")
    ax.set_ylabel("true reward of samples (held-out prompts)")
    ax.set_title("Iterative vs offline DPO (±2 s.e.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/iterative_frontier")
    ap.add_argument("--runlocal", action="store_true", help="the configs' runlocal sizes (a smoke run)")
    ap.add_argument("--references", default="keep,refresh", help="rounds.reference variants to run")
    ap.add_argument("--online-betas", default="0.1,0.3", help="betas of the online runs ('' for none)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    arg = ":runlocal" if args.runlocal else ""
    devices = jax.devices()[:1]

    t0 = time.perf_counter()
    members = sweep.run_sweep(str(ROOT / f"configs/beta_sweep.py{arg}"), workdir / "offline", mode="vectorized",
                              devices=devices)  # fmt: skip
    base, declared = sweep.load_sweep(str(ROOT / f"configs/beta_sweep.py{arg}"))
    sft_dir = sweep.member_config(base, declared[0], workdir / "offline").sft.dir
    t_offline = time.perf_counter() - t0

    paths, t_rounds = {}, {}
    for name in args.references.split(","):
        t0 = time.perf_counter()
        cfg = load_config_file(str(ROOT / f"configs/rounds.py{arg}"))
        cfg.rounds.reference = name
        cfg.sft.dir = sft_dir  # the offline sweep's SFT stage: the same reference policy
        paths[name] = rounds.run_rounds(cfg, workdir / f"rounds_{name}", devices=devices)
        t_rounds[name] = time.perf_counter() - t0

    first = workdir / f"rounds_{args.references.split(',')[0]}" / "round_0"
    eval_path = str(first / "data" / "eval.jsonl")
    online, online_end, t_online = {}, [], {}
    small = ",runlocal" if args.runlocal else ""
    for beta in [float(b) for b in args.online_betas.split(",") if b]:
        t0 = time.perf_counter()
        online[beta], run, share = online_run(beta, workdir, sft_dir, small, devices)
        t_online[beta] = (time.perf_counter() - t0, share)
        cfg = load_config_file(str(ROOT / f"configs/rounds.py:online{small}"))
        m = rounds.measure(cfg, run / "hf", first / "hf", eval_path=eval_path, key=cfg.seed + 3)
        end = {"run": f"online beta={beta:g} end (measured)", "accuracy": online[beta][-1]["accuracy"]}
        online_end.append({**end, **m})
    offline = []
    for declared_member, summary in zip(declared, members, strict=True):
        cfg = sweep.member_config(base, declared_member, workdir / "offline")
        run = workdir / "offline" / sweep.member_name(declared_member)
        m = rounds.measure(cfg, run / "hf", first / "hf", eval_path=eval_path, key=cfg.seed + 3)
        offline.append({"beta": summary["dpo.beta"], **m, "accuracy": summary["eval/rewards/accuracies"]})

    rows = [{"run": f"offline beta={r['beta']:g}", **r} for r in offline]
    rows += [{"run": f"rounds ({name}) round {r['round']}", **r} for name, rs in paths.items() for r in rs]
    rows += [{"run": f"online beta={b:g} step {r['step']}", **r} for b, rs in online.items() for r in rs]
    rows += online_end
    cols = ("run", "reward", "reward_se", "kl", "kl_se", "accuracy", "pairs", "sample_reward")
    with open(workdir / "iterative_frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(offline, paths, workdir / "iterative_frontier.png", online)

    print("\n| run | true reward ± 2 s.e. | KL(π ‖ π_SFT) ± 2 s.e. | held-out accuracy |\n|---|---|---|---|")
    for r in rows:
        acc = r.get("accuracy", float("nan"))
        print(f"| {r['run']} | {r['reward']:.3f} ± {2 * r['reward_se']:.3f} | {r['kl']:.2f} ± {2 * r['kl_se']:.2f} | "
              f"{'-' if np.isnan(acc) else f'{acc:.3f}'} |")  # fmt: skip
    print(
        f"\noffline sweep {t_offline:.0f} s; "
        + "; ".join(f"rounds ({k}) {v:.0f} s" for k, v in t_rounds.items())
        + "".join(f"; online beta={b:g} {t:.0f} s ({100 * sh:.0f}% sampling)" for b, (t, sh) in t_online.items())
    )
    print(f"wrote {workdir / 'iterative_frontier.png'} and {workdir / 'iterative_frontier.csv'}")
    return {"offline": offline, "rounds": paths, "online": online, "online_end": online_end}


if __name__ == "__main__":
    main()
