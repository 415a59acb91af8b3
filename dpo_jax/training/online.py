"""Online DPO: every step's pairs sampled from the policy as it is at that step (rounds of one step-batch).

``rounds.online=True`` with ``dpo-jax train`` (``configs/rounds.py:online``): DPO step t takes ``optim.batch_size``
distinct training prompts (epoch permutations seeded by ``dpo.seed``, as the offline loader's), samples
``rounds.samples`` completions of each from the current policy (the KV cache, ``rounds.temperature``,
``rounds.max_new_tokens``; every sample's key is folded from the step and its index), scores them with the
reward and trains step t on the best vs the worst of each prompt, as the token ids were sampled (no decode and
re-tokenize: the pair is exactly what the policy produced). A prompt whose eligible samples all score the same is
an empty pair slot (the step's means are over its real pairs). The reference is a forward every step
(``reference.mode="frozen"``): the initial policy, or TR-DPO's / BEMA's moving one.

Resume: step t's pairs are a pure function of the policy's parameters before step t and of the key, so a run
resumed from its step-t checkpoint samples the same pairs as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from dpo_jax.core import sampling
from dpo_jax.data import PreferenceLoader, TokenizedPair, epoch_order
from dpo_jax.data.packing import round_up
from dpo_jax.infra import signals
from dpo_jax.infra.sharding import take_member
from dpo_jax.models import lora
from dpo_jax.training.loop import Hook, Loop, Member

# --- Sampling and pairing (also what `dpo-jax rounds` makes its pairs with) -------------------------------------


Samples = tuple[list[list[np.ndarray]], np.ndarray]  # [P][n] token ids, [P, n] ended


def sample_ids(model, prompt_ids: list[np.ndarray], *, n: int, key, temperature: float, max_new_tokens: int,
               budget_mb: float, eos: tuple[int, ...], pad: int) -> Samples:  # fmt: skip
    """[P][n] sampled completions as token ids (up to and including EOS), n per prompt, and [P, n] whether each
    ended (False: cut off at ``max_new_tokens``). Each generate call holds as many prompts' samples as
    ``budget_mb`` of memory does (the last call padded to the same shape: one compile); every sample draws from a
    key of its own (prompt, sample) index, so the samples do not depend on how the calls are cut."""
    width = max(len(x) for x in prompt_ids)
    rows = sampling.rows_per_call(model.config, width, max_new_tokens, rows=len(prompt_ids) * n, group=n,
                                  budget_mb=budget_mb)  # fmt: skip
    per_call = rows // n
    row_key = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))
    out_ids, out_ended = [], []
    for start in range(0, len(prompt_ids), per_call):
        signals.check("while sampling completions (rerun to sample again)")
        chunk = prompt_ids[start : start + per_call]
        chunk = chunk + [chunk[0]] * (per_call - len(chunk))  # the last call padded to the same shape
        prompt = np.full((len(chunk), width), pad, np.int32)
        for j, x in enumerate(chunk):
            prompt[j, width - len(x) :] = x
        prompt, lengths = np.repeat(prompt, n, axis=0), np.repeat([len(x) for x in chunk], n)
        mask = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int32)
        keys = row_key(key, np.arange(start * n, (start + per_call) * n, dtype=np.uint32))
        out = sampling.generate(
            model, prompt, mask, key=keys, max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos,
            pad_id=pad,
        )  # fmt: skip
        tokens, valid = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN).astype(bool)
        ended = sampling.ended(tokens, valid, eos)
        real = min(per_call, len(prompt_ids) - start)
        out_ids += [[tokens[i][valid[i]] for i in range(j * n, (j + 1) * n)] for j in range(real)]
        out_ended.append(ended[: real * n].reshape(real, n))
    return out_ids, np.concatenate(out_ended)


def sample_completions(model, tokenizer, prompt_ids: list[np.ndarray], *, n: int, key, temperature: float,
                       max_new_tokens: int, budget_mb: float) -> tuple[list[list[str]], np.ndarray]:  # fmt: skip
    """``sample_ids``, decoded: [P][n] completions as text, and [P, n] whether each ended."""
    eos, pad = (tokenizer.eos_token_id,), tokenizer.pad_token_id or 0
    ids, ended = sample_ids(model, prompt_ids, n=n, key=key, temperature=temperature, max_new_tokens=max_new_tokens,
                            budget_mb=budget_mb, eos=eos, pad=pad)  # fmt: skip
    return [[tokenizer.decode(y) for y in ys] for ys in ids], ended


def best_and_worst(rewards_PxN: np.ndarray, eligible_PxN: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt: the index of its best and of its worst eligible sample (the first of equals) and whether their
    rewards differ (False too when fewer than two samples are eligible)."""
    best = np.argmax(np.where(eligible_PxN, rewards_PxN, -np.inf), axis=1)
    worst = np.argmin(np.where(eligible_PxN, rewards_PxN, np.inf), axis=1)
    take = lambda i: np.take_along_axis(rewards_PxN, i[:, None], 1)[:, 0]  # noqa: E731
    return best, worst, (eligible_PxN.sum(axis=1) >= 2) & (take(best) > take(worst))


# --- The online loader --------------------------------------------------------------------------------------------


def distinct_prompts(pairs, examples) -> tuple[list[np.ndarray], list[str]]:
    """The distinct tokenized prompts of ``pairs`` in order, and their texts as the reward receives them (a
    conversation as its JSON)."""
    seen, ids, texts = set(), [], []
    for pair, ex in zip(pairs, examples, strict=True):
        if pair.prompt.tobytes() not in seen:
            seen.add(pair.prompt.tobytes())
            ids.append(pair.prompt)
            texts.append(ex.prompt if isinstance(ex.prompt, str) else json.dumps(ex.prompt))
    return ids, texts


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How an online step samples: ``rounds.samples`` per prompt, temperature, new tokens, cut samples, memory."""

    samples: int
    temperature: float
    max_new_tokens: int
    cut_samples: str  # "score": a sample cut off at max_new_tokens is paired as it was produced; "drop": never
    budget_mb: float
    eos: tuple[int, ...]
    pad: int

    @classmethod
    def of(cls, cfg, tokenizer) -> Sampling:
        ro = cfg.rounds
        return cls(ro.samples, ro.temperature, ro.max_new_tokens or cfg.eval.max_new_tokens, ro.cut_samples,
                   ro.sample_memory_mb, (tokenizer.eos_token_id,), tokenizer.pad_token_id or 0)  # fmt: skip


class OnlinePairs:
    """A loader (``iterate(start, n)`` -> ``(step, Batch)``) whose step-t batch is sampled from the policy a
    ``Loop`` holds before step t, scored by ``reward_fn(prompts, completions) -> [n]`` and paired best vs worst.
    Every batch has the shape of the worst case (longest prompts, every sample ``max_new_tokens`` long): one
    compiled step."""

    def __init__(self, prompt_ids: list[np.ndarray], prompt_texts: list[str], batch_size: int, *, seed: int,
                 sampler: Sampling, reward_fn: Callable, decode: Callable, graphdef, base=None,
                 **loader_kw):  # fmt: skip
        if len(prompt_ids) < batch_size:
            raise ValueError(f"{len(prompt_ids)} distinct prompts cannot fill one online batch of {batch_size}")
        self.prompt_ids, self.prompt_texts, self.batch_size, self.seed = prompt_ids, prompt_texts, batch_size, seed
        self.sampler, self.reward_fn, self.decode = sampler, reward_fn, decode
        self.graphdef, self.base, self.loader_kw = graphdef, base, loader_kw
        self.loop: Loop | None = None  # whose policy is sampled (``follow``)
        self.member = 0
        self._memo: tuple | None = None  # (step, the loop's state, batch): the loop draws its first batch twice
        longest = max(len(x) for x in prompt_ids)
        n = sampler.max_new_tokens
        worst = TokenizedPair(np.zeros(longest, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32), 1.0, 1.0)
        shape = PreferenceLoader([worst] * batch_size, batch_size, shuffle=False, **loader_kw)
        groups, length, scored, _ = shape.needs(0)[1]
        self.row_length = shape.row_length
        if self.row_length:  # packed: every step's rows as long as the worst case's
            self.loader_kw["layout"] = dataclasses.replace(loader_kw["layout"], row_length=self.row_length)
        self.shapes = [(groups, length, scored, round_up(batch_size))]
        self.stats: dict[int, dict] = {}  # step -> its sampling figures, until ``take_stats`` takes them
        self.totals = {"sample_s": 0.0, "score_s": 0.0, "steps": 0}

    def follow(self, loop: Loop, k: int = 0):
        """Sample from member ``k`` of ``loop``'s population, as it is whenever a batch is drawn."""
        self.loop, self.member = loop, k

    def describe(self) -> str:
        s = self.sampler
        where = f"packed into rows of {self.row_length} tokens" if self.row_length else "padded"
        return (f"online: {self.batch_size} prompts a step, best vs worst of {s.samples} samples each from the "
                f"current policy (temperature {s.temperature}, {s.max_new_tokens} new tokens), {where}")  # fmt: skip

    def prompts(self, step: int) -> np.ndarray:
        """Indices of step ``step``'s prompts: consecutive slices of per-epoch permutations, as the offline loader."""
        per_epoch = len(self.prompt_ids) // self.batch_size
        epoch, k = divmod(step, per_epoch)
        return epoch_order(len(self.prompt_ids), self.seed, epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def batch(self, step: int):
        if self.loop is None:
            raise RuntimeError("OnlinePairs.follow(loop) first: an online batch is sampled from the loop's policy")
        state = self.loop.state
        if self._memo is not None and self._memo[0] == step and self._memo[1] is state:
            return self._memo[2]
        s, idx = self.sampler, self.prompts(step)
        params = lora.whole(take_member(state.params, self.member, self.loop.mesh), self.base)
        model = nnx.merge(self.graphdef, params)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed + 3), step)
        t0 = time.perf_counter()
        ids, ended = sample_ids(model, [self.prompt_ids[i] for i in idx], n=s.samples, key=key,
                                temperature=s.temperature, max_new_tokens=s.max_new_tokens, budget_mb=s.budget_mb,
                                eos=s.eos, pad=s.pad)  # fmt: skip
        t1 = time.perf_counter()
        texts = [self.prompt_texts[i] for i in idx for _ in range(s.samples)]
        scores = np.asarray(self.reward_fn(texts, [self.decode(y) for ys in ids for y in ys]), np.float64)
        scores = scores.reshape(len(idx), s.samples)
        t2 = time.perf_counter()
        eligible = ended | (s.cut_samples == "score")
        best, worst, distinct = best_and_worst(scores, eligible)
        pairs = [
            TokenizedPair(self.prompt_ids[i], ys[b], ys[w], 1.0, 1.0)
            for i, ys, b, w, ok in zip(idx, ids, best, worst, distinct, strict=True)
            if ok
        ]
        batch = self._materialize(pairs or [TokenizedPair(self.prompt_ids[idx[0]], ids[0][0], ids[0][0], 1.0, 1.0)])
        if not pairs:  # every prompt tied: a step with no real pair (zero loss and gradient)
            batch = batch.replace(valid_GxP=np.zeros_like(batch.valid_GxP), index_GxP=np.full_like(batch.index_GxP, -1))
        take = lambda i: np.take_along_axis(scores, i[:, None], 1)[:, 0]  # noqa: E731
        self.stats[step] = {
            "online/sample_reward": float(scores.mean()),
            "online/chosen_reward": float(take(best)[distinct].mean()) if pairs else float("nan"),
            "online/rejected_reward": float(take(worst)[distinct].mean()) if pairs else float("nan"),
            "online/pairs": len(pairs),
            "online/tied_prompts": int((~distinct).sum()),
            "online/cut_samples": int((~ended).sum()),
            "online/sample_length": float(np.mean([len(y) for ys in ids for y in ys])),
            "online/sample_tokens_per_s": sum(len(y) for ys in ids for y in ys) / max(t1 - t0, 1e-9),
            "online/sample_s": t1 - t0,
            "online/score_s": t2 - t1,
        }  # fmt: skip
        self.totals["sample_s"] += t1 - t0
        self.totals["score_s"] += t2 - t1
        self.totals["steps"] += 1
        self._memo = (step, state, batch)
        return batch

    def _materialize(self, pairs: list[TokenizedPair]):
        """The step's batch of ``batch_size`` pair slots (the pairs first, then empty slots), in the fixed shape."""
        loader = PreferenceLoader(pairs, self.batch_size, shuffle=False, drop_last=False, shapes=self.shapes,
                                  **self.loader_kw)  # fmt: skip
        return loader.batch(0)

    def iterate(self, start_step: int = 0, num_steps: int | None = None):
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.batch(step)
            step += 1

    def take_stats(self, before: int) -> dict[str, float]:
        """Per-step means of the figures of the steps before ``before`` not yet taken (a reward mean over the steps
        that had pairs)."""
        rows = [self.stats.pop(t) for t in sorted(self.stats) if t < before]
        if not rows:
            return {}
        means = {k: np.asarray([r[k] for r in rows], np.float64) for k in rows[0]}
        return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in means.items()}


def online_hook(every: int) -> Hook:
    """Every ``every`` steps: each member's online figures since the last row (sampled reward, best and worst,
    ties, cut samples, sampling speed) into its log; at the end, the run's sampling and scoring seconds."""

    def log(loop: Loop, done: int):
        for m in loop.members:
            row = m.loader.take_stats(before=done)
            if row:
                m.writer.write(loop.stage.log_offset + done, row)

    def summary(m: Member) -> dict:
        t = m.loader.totals
        return {"online/sample_s_total": t["sample_s"], "online/score_s_total": t["score_s"],
                "online/sampled_steps": t["steps"]}  # fmt: skip

    return Hook(log, every, name="online", summary=summary)
