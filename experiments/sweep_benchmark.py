"""Wall time of a K = 8 member beta sweep: vectorised (one program, the members split over the devices' ``member``
axis) vs sequential (one process, one compiled step reused, each run data-parallel over the same devices) vs 8
separate ``dpo-jax train`` processes (the exported ``commands.sh``) run one after another
(``--modes ...,parallel_processes`` adds all 8 at once). Also the step time per member (the population's step
time / K when vectorised), from the runs' logs.

    python experiments/sweep_benchmark.py --devices 8 --modes vectorized,sequential   # 8 simulated CPU devices
    python experiments/sweep_benchmark.py --devices 1                                 # one device (a GPU)
    python experiments/sweep_benchmark.py --config configs/sweep_benchmark.py:runlocal   # smoke

The SFT reference and the reference log-prob cache are built once before timing and shared by every mode, so
the figures compare how members are run. Each mode writes complete runs (checkpoints, eval, W&B, export).
Prints a table and writes <workdir>/sweep_benchmark.csv and .png.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--devices" in sys.argv and "XLA_FLAGS" not in os.environ:  # simulated CPU devices: before jax is imported
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[sys.argv.index('--devices') + 1]}"

import jax  # noqa: E402

from dpo_jax.research import sweep  # noqa: E402
from dpo_jax.training import train
from dpo_jax.training.outputs import read_history  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_commands(lines: list[str], parallel: bool) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    procs = []
    for line in lines:
        args = shlex.split(line)
        args = [sys.executable, "-m", "dpo_jax", *args[1:]]  # the same `dpo-jax train ...` without a PATH lookup
        log = open(Path(args[args.index("--workdir") + 1] + ".log"), "w")  # noqa: SIM115
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if parallel:
            procs.append(p)
        elif p.wait() != 0:
            raise RuntimeError(f"{line} failed: see its .log")
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("a member process failed: see the .log files")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description="vectorised vs sequential vs separate-process sweeps")
    ap.add_argument("--config", default=str(ROOT / "configs/sweep_benchmark.py"))
    ap.add_argument("--workdir", default="runs/sweep_benchmark")
    ap.add_argument("--modes", default="vectorized,sequential,processes", help="also: parallel_processes")
    ap.add_argument("--devices", type=int, default=1, help="devices every mode uses (CPU: simulated)")
    args = ap.parse_args(argv)
    root = Path(args.workdir).resolve()
    base, members = sweep.load_sweep(args.config)
    k, devices = len(members), jax.devices()[: args.devices]
    # Shared SFT stage and reference cache, built before any timing.
    shared = sweep.member_config(base, members[0], root)
    base.sft.dir, base.reference.cache_dir = shared.sft.dir, shared.reference.cache_dir
    warm = sweep.apply_overrides(base, {"optim.steps": 1, "eval.num_prompts": 0, "export_hf": False})
    warm.wandb.enabled = False
    train.train(warm, root / "_warmup", devices=devices)

    rows = []
    for mode in args.modes.split(","):
        wd = root / mode
        if mode in ("vectorized", "sequential"):
            sec = _timed(
                lambda wd=wd, mode=mode: sweep.run_sweep(args.config, wd, base=base, mode=mode, devices=devices)
            )
        else:
            lines = sweep.export_sweep(args.config, wd, base=base)["commands"].read_text().splitlines()
            lines = [ln for ln in lines if ln.startswith("dpo-jax ")]  # each names the shared SFT dir and cache
            lines = [
                f"{ln} --config.sft.dir={base.sft.dir} --config.reference.cache_dir={base.reference.cache_dir}"
                for ln in lines
            ]  # noqa: E501
            sec = _timed(lambda lines=lines, mode=mode: run_commands(lines, parallel=mode == "parallel_processes"))
        steps = k * base.optim.steps
        step_s = member_step_time(wd, members, vectorized=mode == "vectorized")
        rows.append(
            {"mode": mode, "members": k, "devices": len(devices), "wall_s": sec, "member_steps_per_s": steps / sec,
             "member_step_ms": 1e3 * step_s}
        )  # fmt: skip
        print(f"[benchmark] {mode}: {sec:.1f} s for {k} members on {len(devices)} devices", flush=True)
    ref = {r["mode"]: r["wall_s"] for r in rows}
    for r in rows:
        r["speedup_vs_sequential"] = ref.get("sequential", float("nan")) / r["wall_s"]
    with (root / "sweep_benchmark.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, root / "sweep_benchmark.png", base)
    head = f"mode ({len(devices)} devices, {k} members)"
    print(f"\n| {head} | wall s | member-steps/s | ms/step per member | vs sequential |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['wall_s']:.1f} | {r['member_steps_per_s']:.2f} | {r['member_step_ms']:.1f} | "
            f"{r['speedup_vs_sequential']:.2f}x |"
        )
    print(f"wrote {root / 'sweep_benchmark.csv'} and sweep_benchmark.png")
    return rows


def member_step_time(workdir: Path, members, *, vectorized: bool) -> float:
    """Median logged DPO step time of one member (compile and eval excluded): a population's step / K."""
    times = []
    for m in members:
        hist = read_history(workdir / sweep.member_name(m) / "metrics.jsonl")
        times += [r["dpo/step_time_s"] for r in hist if "dpo/step_time_s" in r][1:]  # the first interval warms up
    if not times:
        return float("nan")
    return statistics.median(times) / (len(members) if vectorized else 1)


def plot(rows, path: Path, base) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    names = [r["mode"].replace("_", " ") for r in rows]
    ax.barh(names, [r["wall_s"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    for i, r in enumerate(rows):
        ax.text(r["wall_s"], i, f" {r['wall_s']:.0f} s ({r['speedup_vs_sequential']:.2f}x)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall time [s]")
    ax.set_title(f"{rows[0]['members']} members x {base.optim.steps} DPO steps (+ eval, checkpoints, export)")
    ax.set_xlim(0, max(r["wall_s"] for r in rows) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
