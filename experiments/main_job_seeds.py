"""The main job over seeds: is its headline a property of the config, or of one lucky run?

Runs ``configs/default.py`` (or ``--config``) with ``seed`` 0..N-1 (the model's initialisation, the SFT stage, the
DPO data order, eval's samples; the task's data stays the same), one after another in one process (one compile per
program), and reports the final true reward of samples, the sampled KL to the reference and held-out accuracy as
mean ± s.d. over the seeds, with each seed's row and the lowest eval point after step 0. The reference's reward is
measured twice per run on the held-out prompts (the step-0 eval, where the policy is the reference, and the final
summary's ``reference/reward``); a seed passes when its final reward is at least the reference's + ``--margin``
and no eval point after step 0 falls below the reference.

    python experiments/main_job_seeds.py                           # 5 seeds, about 6 min on 2 CPU cores
    python experiments/main_job_seeds.py --seeds 3 --workdir runs/seeds_smoke --config configs/default.py:runlocal
    python experiments/main_job_seeds.py --override dpo.loss_type=sigmoid   # a variant: any --override a.b=v

Writes ``<workdir>/main_job_seeds.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from dpo_jax.config import load_config_file
from dpo_jax.research.sweep import apply_overrides
from dpo_jax.training.loop import StepCache
from dpo_jax.training.outputs import read_history
from dpo_jax.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def run_seed(base, seed: int, workdir: Path, cache: StepCache) -> dict:
    cfg = apply_overrides(base, {"seed": seed, "wandb.enabled": False})
    summary = train(cfg, workdir / f"seed={seed}", cache=cache)
    history = [r for r in read_history(workdir / f"seed={seed}" / "metrics.jsonl") if "eval/reward" in r]
    first = history[0]  # step 0: the policy is the reference
    reference = (first["eval/reward"] + summary["reference/reward"]) / 2
    later = [r["eval/reward"] for r in history[1:]]
    return {
        "seed": seed,
        "reward": summary["eval/reward"],
        "reward_se": summary["eval/reward_se"],
        "kl": summary["eval/kl_sampled"],
        "accuracy": summary["eval/rewards/accuracies"],
        "reference": reference,
        "lowest_eval": min(later),
        "passes": summary["eval/reward"] >= reference + MARGIN and min(later) >= reference,
    }


MARGIN = 0.25


def parse_override(item: str):
    key, value = item.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv=None) -> list[dict]:
    global MARGIN
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.py"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workdir", default="runs/main_job_seeds")
    ap.add_argument("--margin", type=float, default=MARGIN, help="reward a seed must gain over the reference")
    ap.add_argument("--override", action="append", default=[], help="a.b=value, as --config.a.b=value")
    args = ap.parse_args(argv)
    MARGIN = args.margin
    base = apply_overrides(load_config_file(args.config), dict(map(parse_override, args.override)))
    workdir, cache = Path(args.workdir), StepCache()
    rows = [run_seed(base, s, workdir, cache) for s in range(args.seeds)]
    cols = ("seed", "reward", "reward_se", "kl", "accuracy", "reference", "lowest_eval", "passes")
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "main_job_seeds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    stat = lambda k: f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows], ddof=1):.3f}"  # noqa: E731
    lines = ["| seed | true reward ± s.e. | KL(π ‖ π_ref) | held-out accuracy | reference's reward | lowest eval "
             "after step 0 | passes |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ok = "yes" if r["passes"] else "no"
        lines.append(f"| {r['seed']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['kl']:.2f} | {r['accuracy']:.3f} "
                     f"| {r['reference']:.3f} | {r['lowest_eval']:.3f} | {ok} |")  # fmt: skip
    lines += [
        f"| mean ± s.d. ({len(rows)} seeds) | {stat('reward')} | {stat('kl')} | {stat('accuracy')} | "
        f"{stat('reference')} | {stat('lowest_eval')} | {sum(r['passes'] for r in rows)}/{len(rows)} |"
    ]
    table = "\n".join(lines) + "\n"
    (workdir / "main_job_seeds.md").write_text(table)
    print("\n" + table, flush=True)
    return rows


if __name__ == "__main__":
    main()
