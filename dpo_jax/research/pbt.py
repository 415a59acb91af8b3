"""Population-based training (Jaderberg et al. 2017, arXiv:1711.09846) over a population's member axis.

One more loop hook: every ``pbt.every`` steps, right after the eval, the members are ranked by a held-out metric;
each of the bottom ``pbt.fraction`` copies the whole train state (parameters, optimizer state, RNG) of a member
drawn from the top fraction, and that member's traced hyper-parameters, each multiplied by a factor drawn from
``pbt.factors`` and clipped to its bounds. The copy is a gather along the member axis inside the population's
layout (members sharded over devices and hosts included). A member that failed (NaN/Inf) ranks last and is
replaced by an exploit.

Every decision is a pure function of (``pbt.seed``, step, the metrics), and the checkpoints carry each member's
hyper-parameters, so a run killed anywhere resumes to the same final weights and the same lineage. The lineage is
``lineage.jsonl`` beside the members' folders: one row per exploit (step, member, parent, hyper-parameters before
and after); each member's log (and W&B run) records its hyper-parameters and parent at every PBT step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from dpo_jax.core.hparams import PERTURBABLE, HParams, field_domain
from dpo_jax.data import rewards
from dpo_jax.errors import ConfigError
from dpo_jax.training.loop import Hook

# metric name -> (eval key, sign: +1 higher is better)
METRICS = {"reward": ("eval/reward", 1.0), "loss": ("eval/loss", -1.0), "accuracy": ("eval/rewards/accuracies", 1.0),
           "reward_kl": ("eval/reward", 1.0)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Decision:
    """Member ``member`` takes ``parent``'s state and its hyper-parameters times ``factors``."""

    member: int
    parent: int
    factors: dict[str, float]


def scores(rows: list[dict], metric: str, kl_coef: float, failed: list[bool]) -> np.ndarray:
    """[K] higher-is-better scores of the members' eval rows; a failed member or a missing/NaN value ranks last."""
    key, sign = METRICS[metric]
    out = []
    for row, bad in zip(rows, failed, strict=True):
        value = row.get(key, float("nan"))
        if metric == "reward_kl":
            value = value - kl_coef * row.get("eval/kl_sampled", float("nan"))
        out.append(-math.inf if bad or not math.isfinite(value) else sign * value)
    return np.asarray(out, np.float64)


def decide(scores_K: np.ndarray, *, fraction: float, seed: int, step: int, names: tuple[str, ...],
           factors: tuple[float, ...]) -> list[Decision]:  # fmt: skip
    """The exploits of one PBT step: the bottom ``fraction`` of the ranking (best first, ties by index) each take a
    parent drawn from the top fraction and a factor per hyper-parameter, from a generator seeded by (seed, step)."""
    k = len(scores_K)
    n = min(max(1, int(round(fraction * k))), k // 2)
    order = np.lexsort((np.arange(k), -scores_K))
    top, bottom = order[:n], order[k - n :]
    rng = np.random.default_rng([seed, step])
    out = []
    for child in sorted(int(c) for c in bottom):
        parent = int(rng.choice(top))
        out.append(Decision(child, parent, {h: float(rng.choice(factors)) for h in names}))
    return out


def perturb(hp: HParams, factors: dict[str, float], bounds: dict[str, tuple[float, float]]) -> HParams:
    """``hp`` with each named hyper-parameter multiplied by its factor and clipped to its bounds."""
    new = {}
    for name, f in factors.items():
        lo, hi = bounds[name]
        old = np.asarray(getattr(hp, name))
        new[name] = np.clip(old * f, lo, hi).astype(old.dtype)
    return hp.replace(**new)


def hparams_record(hp: HParams, names) -> dict[str, float]:
    return {n: float(np.asarray(getattr(hp, n))) for n in names}


def settings(cfg) -> dict:
    """``pbt.*`` checked: the hyper-parameters, factors and bounds; one line naming the field otherwise."""
    p = cfg.pbt
    names = tuple(n.strip() for n in str(p.hparams).split(",") if n.strip())
    if not names or set(names) - set(PERTURBABLE):
        raise ConfigError(f"config.pbt.hparams: expected comma-separated names among {', '.join(PERTURBABLE)}, "
                          f"got {p.hparams!r}")  # fmt: skip
    if p.metric not in METRICS:
        raise ConfigError(f"config.pbt.metric: expected one of {', '.join(METRICS)}, got {p.metric!r}")
    if not 0 < p.fraction <= 0.5:
        raise ConfigError(f"config.pbt.fraction: expected a number in (0, 0.5], got {p.fraction!r}")
    sampled = p.metric in ("reward", "reward_kl")  # measured on eval's samples, with a reward to score them
    if sampled and (not rewards.spec(cfg) or cfg.eval.num_prompts < 1):
        why = "eval.num_prompts=0: no samples" if rewards.spec(cfg) else "no reward (config.reward is unset)"
        raise ConfigError(f"config.pbt.metric: {p.metric!r} ranks members on eval's sampled reward, but {why}: "
                          "every member would score -inf; set it, or rank on 'loss' or 'accuracy'")  # fmt: skip
    if not isinstance(p.every, int) or p.every < 1 or p.every % cfg.eval.every:
        raise ConfigError(f"config.pbt.every: expected a positive multiple of eval.every ({cfg.eval.every}): the "
                          f"ranking reads that step's eval, got {p.every!r}")  # fmt: skip
    if p.every >= cfg.optim.steps:
        raise ConfigError(f"config.pbt.every: expected fewer than optim.steps={cfg.optim.steps} steps: at "
                          f"{p.every!r} no member is ever exploited (a plain grid)")  # fmt: skip
    if not isinstance(p.seed, int) or p.seed < 0:
        raise ConfigError(f"config.pbt.seed: expected an integer >= 0, got {p.seed!r}")
    factors = tuple(float(f) for f in p.factors)
    if not factors or any(f <= 0 for f in factors):
        raise ConfigError(f"config.pbt.factors: expected positive numbers, got {p.factors!r}")
    bounds = {n: tuple(float(b) for b in p[f"{n}_bounds"]) for n in PERTURBABLE}
    for n, pair in bounds.items():
        if len(pair) != 2:
            raise ConfigError(f"config.pbt.{n}_bounds: expected (low, high), got {tuple(p[f'{n}_bounds'])!r}")
    for n, (lo, hi) in bounds.items():  # a perturbed value is clipped into them: they lie in the field's domain
        domain, field = field_domain(n)
        if not (lo <= hi and lo in domain and hi in domain):
            of = f" (the domain of {field})" if field else ""
            raise ConfigError(f"config.pbt.{n}_bounds: expected (low, high) with low <= high, both {domain.describe()}"
                              f"{of}, got {(lo, hi)}")  # fmt: skip
    return dict(names=names, factors=factors, bounds=bounds, metric=p.metric, kl_coef=float(p.kl_coef),
                fraction=float(p.fraction), seed=int(p.seed), every=int(p.every))  # fmt: skip


class Lineage:
    """``lineage.jsonl``: one row per exploit, written by process 0; rows after a resumed step are forgotten."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rewind(self, step: int) -> None:
        if jax.process_index() or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def append(self, rows: list[dict]) -> None:
        if jax.process_index() or not rows:
            return
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line] if self.path.exists() else []


def pbt_hook(cfg, lineage_path: Path, names: list[str]):
    """The PBT hook of a population's DPO stage (after the eval hook, before the checkpoint hook): at step 0 and
    every ``pbt.every`` steps it logs each member's hyper-parameters; at those steps short of the last it exploits
    and explores. ``names``: the members' run names (in the lineage)."""
    s = settings(cfg)
    lineage = Lineage(lineage_path)

    def run(loop, step: int):
        members = loop.members
        before = [m.hparams for m in members]
        new, index, rows = list(before), np.arange(len(members)), []
        if 0 < step < loop.stage.steps and step % s["every"] == 0:
            if loop.last_eval is None or loop.last_eval[0] != step:
                raise RuntimeError(f"pbt: no eval at step {step} to rank the members by")
            failed = [m.failed_step is not None for m in members]
            ranked = scores(loop.last_eval[1], s["metric"], s["kl_coef"], failed)
            kw = {k: s[k] for k in ("fraction", "seed", "names", "factors")}
            for d in decide(ranked, step=step, **kw):
                index[d.member], new[d.member] = d.parent, perturb(before[d.parent], d.factors, s["bounds"])
                record = dict(
                    before=hparams_record(before[d.member], s["names"]), after=hparams_record(new[d.member], s["names"])
                )
                rows.append({"step": step, "member": names[d.member], "parent": names[d.parent],
                             "member_index": d.member, "parent_index": d.parent, "score": float(ranked[d.member]),
                             "parent_score": float(ranked[d.parent]), **record})  # fmt: skip
            loop.exploit(index, new)
            lineage.append(rows)
            if rows:
                loop.console.note(f"[pbt] step {step}: " + "; ".join(f"{r['member']} <- {r['parent']}" for r in rows))
        for k, m in enumerate(members):
            row = {f"pbt/{n}": v for n, v in hparams_record(new[k], s["names"]).items()}
            row.update({"pbt/parent": int(index[k]), f"{loop.stage.name}/step": step})
            m.writer.write(loop.stage.log_offset + step, row)

    def summary(member) -> dict:  # the hyper-parameters PBT left the member with (its config holds the first ones)
        return {"pbt/final": hparams_record(member.hparams, s["names"])}

    return Hook(run, s["every"], at_start=True, resume=lineage.rewind, name="pbt", summary=summary)
