"""Evaluation during training, and the diagnostic of DPO's known failure mode (``falling_chosen``).

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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.core import sampling, scoring
from dpo_jax.core.step import eval_sums
from dpo_jax.data import PreferenceLoader, to_global
from dpo_jax.infra import signals, xla_flags
from dpo_jax.infra.logging import progress
from dpo_jax.infra.sharding import replicated, take_member
from dpo_jax.models import lora


class Evaluator:
    """Held-out preference metrics and sampled KL / reward of every member of a population ([K] parameters and
    hyper-parameters): one compiled program serves all members and values (``step.eval_sums``: the objective of
    ``step.pair_losses``)."""

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
        self.cfg, self.graphdef, self.reference, self.mesh = cfg, graphdef, reference_params, mesh
        self.base = base  # LoRA: members' params are adapters on this frozen base
        self.tokenizer, self.reward_fn, self.ref_eval = tokenizer, reward_fn, ref_eval
        self.loader = PreferenceLoader(eval_pairs, cfg.eval.batch_size, shuffle=False, drop_last=False,
                                       reference=ref_eval, **loader_kw)  # fmt: skip
        self.last: list[dict] = []
        sums = functools.partial(eval_sums, graphdef=graphdef, sc=sc, cached=ref_eval is not None)
        self._pref = jax.jit(jax.vmap(sums, in_axes=(0, 0, None, None, None)), out_shardings=replicated(mesh))
        self._ref_logps = jax.jit(functools.partial(scoring.sample_logps, graphdef, max_logits_mb=sc.max_logits_mb))
        # KTO's examples (dpo_jax.data.kto) start with one per pair, in order: the prompts are those of the pairs
        prompt_pairs = eval_pairs[: len(eval_examples)]
        self.prompts = sample_prompts(prompt_pairs, eval_examples, cfg.eval.num_prompts, tokenizer.pad_token_id or 0)

    def preference(self, params_K, hparams_K) -> list[dict[str, float]]:
        totals: dict[str, np.ndarray] = {}
        batches = progress(self.loader.epoch(0), self.loader.steps_per_epoch, "eval")
        for _, batch in batches:
            signals.check("during eval")
            xla_flags.release_memory()  # batches of other shapes: other programs' temporaries
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
        xla_flags.release_memory()
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


def sample_prompts(pairs, examples, n: int, pad_id: int):
    """(left-padded ids [n, P], mask, texts) of the first ``n`` distinct prompts of ``pairs`` (and their
    ``examples``' texts, a conversation as its JSON): what eval and rounds sample from; None without prompts."""
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


# --- DPO's known failure mode -----------------------------------------------------------------------------------

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
