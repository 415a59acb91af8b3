"""Evaluation during training and the run's outputs (summary, plots, Hugging Face export).

Shape letters: B pairs, n sampled prompts, P prompt tokens, N new tokens.

Metrics (under ``eval/``):
  loss, rewards/*, logps/*, preference_prob   held-out preference pairs, as in training
  kl_token        exact full-vocabulary KL(pi || pi_ref) per token of the held-out chosen completions
  kl_seq_exact    the same summed per completion
  kl_sampled      E_{y~pi}[log pi(y|x) - log pi_ref(y|x)], the sequence KL the DPO paper plots, from
                  ``num_prompts`` samples (temperature ``eval.temperature``); kl_sampled_se its standard error
  reward          mean true reward of those samples (the built-in task); reward_se its standard error
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dpo_jax import lora, reference, sampling, scoring, signals
from dpo_jax.data import PreferenceLoader, to_global
from dpo_jax.errors import NonFiniteLoss
from dpo_jax.logging import read_jsonl
from dpo_jax.sharding import replicated, take_member
from dpo_jax.workdir import atomic_dir, atomic_write_text


class Evaluator:
    """Held-out preference metrics and sampled KL / reward of every member of a population ([K] parameters and
    hyper-parameters): one compiled program serves all members and values (``train.pair_losses``)."""

    def __init__(
        self,
        *,
        cfg,
        graphdef,
        reference_params,
        eval_pairs,
        eval_examples,
        ref_eval,
        tokenizer,
        mesh,
        loader_kw,
        sc,
        reward_fn=None,
        base=None,
    ):
        from dpo_jax.train import pair_losses, reference_logps

        self.cfg, self.graphdef, self.reference, self.mesh = cfg, graphdef, reference_params, mesh
        self.base = base  # LoRA: members' params are adapters on this frozen base
        self.tokenizer, self.reward_fn, self.ref_eval = tokenizer, reward_fn, ref_eval
        self.loader = PreferenceLoader(eval_pairs, cfg.eval.batch_size, shuffle=False, drop_last=False, **loader_kw)
        self.last: list[dict] = []
        cached = ref_eval is not None

        def pref(params, hparams, batch, ref_params, base):
            params = lora.whole(params, base)
            stats = scoring.pair_stats(graphdef, params, batch, tails=sc.ld, wpo=sc.wpo, **sc.head)
            ref = reference_logps(graphdef, batch, ref_params, hparams, sc, cached=cached)
            losses, metrics = pair_losses(stats, ref, batch, hparams, sc)
            valid = scoring.pair_values(batch, "valid")
            n = jnp.sum(valid)
            kl, kl_tokens = scoring.completion_token_kl(graphdef, params, ref_params, batch)
            # a metric with a "share/<key>" averages over that share of the pairs only (KTO's per-label means)
            shares = {k[len("share/") :]: v for k, v in metrics.items() if k.startswith("share/")}
            sums = {k: v * n * shares.get(k, 1.0) for k, v in metrics.items() if not k.startswith("share/")}
            sums.update({f"n/{k}": n * s for k, s in shares.items()})
            sums.update(loss=jnp.sum(losses * valid), n=n, kl=jnp.sum(kl * valid), kl_tokens=jnp.sum(kl_tokens * valid))
            return sums

        self._pref = jax.jit(jax.vmap(pref, in_axes=(0, 0, None, None, None)), out_shardings=replicated(mesh))
        self._ref_logps = jax.jit(functools.partial(scoring.sample_logps, graphdef))
        # KTO's examples (dpo_jax.data.kto) start with one per pair, in order: the prompts are those of the pairs
        prompt_pairs = eval_pairs[: len(eval_examples)]
        self.prompts = self._prompts(prompt_pairs, eval_examples, cfg.eval.num_prompts, tokenizer.pad_token_id or 0)

    @staticmethod
    def _prompts(pairs, examples, n, pad_id):
        seen, ids, texts = set(), [], []
        for pair, ex in zip(pairs, examples, strict=True):
            key = pair.prompt.tobytes()
            if key in seen:
                continue
            seen.add(key)
            ids.append(pair.prompt)
            texts.append(ex.prompt if isinstance(ex.prompt, str) else json.dumps(ex.prompt))
            if len(ids) == n:
                break
        if not ids:
            return None
        width = max(len(x) for x in ids)
        prompt = np.full((len(ids), width), pad_id, np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for i, x in enumerate(ids):
            prompt[i, width - len(x) :] = x
            mask[i, width - len(x) :] = 1
        return prompt, mask, texts

    def preference(self, params_K, hparams_K) -> list[dict[str, float]]:
        totals: dict[str, np.ndarray] = {}
        batches = progress(self.loader.epoch(0), self.loader.steps_per_epoch, "eval")
        for _, batch in batches:
            signals.check("during eval")
            if self.ref_eval is not None:
                reference.attach(batch, self.ref_eval)
            sums = jax.device_get(
                self._pref(params_K, hparams_K, to_global(batch, self.mesh), self.reference, self.base)
            )
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        batches.close()
        rows = []
        for m in range(len(totals["n"])):
            t = {k: float(v[m]) for k, v in totals.items()}
            n = max(t.pop("n"), 1.0)
            kl, kl_tokens = t.pop("kl"), t.pop("kl_tokens")
            counts = {k[2:]: t.pop(k) for k in list(t) if k.startswith("n/")}
            out = {f"eval/{k}": v / max(counts.get(k, n), 1e-9) for k, v in t.items()}
            if "rewards/chosen" in counts:  # per-label means: the margin is their difference
                out["eval/rewards/margins"] = out["eval/rewards/chosen"] - out["eval/rewards/rejected"]
            out.update({"eval/kl_token": kl / max(kl_tokens, 1.0), "eval/kl_seq_exact": kl / n})
            rows.append(out)
        return rows

    def sampled(self, params, key, prefix="eval/") -> dict[str, float]:
        """Sequence KL to the reference and true reward of samples from ``params``."""
        if self.prompts is None or self.cfg.eval.num_prompts <= 0:
            return {}
        signals.check("during eval")
        model = nnx.merge(self.graphdef, params)
        ref_logps = functools.partial(self._ref_logps, self.reference)
        res = sampled_metrics(model, ref_logps, self.prompts, self.tokenizer, self.cfg.eval, key, self.reward_fn)
        return {f"{prefix}{k}": v for k, v in res.items()}

    def __call__(self, params_K, hparams_K, step: int) -> list[dict[str, float]]:
        """Every member's eval row."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed + 1), step)
        rows = self.preference(params_K, hparams_K)
        members = (lora.whole(take_member(params_K, k, self.mesh), self.base) for k in range(len(rows)))
        self.last = [{**row, **self.sampled(params, key)} for row, params in zip(rows, members, strict=True)]
        return self.last

    def final(self, params_K, hparams_K, step: int) -> list[dict[str, float]]:
        """The last eval, plus the reference's sampled reward and KL (about 0) on the same prompts."""
        if not self.last:
            self(params_K, hparams_K, step)
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed + 1), step)
        ref = self.sampled(self.reference, key, prefix="reference/")
        return [{**row, **ref} for row in self.last]


def sampled_metrics(model, ref_logps, prompts, tokenizer, ev, key, reward_fn=None) -> dict[str, float]:
    """One sample per prompt from ``model`` (``prompts``: left-padded ids, mask, texts; ``ev``: the eval section's
    temperature and max_new_tokens): the sequence KL E[log pi(y|x) - log pi_ref(y|x)] (``ref_logps(prompt, mask,
    tokens, mask)``: the reference's per-token log-probs) and, with ``reward_fn(prompts, completions)``, the mean
    true reward, each with its standard error (``kl_sampled``, ``reward`` and their ``_se``; ``sample_length``)."""
    prompt, mask, texts = prompts
    out = sampling.generate(
        model, prompt, mask, key=key, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
        eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id or 0,
    )  # fmt: skip
    ref = ref_logps(prompt, mask, out.tokens_BxN, out.mask_BxN)
    log_ratio = np.asarray(jnp.sum(out.logps_BxN - ref, axis=-1), np.float64)
    n = len(log_ratio)
    res = {
        "kl_sampled": log_ratio.mean(),
        "kl_sampled_se": log_ratio.std(ddof=1) / np.sqrt(n),
        "sample_length": np.asarray(out.mask_BxN).sum(-1).mean(),
    }
    if reward_fn is not None:
        tokens, valid = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
        rewards = reward_fn(texts, [tokenizer.decode(x[v]) for x, v in zip(tokens, valid, strict=True)])
        res.update(reward=rewards.mean(), reward_se=rewards.std(ddof=1) / np.sqrt(n))
    return {k: float(v) for k, v in res.items()}


# --- Outputs ----------------------------------------------------------------------------------------------------

PLOTS = (
    ("loss", ("sft/loss", "train/loss", "eval/loss")),
    ("implicit reward margin", ("train/rewards/margins", "eval/rewards/margins")),
    ("preference accuracy", ("train/rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/ties")),
    ("KL(pi || pi_ref)", ("eval/kl_sampled", "eval/kl_seq_exact")),
    ("true reward of samples", ("eval/reward",)),
    ("log pi - log pi_ref per token", ("train/logratio/chosen_per_token", "train/logratio/rejected_per_token",
                                       "eval/logratio/chosen_per_token", "eval/logratio/rejected_per_token")),
)  # fmt: skip
FALLING_CHOSEN = "diagnostic/falling_chosen"  # logged (value: the chosen change per token) at the step it fired
SFT_HINT = '--config.dpo.loss_type="sigmoid+sft" --config.dpo.loss_weights="(1.0, 0.2)"'


def falling_chosen(row: dict, *, sft_weight: float = 0.0, tol: float = 1e-3) -> str | None:
    """DPO's known failure mode in one eval row: the held-out chosen completions have become less likely than
    under the reference (log pi - log pi_ref per token < -tol) while the implicit-reward margin has risen
    (it is 0 at the reference, so > tol). Returns the warning, or None. ``sft_weight``: the run's weight of an
    ``sft`` term already in its mix (the advice is then to raise it)."""
    chosen, margin = row.get("eval/logratio/chosen_per_token"), row.get("eval/rewards/margins")
    if chosen is None or margin is None or not (chosen < -tol and margin > tol):
        return None
    rejected = row.get("eval/logratio/rejected_per_token", float("nan"))
    return (
        f"step {row['step']}: the chosen completions' log-prob fell below the reference ({chosen:+.3g} nats per "
        f"token; rejected {rejected:+.3g}) while the reward margin rose to {margin:.3g}: DPO is lowering both and "
        f"the rejected faster (likelihood displacement). "
        + (f"Raise the SFT term's weight (now {sft_weight:g}) to keep the chosen likely" if sft_weight > 0
           else f"An SFT term keeps the chosen likely: {SFT_HINT}")
    )  # fmt: skip


# Metrics with a standard error: plotted with +-2 s.e. bars.
STDERR = {"eval/kl_sampled": "eval/kl_sampled_se", "eval/reward": "eval/reward_se"}


def read_history(path: Path) -> list[dict]:
    return read_jsonl(Path(path))


def progress(iterable, total: int, desc: str):
    """A progress bar with an ETA on process 0's console (stderr); a plain iterator elsewhere."""
    from tqdm import tqdm

    return tqdm(
        iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
        disable=jax.process_index() != 0,
    )  # fmt: skip


def plot_panels(history: list[dict]) -> list[tuple[str, list[str]]]:
    """(title, metric keys with data) of every panel that has something to show."""
    present = {k for r in history for k, v in r.items() if isinstance(v, float)}
    panels = [(title, [k for k in keys if k in present]) for title, keys in PLOTS]
    return [(title, keys) for title, keys in panels if keys]


def write_plots(history: list[dict], summary: dict, path: Path) -> Path:
    """One panel per metric group that has data (a files task has no true reward: no empty panel), three to a row;
    eval metrics with a standard error get +-2 s.e. bars. The x axis counts DPO steps: step 0 is the reference
    itself (where every pair's rewards tie: accuracy 0, ties 1), an SFT stage's steps are negative."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offset = summary.get("sft/steps", 0)  # logged steps count the SFT stage's first (W&B's axis)

    def series(key):
        return [r for r in history if isinstance(r.get(key), float)]

    panels = plot_panels(history)
    cols = min(3, max(len(panels), 1))
    rows_ = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.6 * rows_), squeeze=False)
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
    fig.tight_layout()
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
    from dpo_jax import hf
    from dpo_jax.checkpoint import all_finite

    if not all_finite(params):
        raise NonFiniteLoss(f"the final parameters in {workdir} contain NaN/Inf: not exported, no summary written")
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
        return
    if cfg.export_hf:
        model = nnx.merge(graphdef, jax.device_get(params))
        if model.config.lora_rank:  # the adapter alone (PEFT's layout), and the merged model below
            with atomic_dir(workdir / "adapter") as tmp:
                lora.save_peft(lora.split(nnx.state(model))[0], model.config, tmp, base_model=cfg.model.hf_path)
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
