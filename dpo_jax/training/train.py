"""A run end to end: data, the policy, the SFT stage, the reference, the DPO stage, the outputs.

Thin wiring of small builders (``dpo_jax.training.inputs``, ``dpo_jax.training.builders``) and the generic loop
(``dpo_jax.training.loop``), to which each stage hands the pure step (``dpo_jax.core.step``) and its hooks:
logging, eval with DPO's diagnostics, checkpoints, pre-emption. ``train`` runs one config; ``train_population``
runs K >= 1 configs (equal but for what ``HParams`` and ``dpo.seed`` hold) in one program and writes each out as
an ordinary run. Both take ``hooks`` from the caller (docs/hooks.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpo_jax.config import dpo_seed, loss_types, needs_reference, online, validate
from dpo_jax.core import optim, step
from dpo_jax.core.state import init_state, stack
from dpo_jax.core.step import StepConfig
from dpo_jax.data import PreferenceLoader, rewards
from dpo_jax.errors import ConfigError, Notes
from dpo_jax.infra import sharding, signals, throughput
from dpo_jax.infra.signals import Preempted, stop_signals
from dpo_jax.infra.workdir import clean_stale_tmp, ensure_writable
from dpo_jax.models import ModelConfig, kernels, lora
from dpo_jax.training import builders, inputs
from dpo_jax.training.builders import Policy
from dpo_jax.training.evaluate import FALLING_CHOSEN, Evaluator, falling_chosen
from dpo_jax.training.inputs import Data
from dpo_jax.training.loop import Hook, Loop, Member, Stage, StepCache, checkpoint_hook, preemption_hook
from dpo_jax.training.online import OnlinePairs, Sampling, distinct_prompts, online_hook
from dpo_jax.training.outputs import write_outputs
from dpo_jax.training.runs import (
    barrier,
    check_stage_configs,
    load_summary,
    make_writer,
    run_info,
    shared_stage_lock,
    stage_checkpointer,
    workdir_lock,
)

# --- Stages -------------------------------------------------------------------------------------------------------


def make_stage(name: str, sc: StepConfig, section: dict, steps: int, members: list[Member], policy: Policy,
               init_params, *, frozen=None, hooks=(), log_offset: int = 0, note: str = "") -> Stage:  # fmt: skip
    """A stage of ``steps`` optimizer steps (``section``: the optimizer section; members scale its learning rate)
    of the pure step ``sc`` describes, from ``init_params``."""
    tx = optim.make_optimizer(section, steps)
    running = sc.bco_delta == "running" and "bco_pair" in sc.loss_types
    moving = sc.sync_reference or sc.bema  # TR-DPO, BEMA: a member's reference starts as the initial policy

    def make(params, hparams, seed):
        return init_state(params, tx, hparams, seed, running, params if moving else None, bema=sc.bema)

    def init(seeds, hparams_K, shardings):
        return jax.jit(jax.vmap(make, in_axes=(None, 0, 0)), out_shardings=shardings)(init_params, hparams_K, seeds)

    counts = throughput.model_counts(policy.config, policy.matmul_params)
    return Stage(
        name=name, steps=steps, members=members,
        step_fn=functools.partial(step.train_step, graphdef=policy.graphdef, tx=tx, sc=sc),
        program_key=(policy.graphdef, sc, steps, tuple(sorted((k, str(v)) for k, v in section.items()))),
        one=jax.eval_shape(lambda p: make(p, members[0].hparams, 0), init_params), init=init, frozen=frozen,
        hooks=list(hooks), log_offset=log_offset, note=note,
        flops=lambda stats: throughput.step_flops(counts, stats, frozen_reference=sc.frozen_reference),
    )  # fmt: skip


def log_hook(cfg, name: str, peak: float) -> Hook:
    """Every ``log_every`` steps: the step's metrics (finite-checked), the throughput since the last row, written
    per member (``<stage>/<metric>``; DPO's also as ``train/<metric>``) and to the console."""

    def log(loop: Loop, done: int):
        metrics = jax.device_get(loop.metrics)
        loop.check_finite()
        figures = {**loop.figures(peak), f"{name}/step": done}
        k_members = len(loop.members)
        if k_members > 1:
            figures[f"{name}/members"] = k_members
        for k, m in enumerate(loop.members):
            row = {f"{name}/{n}": float(v[k]) for n, v in metrics.items()}
            row.update(figures)
            row["train/loss" if name == "dpo" else "sft/loss"] = row[f"{name}/loss"]
            if name == "dpo":
                row.update({f"train/{n}": float(v[k]) for n, v in metrics.items()})
                row.update({f"train/{n[4:]}": v for n, v in figures.items() if "_per_s" in n})
            m.writer.write(loop.stage.log_offset + done, row)
            if k == 0:
                loop.console.write(loop.stage.log_offset + done, row)

    return Hook(log, cfg.log_every)


def eval_hook(evaluator: Evaluator, every: int, sc: StepConfig) -> Hook:
    """At step 0 (the reference itself: the first point of every curve), every ``every`` steps and at the end:
    every member's eval row, then DPO's diagnostics on it. A stop during an eval saves the step with the eval
    marked pending (the resume redoes it)."""

    def run_eval(loop: Loop, step_: int):
        try:
            rows = evaluator(loop.state.params, loop.state.hparams, step_)
        except Preempted:
            loop.stop(step_, eval_pending=True)
        offset = loop.stage.log_offset
        loop.last_eval = (step_, rows)
        for m, row in zip(loop.members, rows, strict=True):
            m.writer.write(offset + step_, {**row, f"{loop.stage.name}/step": step_})
        loop.console.write(offset + step_, rows[0])
        falling_chosen_check(loop, step_, rows, sc)

    return Hook(run_eval, every, at_start=True, paused=True)


def falling_chosen_check(loop: Loop, step_: int, rows: list[dict], sc: StepConfig) -> None:
    """DPO's known failure mode (``evaluate.falling_chosen``), once per member: a warning (console, summary) and
    a mark in the log. Reference-free and KTO members have no such reference point."""
    types = sc.loss_types
    for k, (m, row) in enumerate(zip(loop.members, rows, strict=True)):
        if m.warnings or not float(m.hparams.uses_reference) or "kto" in types:
            continue
        sft = float(m.hparams.loss_weights[types.index("sft")]) if "sft" in types else 0.0
        warning = falling_chosen({**row, "step": step_}, sft_weight=sft)  # the DPO step, as console and plots
        if warning:
            m.warnings.append(warning)
            m.writer.write(loop.stage.log_offset + step_, {FALLING_CHOSEN: row["eval/logratio/chosen_per_token"]})
            who = f" (member {k})" if len(loop.members) > 1 else ""
            loop.console.note(f"[{loop.stage.name}] warning{who}: {warning}")


def compile_note(model_cfg):
    """The console line for each newly compiled step program, with the attention implementation it uses."""

    def note(loop: Loop, shape: str, seconds: float, row: int):
        window = any(w is not None for w in model_cfg.windows)
        impl = kernels.resolve(model_cfg.attention, row, row, model_cfg.attention_block, window=window)
        block = kernels.block_of(impl, model_cfg.attention_block, model_cfg.head_dim)
        blocks = f" of {block}-token blocks" if impl in kernels.BLOCKED else ""
        if why := kernels.fallback(model_cfg.attention, window=window):
            blocks += f"; {why}"
        elif (home := kernels.HOME.get(impl)) and jax.default_backend() != home:
            blocks += f"; Pallas interpret mode off a {home.upper()}: slow, for checks"
        if (context := loop.mesh.shape["context"]) > 1:
            piece = kernels.context_piece(row, context, model_cfg.attention_block)
            within = kernels.context_kernel(impl, piece)
            impl = "all-gather" if model_cfg.context_attention == "gather" else "ring"
            blocks = f" over context={context} in balanced order, {within} within each device"
        loop.console.note(f"[{loop.stage.name}] compiled the step for batch {shape} in {seconds:.1f} s "
                          f"(attention: {impl}{blocks})")  # fmt: skip

    return note


def batches_note(name: str, loader: PreferenceLoader, cfg, mesh, k_members: int = 1) -> str:
    _, source = throughput.peak_flops(cfg.peak_flops)
    groups = mesh.shape["member"]
    who = f" ({k_members} members over {groups} device group{'s' * (groups > 1)})" if k_members > 1 else ""
    return f"[{name}] batches: {loader.describe()}{who}; MFU against the {source}"


def dpo_step_config(cfgs, model: ModelConfig, *, lora: bool) -> StepConfig:
    """The DPO step of members ``cfgs`` (equal but for what ``HParams`` holds): their loss types' union."""
    cfg = cfgs[0]
    types = tuple(dict.fromkeys(t for c in cfgs for t in loss_types(c)))
    return StepConfig(
        "dpo", types, cfg.dpo.use_soft_targets, not any(needs_reference(c) for c in cfgs),
        cfg.reference.mode == "frozen", cfg.optim.grad_accum, ld=any(c.dpo.ld_alpha != 1 for c in cfgs),
        wpo=cfg.dpo.use_weighting, bco_delta=cfg.dpo.bco_delta, sync_reference=cfg.reference.sync,
        bema=cfg.reference.bema,
        lora=lora, **builders.head_options(cfg), **builders.moe_options(cfg, model), keep_last_good=len(cfgs) > 1,
    )  # fmt: skip


def sft_step_config(cfg, model: ModelConfig, *, lora: bool) -> StepConfig:
    """The SFT step: the LM head's chunking and the mixture's switches; the NLL of the chosen completions."""
    return StepConfig("sft", **builders.head_options(cfg), **builders.moe_options(cfg, model), lora=lora,
                      keep_last_good=False)  # fmt: skip


# --- The job --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class Job:
    """Everything a DPO stage needs once the data, the (SFT'd) policy and the reference are ready."""

    cfg: Any
    mesh: Any
    tokenizer: Any
    policy: Policy  # what DPO trains from: the (SFT'd) policy of model.*, never reference.hf_path's weights
    data: Data
    reference: Any  # the reference's parameters (LoRA: the base with the adapters off)
    ref_train: np.ndarray | None  # the cached reference log-probs of the train / eval pairs
    ref_eval: np.ndarray | None
    loader_kw: dict  # layout, pad id, this process's slice
    sft_steps: int
    summary: dict
    cache: StepCache

    def step_config(self, cfgs) -> StepConfig:
        return dpo_step_config(cfgs, self.policy.config, lora=self.policy.base is not None)

    def reward(self, cfg) -> rewards.Scorer:
        """The run's reward (a reward model computes in the policy's dtype, its weights over the run's mesh)."""
        return rewards.scorer(rewards.spec(cfg), cfg.reward_timeout_s, dtype=cfg.model.dtype, mesh=self.mesh)

    def evaluator(self, cfgs) -> Evaluator:
        cfg = cfgs[0]
        reward_fn = self.reward(cfg) if rewards.spec(cfg) else None
        return Evaluator(
            cfg=cfg, graphdef=self.policy.graphdef, reference_params=self.reference,
            eval_pairs=self.data.eval_pairs, eval_examples=self.data.eval_examples, ref_eval=self.ref_eval,
            tokenizer=self.tokenizer, mesh=self.mesh, loader_kw=self.loader_kw, sc=self.step_config(cfgs),
            reward_fn=reward_fn, base=self.policy.base,
        )  # fmt: skip

    def dpo_stage(self, cfgs, workdirs, writers, evaluator: Evaluator, extra_hooks=()) -> Stage:
        """The DPO stage of members ``cfgs``, each an ordinary run in its workdir, with its hooks and the
        caller's ``extra_hooks``."""
        cfg, sc = cfgs[0], self.step_config(cfgs)
        counts = throughput.model_counts(self.policy.config, self.policy.matmul_params)
        layout = inputs.make_layout(cfg, self.mesh, accum=cfg.optim.grad_accum, counts=counts)
        kw = {**self.loader_kw, "layout": layout, "reference": self.ref_train}
        loader = functools.partial(self.online_pairs, layout=layout) if online(cfg) else functools.partial(
            PreferenceLoader, self.data.train_pairs, cfg.optim.batch_size, **kw)  # fmt: skip
        members = [
            Member(
                builders.hparams(c, sc.loss_types, cfg.optim.learning_rate),
                dpo_seed(c),
                loader(seed=dpo_seed(c)),
                stage_checkpointer(c, wd, "dpo", population=len(cfgs) > 1),
                w,
            )
            for c, wd, w in zip(cfgs, workdirs, writers, strict=True)
        ]
        moving = sc.sync_reference or sc.bema  # TR-DPO's, BEMA's reference: in the state
        frozen = self.reference if sc.frozen_reference and not moving else None
        if self.policy.base is not None:
            frozen = self.policy.base  # LoRA: every step composes the policy (and the reference) from it
        peak, _ = throughput.peak_flops(cfg.peak_flops)
        # the caller's hooks (PBT's) after the eval they may read, before the checkpoint that keeps their result
        hooks = [log_hook(cfg, "dpo", peak), eval_hook(evaluator, cfg.eval.every, sc), *extra_hooks]
        hooks += [online_hook(cfg.log_every)] if online(cfg) else []
        hooks += [checkpoint_hook(cfg.checkpoint.every), preemption_hook()]
        note = batches_note("dpo", members[0].loader, cfg, self.mesh, len(cfgs))
        stage = make_stage("dpo", sc, dict(cfg.optim), cfg.optim.steps, members, self.policy, self.policy.params,
                           frozen=frozen, hooks=hooks, log_offset=self.sft_steps, note=note)  # fmt: skip
        stage.hparams_from_checkpoints = bool(cfg.pbt.enabled)
        return stage

    def online_pairs(self, *, seed: int, layout) -> OnlinePairs:
        """``rounds.online``: a loader whose every batch is sampled from the policy being trained
        (``dpo_jax.training.online``)."""
        cfg = self.cfg
        ids, texts = distinct_prompts(self.data.train_pairs, self.data.train_examples)
        return OnlinePairs(
            ids, texts, cfg.optim.batch_size, seed=seed, sampler=Sampling.of(cfg, self.tokenizer),
            reward_fn=self.reward(cfg), decode=self.tokenizer.decode,
            graphdef=self.policy.graphdef, base=self.policy.base, **{**self.loader_kw, "layout": layout},
        )  # fmt: skip

    def run(self, stage: Stage):
        """The stage's members' [K] parameters, trained (or restored, when the stage is done)."""
        loop = Loop(stage, self.mesh, self.cache)
        for k, m in enumerate(stage.members):
            if isinstance(m.loader, OnlinePairs):
                m.loader.follow(loop, k)  # its batches are sampled from member k's policy
        return loop.run(on_compile=compile_note(self.policy.config))


def run_sft(cfg, workdir: Path, path: Path, tokenizer, policy: Policy, mesh, loader_kw, writer, cache) -> Policy:
    """The SFT stage (``sft.*`` on the demonstrations in ``path``): the policy it makes, which is also DPO's
    reference. LoRA: the SFT adapters are merged into the base, and DPO's adapters start off."""
    counts = throughput.model_counts(policy.config, policy.matmul_params)
    layout = inputs.make_layout(cfg, mesh, sides=1, counts=counts)
    loader = PreferenceLoader(inputs.load_sft_pairs(cfg, path, tokenizer), cfg.sft.batch_size, seed=cfg.seed,
                              **{**loader_kw, "layout": layout})  # fmt: skip
    hparams = builders.hparams(cfg, ("sigmoid",))  # unused by SFT; one shape for every member's stage
    member = Member(hparams, cfg.seed, loader, stage_checkpointer(cfg, workdir, "sft"), writer)
    sc = sft_step_config(cfg, policy.config, lora=policy.base is not None)
    peak, _ = throughput.peak_flops(cfg.peak_flops)
    hooks = [log_hook(cfg, "sft", peak), checkpoint_hook(cfg.checkpoint.every), preemption_hook()]
    stage = make_stage("sft", sc, dict(cfg.sft), cfg.sft.steps, [member], policy, policy.params,
                       frozen=policy.base, hooks=hooks, note=batches_note("sft", loader, cfg, mesh))  # fmt: skip
    with shared_stage_lock(cfg):  # parallel sweep members share one SFT stage: one trains it, the others wait
        params = Loop(stage, mesh, cache).run(on_compile=compile_note(policy.config))
    params = sharding.take_member(params, 0, mesh)
    if policy.base is None:
        return dataclasses.replace(policy, params=params)
    adapters, base = lora.split(lora.fold(lora.compose(params, policy.base), policy.config))
    return dataclasses.replace(policy, params=adapters, base=base)


def build_job(cfg, workdir: Path, devices, writer, notes: Notes | None = None, cfgs=None,
              cache: StepCache | None = None) -> Job:  # fmt: skip
    """Data, tokenizer, policy, the SFT stage (if configured), the reference and its cached log-probs (of all
    members ``cfgs``, default ``[cfg]``: cached when one of them reads the reference, with tails when one uses
    LD-DPO)."""
    notes, cfgs, cache = notes or Notes(), cfgs or [cfg], cache or StepCache()
    mesh = builders.make_mesh(cfg, devices, len(cfgs))  # the caller has validated the configs
    tokenizer, paths = inputs.task_files(cfg, workdir)
    data = inputs.load_data(cfg, paths, tokenizer, notes)
    policy = builders.build_policy(cfg, tokenizer, mesh, notes)
    counts = throughput.model_counts(policy.config, policy.matmul_params)
    index, count = sharding.batch_slice(mesh)
    loader_kw = dict(layout=inputs.make_layout(cfg, mesh, counts=counts), pad_id=tokenizer.pad_token_id or 0,
                     process_index=index, process_count=count)  # fmt: skip
    sft_steps = 0
    if cfg.sft.steps > 0 and "sft" in paths:
        policy = run_sft(cfg, workdir, paths["sft"], tokenizer, policy, mesh, loader_kw, writer, cache)
        sft_steps = cfg.sft.steps
    ref = builders.reference_params(cfg, policy, mesh)
    ref_train, ref_eval, ref_summary = builders.reference_cache(
        cfg, cfgs, workdir, policy, ref, data, mesh, loader_kw["layout"], loader_kw["pad_id"]
    )
    return Job(cfg=cfg, mesh=mesh, tokenizer=tokenizer, policy=policy, data=data, reference=ref,
               ref_train=ref_train, ref_eval=ref_eval, loader_kw=loader_kw, sft_steps=sft_steps,
               summary={**data.summary, **ref_summary}, cache=cache)  # fmt: skip


# --- Runs -----------------------------------------------------------------------------------------------------------


def train(cfg, workdir: str | os.PathLike, *, devices=None, cache: StepCache | None = None,
          hooks: Sequence[Hook] = ()) -> dict:  # fmt: skip
    """Run the configured job end to end; returns the summary (also written to ``<workdir>/summary.json``).
    ``cache``: compiled steps to reuse (a sweep's members share one); ``hooks``: ``dpo_jax.training.loop.Hook``s of the
    DPO stage, run after its eval and before its checkpoint (docs/hooks.md). A finished workdir (``summary.json``)
    is not run again: its summary is returned."""
    devices = list(jax.devices() if devices is None else devices)
    workdir = ensure_writable(workdir)
    if not (workdir / "summary.json").exists():
        return train_population([cfg], [workdir], devices=devices, cache=cache, hooks=hooks)[0]
    validate(cfg, num_devices=len(devices), members=builders.make_mesh(cfg, devices).shape["member"])
    with workdir_lock(workdir):
        changes = check_stage_configs(cfg, workdir)
    if not changes:
        if jax.process_index() == 0:
            print(f"{workdir} is a finished run (summary.json); nothing to do. Use a new --workdir to train again")
        return load_summary(workdir)
    return train_population([cfg], [workdir], devices=devices, changes=[changes], cache=cache, hooks=hooks)[0]


def train_population(cfgs: list, workdirs: list, *, devices=None, changes=None, cache: StepCache | None = None,
                     hooks: Sequence[Hook] = ()) -> list[dict]:  # fmt: skip
    """Train K >= 1 member configs (equal but for what ``HParams`` and ``dpo.seed`` hold) in one program; each
    member is written out as an ordinary run (checkpoints, metrics, W&B run, eval, summary, plots, export).
    ``changes``: the members' accepted resume changes, when the caller has checked them already; ``hooks``: as
    ``train``'s (a PBT population's: ``dpo_jax.research.pbt.pbt_hook``, which ``dpo_jax.research.sweep`` hands in)."""
    devices = list(jax.devices() if devices is None else devices)
    workdirs = [ensure_writable(wd) for wd in workdirs]
    cfg = cfgs[0]
    mesh = builders.make_mesh(cfg, devices, len(cfgs))
    for c in cfgs:
        validate(c, num_devices=len(devices), members=mesh.shape["member"])
    if online(cfg) and len(cfgs) > 1:
        raise ConfigError("config.rounds.online: an online run samples from its own policy: one run at a time "
                          "(dpo-jax sweep --mode sequential), not a population")  # fmt: skip
    if cfg.pbt.enabled and (len(cfgs) < 2 or not any(h.name == "pbt" for h in hooks)):
        raise ConfigError("config.pbt.enabled: PBT trains a population: dpo-jax sweep --mode vectorized with >= 2 "
                          "members")  # fmt: skip
    with contextlib.ExitStack() as stack_:
        for wd in workdirs:
            stack_.enter_context(workdir_lock(wd))
            if jax.process_index() == 0 and (stale := clean_stale_tmp(wd)):
                print(f"removed {len(stale)} temporary files an earlier, killed run left in {wd}", flush=True)
        stack_.enter_context(stop_signals())
        if mesh.shape["context"] > 1:  # the model's attention finds the context axis here (a ring over it)
            stack_.enter_context(jax.set_mesh(mesh))
        if changes is None:
            changes = [check_stage_configs(c, wd) for c, wd in zip(cfgs, workdirs, strict=True)]
        t_start, notes = time.perf_counter(), Notes()
        writers = [make_writer(c, wd) for c, wd in zip(cfgs, workdirs, strict=True)]
        try:
            job = build_job(cfg, workdirs[0], devices, writers[0], notes, cfgs=cfgs, cache=cache)
            evaluator = job.evaluator(cfgs)
            stage = job.dpo_stage(cfgs, workdirs, writers, evaluator, hooks)
            params = job.run(stage)
            signals.check("after training (the final checkpoint is saved)")
            finals = evaluator.final(params, stack([m.hparams for m in stage.members]), cfg.optim.steps)
        finally:
            for w in writers:
                w.close()
        signals.check("after the final eval (the final checkpoint is saved)")
        summaries = []
        compiled = {"sft/steps": job.sft_steps, "dpo/programs": len(stage.compiled),
                    "dpo/compile_s": sum(stage.compiled)}  # fmt: skip
        for k, (c, wd) in enumerate(zip(cfgs, workdirs, strict=True)):
            summary = {**job.summary, **finals[k], **run_info(job.policy.n_params, devices, t_start), **compiled}
            if len(cfgs) > 1:
                summary["population/members"] = len(cfgs)
            for h in stage.hooks:  # the caller's and the run's own (online DPO's)
                summary.update(h.summary(stage.members[k]) if h.summary else {})
            if stage.members[k].failed_step is not None:  # frozen at its last good state; the others trained on
                summary["population/failed_step"] = stage.members[k].failed_step
            if notes.items or stage.members[k].warnings:
                summary["warnings"] = notes.items + stage.members[k].warnings
            if changes[k]:
                summary["resume/changes"] = [f"{n}: {old!r} -> {new!r}" for n, old, new in changes[k]]
            final = job.policy.whole(sharding.take_member(params, k, job.mesh))
            write_outputs(c, wd, job.policy.graphdef, final, job.tokenizer, summary)
            summaries.append(summary)
        barrier("outputs")  # process 0 has written every member's summary
    return summaries
