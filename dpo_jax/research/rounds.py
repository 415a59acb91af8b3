"""Iterative (online) DPO: rounds of sampling from the current policy, best-vs-worst pairs, and a DPO run.

    dpo-jax rounds --config configs/rounds.py --workdir runs/rounds
    dpo-jax rounds --config configs/rounds.py:runlocal --workdir runs/rounds_smoke     # a minute on a CPU

``<workdir>/round_0`` holds the initial policy (the config's SFT stage, or its model) as a Hugging Face folder
(``hf/``) and, for the built-in task, its data. Round r >= 1 is an ordinary run directory ``<workdir>/round_<r>``
(checkpoints, metrics, W&B run, summary, plots, ``hf/`` export) made in three steps:

1. sample ``rounds.samples`` completions for each of ``rounds.prompts`` training prompts from round r-1's policy
   (KV-cache generation, ``rounds.temperature``) and score them with ``config.reward``; the best and the worst
   completion of a prompt are its chosen and rejected (prompts whose samples all score the same are skipped;
   an empty completion, EOS first, is never paired: data rows need text):
   ``pairs.jsonl`` (the data's column names) and ``sampling.json``;
2. train DPO (``optim.*``, ``dpo.*``) from round r-1's policy on those pairs, the reference being the round-0
   policy (``rounds.reference="keep"``) or round r-1's (``"refresh"``); the run's own eval as for any run;
3. measure it against round 0 on the held-out prompts: the true reward of its samples and the sampled sequence
   KL(pi_r || pi_0), with standard errors (``round.json``): the reward-KL frontier's axes, comparable with
   offline runs from the same round-0 policy (``measure``).

Rerunning the command resumes: finished rounds are skipped, an interrupted round continues from its last
checkpoint (its pairs are never sampled again), and a larger ``rounds.num`` adds rounds. Changing what the pairs
are made from (the other ``rounds.*`` fields, the reward) is refused. ``<workdir>/rounds.md`` and ``rounds.json``
tabulate every round.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dpo_jax.config import CHANGEABLE_ON_RESUME, ConfigError, online, validate
from dpo_jax.core import scoring
from dpo_jax.data import load_examples, rewards, tokenize_examples
from dpo_jax.errors import WorkdirError
from dpo_jax.infra import checkpoint, hf, signals
from dpo_jax.infra.logging import Writer
from dpo_jax.infra.signals import stop_signals
from dpo_jax.infra.workdir import WorkdirLock, atomic_dir, atomic_write_text, check_resume_config, ensure_writable
from dpo_jax.models import lora
from dpo_jax.training import builders, inputs, runs, train
from dpo_jax.training.evaluate import sample_prompts, sampled_metrics
from dpo_jax.training.online import best_and_worst, sample_completions

RECORD = "rounds_config.json"  # what the pairs are made from; fixed for a workdir


def round_dir(workdir, r: int) -> Path:
    return Path(workdir) / f"round_{r}"


def _record(cfg) -> dict:
    ro = cfg.rounds
    fields = ("samples", "prompts", "reference", "temperature", "max_new_tokens", "cut_samples")
    return {**{f"rounds.{k}": ro[k] for k in fields}, "reward": rewards.spec(cfg)}


def check_record(cfg, workdir: Path) -> None:
    """Refuse a rerun that changes how pairs are made (``rounds.num`` may change: more rounds)."""
    path, current = workdir / RECORD, _record(cfg)
    if path.exists():
        saved = json.loads(path.read_text())
        diff = [f"{k} {saved[k]!r} -> {v!r}" for k, v in current.items() if k in saved and saved[k] != v]
        if diff:
            raise WorkdirError(
                f"config changed since the rounds in {workdir} began: {', '.join(diff)}: rerun with the original "
                "values or use a new --workdir"
            )
    atomic_write_text(path, json.dumps(current, indent=1) + "\n")


# --- Round 0 ----------------------------------------------------------------------------------------------------


def initial_policy(cfg, workdir: Path, devices) -> Path:
    """``round_0``: the policy round 1 samples from (after the config's SFT stage), exported once as ``hf/``."""
    out = round_dir(workdir, 0)
    if (out / "hf" / "config.json").exists():
        return out
    c = copy.deepcopy(cfg)
    c.reference.mode = "frozen"  # no reference pass over the offline pairs: only the policy is wanted here
    c.reference.hf_path = ""
    for folder, record in runs.stage_records(c, out).items():  # a resumed SFT stage must match the config
        if folder.name == "sft":
            step = checkpoint.latest_step_on_disk(folder / "checkpoints")
            check_resume_config(folder, record, allow=set(), step=step, changeable=CHANGEABLE_ON_RESUME)
    job = train.build_job(c, out, devices, Writer())
    params = jax.device_get(job.policy.whole())
    if jax.process_index() == 0:
        model = nnx.merge(job.policy.graphdef, params)
        model = lora.detach(model) if model.config.lora_rank else model
        with atomic_dir(out / "hf") as tmp:
            hf.save_pretrained(model, tmp, job.tokenizer)
    runs.barrier("round_0")
    return out


def data_paths(cfg, workdir: Path) -> dict[str, str]:
    """Training prompts, held-out pairs and tokenizer: the built-in task's (written in round 0) or the files'."""
    if cfg.task == "synthetic":
        data = round_dir(workdir, 0) / "data"
        return {
            k: str(data / name)
            for k, name in (("train", "train.jsonl"), ("eval", "eval.jsonl"), ("tokenizer", "tokenizer"))
        }
    return {"train": cfg.data.train_path, "eval": cfg.data.eval_path, "tokenizer": cfg.data.tokenizer_path}


def load_prompts(cfg, path: str, tokenizer, n: int = 0):
    """(examples, tokenized pairs) of ``path``, one per distinct tokenized prompt (the first ``n``; 0: all)."""
    d = cfg.data
    examples, _ = load_examples(path, columns=inputs.columns(cfg), on_bad_row=d.on_bad_row, split=d.split or None,
                                max_chars=inputs.max_row_chars(cfg))  # fmt: skip
    pairs, _ = tokenize_examples(examples, tokenizer, inputs.tokenize_config(cfg))
    seen, keep = set(), []
    for ex, pair in zip(examples, pairs, strict=True):
        if pair.prompt.tobytes() not in seen:
            seen.add(pair.prompt.tobytes())
            keep.append((ex, pair))
    keep = keep[:n] if n else keep
    return [ex for ex, _ in keep], [p for _, p in keep]


def prompt_text(prompt) -> str:
    """A prompt as the reward function receives it (a conversation as its JSON, as in eval)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


# --- Sampling and pairs -----------------------------------------------------------------------------------------


def round_prompts(count: int, cfg, r: int) -> np.ndarray:
    """Indices of round r's prompts: a fixed permutation (seeded by ``seed``) cut in consecutive slices of
    ``rounds.prompts``, wrapping around; all prompts each round when ``rounds.prompts`` is 0 or >= count."""
    per_round = cfg.rounds.prompts
    if not per_round or per_round >= count:
        return np.arange(count)
    order = np.random.default_rng(cfg.seed).permutation(count)
    return order[(np.arange(per_round) + (r - 1) * per_round) % count]


def make_pairs(cfg, workdir: Path, r: int, policy_dir: Path) -> dict:
    """Round r's ``pairs.jsonl`` from samples of the policy in ``policy_dir``; returns its sampling stats."""
    out = round_dir(workdir, r)
    paths = data_paths(cfg, workdir)
    model, tokenizer = hf.load_pretrained(policy_dir, **{**builders.model_options(cfg), "remat": "none"})
    if tokenizer is None:
        raise ConfigError(f"config.model.hf_path: expected tokenizer.json in {policy_dir} (the prompts are sampled)")
    examples, pairs = load_prompts(cfg, paths["train"], tokenizer)
    chosen = round_prompts(len(pairs), cfg, r)
    ro = cfg.rounds
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 2), r)
    t_sample = time.perf_counter()
    texts, ended = sample_completions(
        model, tokenizer, [pairs[i].prompt for i in chosen], n=ro.samples, key=key, temperature=ro.temperature,
        max_new_tokens=ro.max_new_tokens or cfg.eval.max_new_tokens, budget_mb=ro.sample_memory_mb,
    )  # fmt: skip
    prompts = [examples[i].prompt for i in chosen]
    t_score = time.perf_counter()
    flat = rewards.score_all(
        rewards.spec(cfg), [prompt_text(p) for p in prompts for _ in range(ro.samples)], sum(texts, []),
        cfg.reward_timeout_s, dtype=cfg.model.dtype,
    )  # fmt: skip
    scores = flat.reshape(len(prompts), ro.samples)
    tokens = sum(len(tokenizer.encode(y)) for ys in texts for y in ys)
    sample_s = t_score - t_sample
    timing = {"sample_s": sample_s, "sampled_tokens": tokens, "sample_tokens_per_s": tokens / max(sample_s, 1e-9),
              "score_s": time.perf_counter() - t_score}  # fmt: skip
    # an empty completion (EOS first) cannot be a data row: such samples are not paired; nor, with
    # rounds.cut_samples="drop", one cut off at max_new_tokens (with "score" it is paired, marked <column>_cut, and
    # tokenized without an end-of-turn: scored as the policy produced it)
    eligible = np.array([[bool(y.strip()) for y in ys] for ys in texts]) & (ended | (ro.cut_samples == "score"))
    best, worst, distinct = best_and_worst(scores, eligible)
    d = cfg.data
    as_completion = lambda p, y: y if isinstance(p, str) else [{"role": "assistant", "content": y}]  # noqa: E731
    rows = [
        {
            d.prompt_column: p,
            d.chosen_column: as_completion(p, ys[b]),
            d.rejected_column: as_completion(p, ys[w]),
            "chosen_reward": float(s[b]),
            "rejected_reward": float(s[w]),
            **({f"{d.chosen_column}_cut": True} if not e[b] else {}),
            **({f"{d.rejected_column}_cut": True} if not e[w] else {}),
        }  # fmt: skip
        for p, ys, s, e, b, w, ok in zip(prompts, texts, scores, ended, best, worst, distinct, strict=True)
        if ok
    ]
    stats = {
        "round": r,
        "policy": str(policy_dir),
        "prompts": len(prompts),
        "samples_per_prompt": ro.samples,
        "pairs": len(rows),
        "skipped_ties": int((~distinct).sum()),
        "empty_samples": int(sum(not y.strip() for ys in texts for y in ys)),
        "cut_samples": int((~ended).sum()),  # cut off at max_new_tokens: dropped, or paired as cut (cut_samples)
        "cut_in_pairs": sum(f"{c}_cut" in row for row in rows for c in (d.chosen_column, d.rejected_column)),
        "sample_reward": float(scores.mean()),
        "best_reward": float(scores.max(axis=1).mean()),
        "worst_reward": float(scores.min(axis=1).mean()),
    }
    if not rows:
        if ro.cut_samples == "drop" and stats["cut_samples"]:
            raise ConfigError(
                f"config.rounds.cut_samples: 'drop' left no pairs in round {r}: {stats['cut_samples']} of "
                f"{len(prompts) * ro.samples} samples were cut off at max_new_tokens (raise rounds.max_new_tokens, "
                "or pair them as cut with 'score')"
            )
        raise ConfigError(
            f"config.reward: every one of the {len(prompts)} prompts of round {r} had {ro.samples} samples with equal "
            "rewards: no pairs to train on (raise rounds.samples or rounds.temperature)"
        )
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "timing.json", json.dumps(timing, indent=1) + "\n")  # this host's: not in the table
        atomic_write_text(out / "sampling.json", json.dumps(stats, indent=1) + "\n")
        atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(row) + "\n" for row in rows))  # last: "sampled"
    runs.barrier(f"round_{r}_pairs")
    return stats


# --- A round's run ----------------------------------------------------------------------------------------------


def round_config(cfg, workdir: Path, r: int):
    """Round r's run config: the base config on round r's pairs, from round r-1's policy, no SFT stage."""
    c = copy.deepcopy(cfg)
    paths = data_paths(cfg, workdir)
    first = round_dir(workdir, 0) / "hf"
    c.task = "files"
    c.data.train_path = str(round_dir(workdir, r) / "pairs.jsonl")
    c.data.eval_path = paths["eval"]
    c.data.tokenizer_path = paths["tokenizer"]
    c.data.sft_path = ""
    c.sft.steps = 0
    c.model.init = "hf"
    c.model.hf_path = str(round_dir(workdir, r - 1) / "hf")
    keep = cfg.rounds.reference == "keep"
    c.reference.hf_path = (cfg.reference.hf_path or (str(first) if r > 1 else "")) if keep else ""
    c.reward = rewards.spec(cfg)
    c.reference.cache_dir = cfg.reference.cache_dir or str(workdir / "reference_cache")
    c.wandb.group = cfg.wandb.group or workdir.name
    c.wandb.name = f"{workdir.name}/round_{r}"
    return c


def measure(cfg, policy_dir, initial_dir, *, eval_path: str, key: int = 0) -> dict[str, float]:
    """The policy in ``policy_dir`` against the one in ``initial_dir`` on the held-out prompts of ``eval_path``
    (``eval.num_prompts``, ``eval.temperature``, ``eval.max_new_tokens``): mean true reward of one sample per
    prompt and the sampled sequence KL(pi || pi_0), each with its standard error. The same ``key`` samples the
    same way for every policy (offline runs and rounds alike)."""
    load = lambda p: hf.load_pretrained(p, **{**builders.model_options(cfg), "remat": "none"})  # noqa: E731
    (policy, tokenizer), (initial, _) = load(policy_dir), load(initial_dir)
    examples, pairs = load_prompts(cfg, eval_path, tokenizer, cfg.eval.num_prompts)
    prompts = sample_prompts(pairs, examples, cfg.eval.num_prompts, tokenizer.pad_token_id or 0)
    mb = builders.head_options(cfg)["max_logits_mb"]  # the LM head's budget, as in training and eval
    ref_logps = functools.partial(_sample_logps, *nnx.split(initial), max_logits_mb=mb)
    m = sampled_metrics(policy, ref_logps, prompts, tokenizer, cfg.eval, jax.random.PRNGKey(key),
                        rewards.scorer(rewards.spec(cfg), cfg.reward_timeout_s, dtype=cfg.model.dtype))  # fmt: skip
    return {"reward": m["reward"], "reward_se": m["reward_se"], "kl": m["kl_sampled"], "kl_se": m["kl_sampled_se"],
            "eval_prompts": len(prompts[2])}  # fmt: skip


_sample_logps = jax.jit(scoring.sample_logps, static_argnums=0, static_argnames="max_logits_mb")  # per structure, shape


def table(rows: list[dict]) -> str:
    head = (
        "| round | pairs (prompts tied) | its training samples' reward: mean (best / worst) | eval reward ± s.e. | "
        "KL(pi_r ‖ pi_0) ± s.e. | held-out accuracy |\n|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        pairs = f"{row['pairs']} ({row['skipped_ties']})" if "pairs" in row else "-"
        sampled = (
            f"{row['sample_reward']:.3f} ({row['best_reward']:.3f} / {row['worst_reward']:.3f})"
            if "pairs" in row
            else "-"
        )
        acc = f"{row['accuracy']:.3f}" if "accuracy" in row else "-"
        lines.append(
            f"| {row['round']} | {pairs} | {sampled} | {row['reward']:.3f} ± {row['reward_se']:.3f} | "
            f"{row['kl']:.2f} ± {row['kl_se']:.2f} | {acc} |"
        )
    return head + "\n".join(lines) + "\n"


def run_rounds(cfg, workdir, *, devices=None) -> list[dict]:
    """Round 0, then rounds 1 .. ``rounds.num`` (each resumed or skipped when already done); returns the table's
    rows (also ``<workdir>/rounds.json`` and ``rounds.md``)."""
    devices = list(jax.devices() if devices is None else devices)
    workdir = ensure_writable(workdir)
    validate(cfg, num_devices=len(devices), members=1)
    if online(cfg):
        raise ConfigError("config.rounds.online: online DPO is one run of dpo-jax train (rounds of one step-batch); "
                          "dpo-jax rounds trains a run per round: set rounds.online=False")  # fmt: skip
    value = rewards.spec(cfg)
    if not value:
        raise ConfigError("config.reward: expected 'module:function' (rounds score their samples) with task='files'")
    rewards.check(value)
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext(), stop_signals():
        check_record(cfg, workdir)
        first = initial_policy(cfg, workdir, devices) / "hf"
        eval_path = data_paths(cfg, workdir)["eval"]
        rows = [{"round": 0, **_measured(cfg, round_dir(workdir, 0), first, eval_path)}]
        for r in range(1, cfg.rounds.num + 1):
            out = round_dir(workdir, r)
            if not (out / "pairs.jsonl").exists():
                print(f"[round {r}] sampling {cfg.rounds.samples} per prompt from round {r - 1}", flush=True)
                make_pairs(cfg, workdir, r, round_dir(workdir, r - 1) / "hf")
            stats = json.loads((out / "sampling.json").read_text())
            if (out / "summary.json").exists():
                summary = runs.load_summary(out)
            else:
                print(f"[round {r}] {stats['pairs']} pairs ({stats['skipped_ties']} tied); training", flush=True)
                summary = train.train(round_config(cfg, workdir, r), out, devices=devices)
            print_shares(r, out, summary)
            row = {**stats, **_measured(cfg, out, first, eval_path)}
            row["accuracy"] = summary.get("eval/rewards/accuracies", float("nan"))
            rows.append(row)
        if jax.process_index() == 0:
            atomic_write_text(workdir / "rounds.json", json.dumps(rows, indent=1) + "\n")
            atomic_write_text(workdir / "rounds.md", table(rows))
            print("\n" + table(rows), flush=True)
    return rows


def print_shares(r: int, out: Path, summary: dict) -> None:
    """Where round r's time went: sampling (and its tokens/s), scoring, training (this run's wall time, when the
    round trained here; ``timing.json``)."""
    file = out / "timing.json"
    if jax.process_index() or not file.exists():
        return
    t = json.loads(file.read_text())
    parts = {"sampling": t["sample_s"], "scoring": t["score_s"], "training": summary.get("wall_time_s", 0.0)}
    total = sum(parts.values()) or 1.0
    shares = ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in parts.items())
    print(f"[round {r}] {shares}; sampled {t['sampled_tokens']} tokens at {t['sample_tokens_per_s']:.1f} tokens/s",
          flush=True)  # fmt: skip


def _measured(cfg, folder: Path, first: Path, eval_path: str) -> dict:
    """``round.json`` of a round: measured once (reward and KL to round 0), then read."""
    path = folder / "round.json"
    if path.exists():
        return json.loads(path.read_text())
    signals.check("before measuring the round (rerun to continue)")
    result = measure(cfg, folder / "hf", first, eval_path=eval_path, key=cfg.seed + 3)
    if jax.process_index() == 0:
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result
