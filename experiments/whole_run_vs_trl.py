"""A whole run against TRL's DPOTrainer on the same local checkpoint and preference files: peak RSS and pairs/s.

Each side runs in its own fresh process, as a user runs it, and its peak resident memory is the kernel's own count
for that process (``wait4``'s ``ru_maxrss``): ours is the ``dpo-jax train`` command of
``experiments/make_gemma270m_checkpoint.py`` (``configs/hf_local.py:cpu``: the reference's log-probs cached, an eval
with sampling at the start and every ``--eval-every`` steps, checkpoints on the same steps, the export), TRL's is
``DPOTrainer`` with its defaults (gradient checkpointing, a reference model) except float32 (its default bf16
autocast is slower on a CPU; ours is float32 too), on the same train and eval files, the same pairs a step, rows up
to the same length, an eval on the same schedule. Step times leave out compiles and evals (ours) and the first
step and the steps an eval ran after (TRL's); the ratio is of the median steps.

    python experiments/make_gemma270m_checkpoint.py /tmp/g270
    python experiments/whole_run_vs_trl.py /tmp/g270 --steps 2 --eval-every 2   # ours ~20 min, TRL ~30 min here
    python experiments/whole_run_vs_trl.py /tmp/g270 --steps 2 --eval-every 2 --sides ours   # one side"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH, MAX_LENGTH, MAX_PROMPT = 8, 1024, 512


def ours_argv(folder: Path, workdir: str, steps: int, eval_every: int) -> list[str]:
    """The ``dpo-jax train`` command of make_gemma270m_checkpoint.py's docstring, ``steps`` long."""
    return [
        sys.executable, "-m", "dpo_jax", "train", "--config", "configs/hf_local.py:cpu", "--workdir", workdir,
        f"--config.model.hf_path={folder / 'model'}", f"--config.data.train_path={folder / 'train.jsonl'}",
        f"--config.data.eval_path={folder / 'eval.jsonl'}", f"--config.data.max_length={MAX_LENGTH}",
        f"--config.data.max_prompt_length={MAX_PROMPT}", "--config.data.buckets=(512,1024)",
        f"--config.optim.steps={steps}", f"--config.optim.batch_size={BATCH}", f"--config.eval.every={eval_every}",
        f"--config.checkpoint.every={eval_every}", "--config.log_every=1",
    ]  # fmt: skip


def run_measured(argv: list[str], env: dict | None = None) -> float:
    """Run ``argv`` to its end; its peak RSS in GB (the kernel's count for that process)."""
    proc = subprocess.Popen(argv, env=env, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv[:4]}... exited with {proc.returncode}")
    return usage.ru_maxrss / 1e6  # kB -> GB


def ours(folder: Path, steps: int, eval_every: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        peak = run_measured(ours_argv(folder, workdir, steps, eval_every))
        rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    times = [r["dpo/step_time_s"] for r in rows if "dpo/step_time_s" in r]
    return {"peak_rss_gb": peak, "step_times_s": times}


def trl_child(folder: Path, steps: int, eval_every: int, out: Path) -> None:
    """TRL's DPOTrainer, defaults as installed, on the same files; writes its step times to ``out``."""
    import datasets
    import torch
    import transformers
    import trl

    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder / "model")
    files = {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl")}
    data = datasets.load_dataset("json", data_files=files)
    train = data["train"].map(lambda r: {"chosen": " " + r["chosen"], "rejected": " " + r["rejected"]})
    evals = data["eval"].map(lambda r: {"chosen": " " + r["chosen"], "rejected": " " + r["rejected"]})
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = trl.DPOConfig(
            output_dir=tmp, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH, max_steps=steps,
            learning_rate=5e-7, beta=0.1, max_length=MAX_LENGTH, eval_strategy="steps", eval_steps=eval_every,
            report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
            bf16=False, fp16=False,  # float32, as ours (TRL 1.16 defaults to bf16 autocast, slower on a CPU)
        )  # fmt: skip
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok,
                                 callbacks=[Clock()])  # fmt: skip
        start = time.perf_counter()
        trainer.train()
    gaps = np.diff([start, *times])
    # the eval after step k runs before step k + 1 ends: leave those steps out, and the first (warm-up)
    steps_only = [float(g) for i, g in enumerate(gaps, 1) if i > 1 and (i - 1) % eval_every]
    versions = f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"
    out.write_text(json.dumps({"step_times_s": steps_only, "all_steps_s": gaps.tolist(), "versions": versions}))


def trl(folder: Path, steps: int, eval_every: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        argv = [sys.executable, __file__, str(folder), "--trl-child", str(out), "--steps", str(steps),
                "--eval-every", str(eval_every)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DPO_JAX_KEEP_MEMORY")}
        peak = run_measured(argv, env)
        return {"peak_rss_gb": peak, **json.loads(out.read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="what make_gemma270m_checkpoint.py wrote")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--sides", default="ours,trl")
    p.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_child:
        return trl_child(a.folder, a.steps, a.eval_every, a.trl_child)
    results = {}
    for side in a.sides.split(","):
        results[side] = (ours if side == "ours" else trl)(a.folder, a.steps, a.eval_every)
        r = results[side]
        print(f"{side}: peak RSS {r['peak_rss_gb']:.2f} GB, step times {[round(t, 1) for t in r['step_times_s']]} s "
              f"{r.get('versions', '')}", flush=True)  # fmt: skip
    print(f"\n{BATCH} pairs a step, rows <= {MAX_LENGTH} tokens, {a.steps} steps, eval every {a.eval_every}")
    print("| side | median s/step | pairs/s | peak RSS | x TRL pairs/s |")
    print("|---|---|---|---|---|")
    trl_pps = BATCH / np.median(results["trl"]["step_times_s"]) if "trl" in results else float("nan")
    for side, r in results.items():
        pps = BATCH / np.median(r["step_times_s"])
        print(f"| {side} | {np.median(r['step_times_s']):.1f} | {pps:.4f} | {r['peak_rss_gb']:.2f} GB | "
              f"{pps / trl_pps:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
