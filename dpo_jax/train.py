"""The one jitted SFT / DPO train step and the one training loop, for a run (K = 1) and a population (K > 1).

The step is a pure function ``train_step(state, batch, reference) -> (state, metrics)``; the loop vmaps it over
the members of a population (``dpo_jax.state``: every leaf has a leading [K] axis, split over the mesh's
``member`` axis) and jits it once per batch shape with ``NamedSharding``s and the state donated. Hyper-parameters
(beta, label smoothing, soft-target temperature, learning-rate scale, loss-type weights) live in
``state.hparams``: traced, so one compile serves any values, for training and eval alike (``pair_losses`` is the
one objective). ``reference`` is the frozen reference's parameters (``reference.mode='frozen'``) or None, when
the batch carries precomputed reference log-probs (``'cached'``, the default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from dpo_jax import checkpoint, lora, reference, rewards, scoring, sharding, signals, throughput
from dpo_jax.config import SFT_FIELDS, ConfigError, dpo_seed, loss_types, needs_reference, validate
from dpo_jax.data import (
    Columns,
    PreferenceLoader,
    TokenizeConfig,
    kto,
    load_examples,
    pad_batches,
    synthetic,
    to_global,
    tokenize_examples,
)
from dpo_jax.data.examples import load_sft_examples
from dpo_jax.data.formats import DataError
from dpo_jax.data.packing import Layout, batch_stats
from dpo_jax.errors import NonFiniteLoss, Notes
from dpo_jax.evaluate import FALLING_CHOSEN, falling_chosen
from dpo_jax.logging import ConsoleWriter, JsonlWriter, MultiWriter, WandbWriter, Writer
from dpo_jax.losses import preference_loss, temper_targets, update_running_moments
from dpo_jax.models import attention
from dpo_jax.signals import Preempted, stop_signals
from dpo_jax.state import HParams, TrainState, init_state, member, stack
from dpo_jax.workdir import (
    DIGEST,
    WorkdirLock,
    allowed_changes,
    atomic_dir,
    check_resume_config,
    clean_stale_tmp,
    ensure_writable,
    file_digest,
    flatten,
)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static part of a step (changing it recompiles)."""

    stage: str  # "sft" | "dpo"
    loss_types: tuple[str, ...] = ("sigmoid",)  # a population's union; each member weights them (hparams)
    use_soft_targets: bool = False
    reference_free: bool = False  # no reference at all (dpo.reference_free, or only policy-only types)
    frozen_reference: bool = False
    grad_accum: int = 1
    token_chunk: int = 1024
    vocab_chunk: int = 8192
    max_logits_mb: float = 256.0
    ld: bool = False  # some member down-weights completion tails (LD-DPO): sums and tails are scored
    wpo: bool = False  # WPO pair weights
    bco_delta: str = "zero"
    sync_reference: bool = False  # TR-DPO: the state carries a reference mixed with the policy every k steps
    lora: bool = False  # the state's params are LoRA adapters; the step's frozen argument is the base

    @property
    def head(self) -> dict:
        return dict(token_chunk=self.token_chunk, vocab_chunk=self.vocab_chunk, max_logits_mb=self.max_logits_mb)


# --- Optimizer ------------------------------------------------------------------------------------------------


def lr_schedule(peak: float, steps: int, warmup: int, kind: str, end_fraction: float) -> optax.Schedule:
    decay_steps = max(steps - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_fraction)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, peak * end_fraction, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: not on norms or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not re.search(r"(norm|bias)", jax.tree_util.keystr(path)), params
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (its rule and its empty state) as one scalar factor on every leaf. optax
    divides every element by the norm, and XLA:CPU writes that quotient out as a clipped copy of each gradient
    before AdamW's three passes read it: a pass over the embedding and the head per step."""

    def update(updates, state, params=None):
        del params
        g_norm = optax.tree.norm(updates)
        scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(o, steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + cosine/linear decay, global-norm clipping and a weight-decay mask, from an optimizer
    config section (``optim`` or ``sft``: every field explicit). The learning rate is an injected hyper-parameter
    (it lives in the optimizer state)."""
    schedule = lr_schedule(o["learning_rate"], steps, o["warmup_steps"], o["schedule"], o["end_lr_fraction"])
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=o["b1"], b2=o["b2"], weight_decay=o["weight_decay"], mask=decay_mask
    )
    clip = o["clip_norm"]
    return optax.chain(clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def optim_section(**values) -> dict:
    """The default config's ``optim`` section with ``values`` replaced (tests and benchmarks)."""
    from dpo_jax.configs.default import get_config

    return {**dict(get_config().optim), **values}


def current_lr(opt_state) -> jax.Array:
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        if hasattr(s, "hyperparams"):
            return s.hyperparams["learning_rate"]
    return jnp.float32(0.0)


# --- The step ---------------------------------------------------------------------------------------------------


def batch_totals(batch: dict) -> dict:
    """Normalisers of a whole batch (all micro-batches): pair weight, valid pairs, chosen tokens. Micro-batches of
    packed rows hold different numbers of pairs, so each micro-batch divides by the whole batch's totals."""
    valid = scoring.pair_values(batch, "valid")
    chosen_tokens = scoring.sequence_sums(batch["score_mask"].astype(jnp.float32), batch)[:, 0]
    return {
        "weight": jnp.maximum(jnp.sum(scoring.pair_values(batch, "weights") * valid), 1e-9),
        "pairs": jnp.maximum(jnp.sum(valid), 1.0),
        "tokens": jnp.maximum(jnp.sum(chosen_tokens * valid), 1.0),
    }


def ld_logps(stats: dict, hparams: HParams, sc: StepConfig) -> jax.Array:
    """Per-pair log-probs [n, 2] as the objective sees them: LD-DPO weights the tail past the shorter completion."""
    if not sc.ld:
        return stats["logps"]
    return stats["logps"] - (1.0 - hparams.ld_alpha) * stats["tails"]


def reference_logps(graphdef, batch, reference_params, hparams: HParams, sc: StepConfig, *, cached: bool):
    """The reference's [n, 2] log-probs of the batch (cached in the batch, or a frozen forward); None without."""
    if sc.reference_free:
        return None
    if cached:
        stats = {"logps": batch["ref_logps"].reshape(-1, 2)}
        if sc.ld:
            stats["tails"] = batch["ref_tails"].reshape(-1, 2)
    else:
        stats = scoring.pair_stats(graphdef, reference_params, batch, tails=sc.ld, **sc.head)
    return jax.lax.stop_gradient(ld_logps(stats, hparams, sc))


def pair_losses(stats: dict, ref_logps, batch, hparams: HParams, sc: StepConfig, moments=None):
    """The one DPO objective, for training and eval: per-pair losses [n] and metric means over valid pairs.
    ``stats``: ``scoring.pair_stats`` of the policy; ``ref_logps``: ``reference_logps``; ``moments``: bco_pair's
    running reward moments (``dpo.bco_delta="running"``; eval has none and uses the batch mean)."""
    bco = {"zero": 0.0, "batch": "batch"}.get(sc.bco_delta, "batch" if moments is None else moments)
    logps, counts = ld_logps(stats, hparams, sc), stats["counts"]
    if ref_logps is not None:
        ref_logps = ref_logps * hparams.uses_reference  # a reference-free member: log-probs of zero
    ref = (None, None) if ref_logps is None else (ref_logps[:, 0], ref_logps[:, 1])
    targets = scoring.pair_values(batch, "target_probs")  # KTO: the labels
    if "kto" in sc.loss_types:
        return preference_loss(
            logps[:, 0], logps[:, 1], *ref, loss_type="kto", beta=hparams.beta, target_probs=targets,
            mask=scoring.pair_values(batch, "valid"), desirable_weight=hparams.desirable_weight,
            undesirable_weight=hparams.undesirable_weight,
        )  # fmt: skip
    weights = jnp.exp(stats["wpo"][:, 0] + stats["wpo"][:, 1]) if sc.wpo else None  # WPO, Zhou et al. 2024, eq. 2
    return preference_loss(
        logps[:, 0], logps[:, 1], *ref,
        loss_type=sc.loss_types,
        loss_weights=hparams.loss_weights,
        beta=hparams.beta,
        label_smoothing=hparams.label_smoothing,
        target_probs=temper_targets(targets, hparams.target_temperature) if sc.use_soft_targets else None,
        chosen_lengths=jnp.maximum(counts[:, 0], 1.0),
        rejected_lengths=jnp.maximum(counts[:, 1], 1.0),
        reference_free=sc.reference_free,
        bco_delta=bco,
        mask=scoring.pair_values(batch, "valid"),
        f_divergence_type=hparams.f_divergence,
        f_alpha_divergence_coef=hparams.f_alpha_divergence_coef,
        discopop_tau=hparams.discopop_tau,
        simpo_gamma=hparams.simpo_gamma,
        pair_weights=weights,
    )  # fmt: skip


def objective(params, graphdef, batch, ref_logps, hparams: HParams, sc: StepConfig, totals=None, moments=None,
              dropout_key=None):  # fmt: skip
    """Scalar loss and metrics of one (micro-)batch, normalised by ``totals`` (default: this batch's);
    ``dropout_key``: a training step's (LoRA dropout; eval passes none)."""
    totals = batch_totals(batch) if totals is None else totals
    valid = scoring.pair_values(batch, "valid")
    if sc.stage == "sft":
        logps = scoring.pair_logps(graphdef, params, batch, dropout_key=dropout_key, **sc.head)[0]
        nll = -jnp.sum(logps[:, 0] * valid) / totals["tokens"]
        return nll, {"nll": nll}
    stats = scoring.pair_stats(graphdef, params, batch, tails=sc.ld, wpo=sc.wpo, dropout_key=dropout_key, **sc.head)
    losses, metrics = pair_losses(stats, ref_logps, batch, hparams, sc, moments)
    metrics = {k: v for k, v in metrics.items() if not k.startswith("share/")}  # eval's pooling weights
    w = scoring.pair_values(batch, "weights") * valid
    share = jnp.sum(valid) / totals["pairs"]  # metrics are means over this micro-batch's pairs
    return jnp.sum(losses * w) / totals["weight"], jax.tree.map(lambda m: m * share, metrics)


def micro_batches(x, *, a: int, blocks: int):
    """[n, ...] -> [a, n / a, ...]: a device holds ``a`` consecutive score blocks (with their groups); micro-batch
    k takes the k-th from every device, so the split needs no transfer."""
    per = x.shape[0] // blocks
    x = x.reshape(blocks // a, a, per, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(a, x.shape[0] * per, *x.shape[3:])


def train_step(state: TrainState, batch: dict, reference_params, *, graphdef, tx, sc: StepConfig):
    """One optimizer step (``sc.grad_accum`` micro-batches); a non-finite loss or gradient leaves the state
    unchanged and records the step in ``nonfinite_step``."""
    totals = batch_totals(batch)
    # LoRA: the adapters are trained (the gradient reaches nothing else); the base is the frozen argument, and the
    # reference is the base with the adapters off (no second copy of the weights)
    whole = functools.partial(lora.whole, base=reference_params if sc.lora else None)

    # LoRA dropout: masks from (seed, step) and each token's name (``scoring.token_keys``): resumable, and the same
    # for any grad_accum, layout or device count
    step_key = jax.random.fold_in(state.rng, state.step)

    def micro(batch_m):
        ref = None
        if sc.stage == "dpo":
            cached = not sc.frozen_reference
            moving = reference_params
            if sc.sync_reference:  # TR-DPO: the member's own
                moving = whole(state.reference)
            elif sc.lora:
                moving = whole(lora.off(state.params))
            ref = reference_logps(graphdef, batch_m, moving, state.hparams, sc, cached=cached)
        grad_fn = jax.value_and_grad(lambda p, *a: objective(whole(p), *a), has_aux=True)
        args = (graphdef, batch_m, ref, state.hparams, sc, totals, state.moments, step_key)
        (loss, metrics), grads = grad_fn(state.params, *args)
        return loss, metrics, grads

    a = sc.grad_accum
    if a == 1:
        loss, metrics, grads = micro(batch)
    else:
        # Each micro-batch is normalised by the whole batch's totals, so the sum is the full-batch value.
        split = jax.tree.map(functools.partial(micro_batches, a=a, blocks=batch["score_src"].shape[0]), batch)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro, jax.tree.map(lambda x: x[0], split)))

        def body(carry, batch_m):
            return jax.tree.map(jnp.add, carry, micro(batch_m)), None

        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, split)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr_scale = state.hparams.lr_scale  # each member's learning rate over the shared schedule's peak
    updates = jax.tree.map(lambda u: u * lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    reference = state.reference
    if sc.sync_reference:  # TRL's SyncRefModelCallback: after every k-th step, mix the new policy in
        hp = state.hparams
        sync = ok & ((state.step + 1) % hp.ref_sync_steps == 0)
        mixed = jax.tree.map(lambda p, r: hp.ref_mixup_alpha * p + (1.0 - hp.ref_mixup_alpha) * r, params, reference)
        reference = jax.tree.map(lambda m, r: jnp.where(sync, m, r), mixed, reference)
    moments = state.moments
    if moments is not None and "bco/batch_reward" in metrics:  # share-weighted micro-batch means sum to the batch's
        moments = keep(update_running_moments(moments, metrics["bco/batch_reward"]), moments)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        moments=moments,
        reference=reference,
        nonfinite_step=jnp.where(~ok & (state.nonfinite_step < 0), state.step, state.nonfinite_step),
    )
    lr = current_lr(state.opt_state) * lr_scale
    return new_state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, **metrics}


# --- Programs ---------------------------------------------------------------------------------------------------


class Programs:
    """A jitted function compiled ahead of time once per batch shape; remembers each program's compile time."""

    def __init__(self, jitted):
        self.jitted, self.compiled, self.compile_s = jitted, {}, {}
        self.pending: list[tuple[str, float]] = []  # (shape, seconds) compiled since the last ``take_new``

    def __call__(self, state, batch, *rest):
        key = tuple((k, v.shape) for k, v in sorted(batch.items())) + tuple(
            x.shape for x in jax.tree.leaves(state.hparams)
        )
        key += (jax.tree.structure(rest), *((x.shape, x.dtype) for x in jax.tree.leaves(rest)))  # the frozen tree
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.jitted.lower(state, batch, *rest).compile()
            self.compile_s[key] = time.perf_counter() - t0
            shape = "x".join(map(str, batch["tokens"].shape)) + f", S={batch['score_src'].shape[1]}"
            self.pending.append((shape, self.compile_s[key], batch["tokens"].shape[-1]))
        return self.compiled[key](state, batch, *rest)

    def take_new(self) -> list[tuple[str, float, int]]:
        """(batch shape, compile seconds, row length) of the programs compiled since the last call."""
        new, self.pending = self.pending, []
        return new


def throughput_metrics(name: str, acc: dict, steps: int, dt: float, peak: float) -> dict:
    """Per-interval figures from accumulated ``batch_stats`` (compile time excluded from ``dt``)."""
    dt = max(dt, 1e-9)
    out = {
        f"{name}/step_time_s": dt / steps,
        f"{name}/pairs_per_s": acc["pairs"] / dt,
        f"{name}/tokens_per_s": acc["real_tokens"] / dt,
        f"{name}/packing_efficiency": acc["real_tokens"] / max(acc["slots"], 1.0),
        f"{name}/padding_fraction": 1.0 - acc["real_tokens"] / max(acc["slots"], 1.0),
        f"{name}/head_efficiency": acc["scored_tokens"] / max(acc["head_entries"], 1.0),
    }
    if peak:
        out[f"{name}/mfu"] = acc["flops"] / dt / peak
    if acc.get("compile_s"):
        out[f"{name}/compile_s"] = acc["compile_s"]
    return out


# --- The loop ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Member:
    """One member of a population: its hyper-parameters, data order, checkpoints and log."""

    hparams: HParams
    seed: int  # data order and the train state's rng
    loader: PreferenceLoader
    ckpt: checkpoint.Checkpointer
    writer: Writer
    warnings: list = dataclasses.field(default_factory=list)  # diagnostics that fired (into the run's summary)


@dataclasses.dataclass
class Stage:
    name: str
    sc: StepConfig
    steps: int
    optim: dict  # the optimizer section; its learning rate is the schedule's peak (members scale it)
    members: list[Member]
    reference_params: Any = None  # frozen mode; LoRA: the frozen base
    ref_cache: np.ndarray | None = None  # cached mode: [N, 2] sums, or [N, 4] sums and LD-DPO tails
    evaluator: Any = None
    log_offset: int = 0  # logged step = log_offset + stage step (one increasing axis across stages, W&B's)
    compiled: list = dataclasses.field(default_factory=list)  # seconds each new step program took to compile


_STEP_FNS: dict = {}  # jitted steps, reused by later runs in this process (sweep members differ in traced values)


def _jitted_step(graphdef, tx, sc, optim_key, shardings, batch_shardings, ref_shardings, mesh, shared: bool):
    ref = (jax.tree.structure(ref_shardings), tuple(jax.tree.leaves(ref_shardings)))  # e.g. an int8 LoRA base
    key = (graphdef, sc, optim_key, mesh, tuple(sorted(batch_shardings)), ref, shared)
    if key not in _STEP_FNS:
        step = jax.vmap(
            functools.partial(train_step, graphdef=graphdef, tx=tx, sc=sc), in_axes=(0, None if shared else 0, None)
        )
        _STEP_FNS[key] = Programs(
            jax.jit(
                step,
                in_shardings=(shardings, batch_shardings, ref_shardings),
                out_shardings=(shardings, sharding.replicated(mesh)),
                donate_argnums=0,
            )
        )
    return _STEP_FNS[key]


def stage_checkpointer(cfg, workdir: Path, name: str, population: bool = False) -> checkpoint.Checkpointer:
    """A stage's checkpoints; a population member keeps at least two, so a kill between two members' saves always
    leaves a step they share (``checkpoint.restore_common``)."""
    root = Path(cfg.sft.dir) if name == "sft" and cfg.sft.get("dir") else workdir
    c = cfg.checkpoint
    keep = max(c.keep, 2) if population else c.keep
    return checkpoint.Checkpointer(
        root / name / "checkpoints", every=c.every, keep=keep, reserve_mb=c.get("reserve_mb", 0.0), name=name
    )


def population_batches(stage: Stage, start: int, shared: bool):
    """(step, batch): the batch all members share, or the members' own batches stacked to [K, ...]."""
    if shared:
        yield from stage.members[0].loader.iterate(start, stage.steps - start)
        return
    iters = [m.loader.iterate(start, stage.steps - start) for m in stage.members]
    for items in zip(*iters, strict=True):
        batches = pad_batches([b for _, b in items])  # packed members' batches differ in their static sizes
        yield items[0][0], {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def run_stage(stage: Stage, *, cfg, graphdef, init_params, mesh, model_cfg, matmul_params):
    """Train the K members of one stage together, with checkpoints and resume; returns their [K] parameters."""
    members, k_members = stage.members, len(stage.members)
    tx = make_optimizer(stage.optim, stage.steps)
    running = stage.sc.bco_delta == "running" and "bco_pair" in stage.sc.loss_types
    sync = stage.sc.sync_reference  # TR-DPO: the member's reference starts as the initial policy
    one = jax.eval_shape(lambda p: init_state(p, tx, members[0].hparams, 0, running, p if sync else None), init_params)
    one_shardings = sharding.tree_shardings(one, mesh)
    population = jax.tree.map(lambda x: jax.ShapeDtypeStruct((k_members, *x.shape), x.dtype), one)
    shardings = sharding.tree_shardings(population, mesh, members=True)
    hparams = jax.device_put(stack([m.hparams for m in members]), shardings.hparams)  # the config's values
    # A checkpoint is member k's state as an ordinary run's, without hyper-parameters: they always come from the
    # config (recorded in the checkpoint's meta), so a member can resume alone or in a population of other loss types.
    saved, saved_shardings = one.replace(hparams=None), one_shardings.replace(hparams=None)
    take = jax.jit(lambda s, k: member(s, k).replace(hparams=None), out_shardings=saved_shardings)
    restored = checkpoint.restore_common([m.ckpt for m in members], checkpoint.abstract_like(saved, saved_shardings))
    metas = [meta for _, meta in restored[1]] if restored else [{}] * k_members
    if restored is None:
        seeds = np.asarray([m.seed for m in members], np.int32)
        init = jax.vmap(lambda p, h, s: init_state(p, tx, h, s, running, p if sync else None), in_axes=(None, 0, 0))
        state = jax.jit(init, out_shardings=shardings)(init_params, hparams, seeds)
    else:
        states = [s for s, _ in restored[1]]
        state = jax.jit(lambda xs: stack(xs), out_shardings=shardings.replace(hparams=None))(states)
        state = state.replace(hparams=hparams)
        who = f" {k_members} members" if k_members > 1 else ""
        print(f"[{stage.name}] resumed{who} from step {restored[0]} (data step {metas[0]['data_step']})", flush=True)
    eval_pending = any(m.get("eval_pending") for m in metas)
    start = int(sharding.fetch(state.step)[0])
    if start >= stage.steps and not eval_pending:
        for m in members:
            m.ckpt.close()
        return state.params
    for m in members:  # drop this stage's rows of steps that will be redone (and of an eval that will be redone: an
        # interrupted one, or step 0's when no checkpoint was made after it)
        m.writer.rewind(stage.log_offset + start, stage=stage.name, keep_evals=not (eval_pending or start == 0))

    shared = len({m.seed for m in members}) == 1
    sample = next(population_batches(stage, min(start, stage.steps - 1), shared))[1]
    if stage.ref_cache is not None:
        reference.attach(sample, np.zeros_like(stage.ref_cache))
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim, members=not shared) for k, v in sample.items()}
    ref_shardings = None if stage.reference_params is None else sharding.param_shardings(stage.reference_params, mesh)
    optim_key = (stage.steps, tuple(sorted((k, str(v)) for k, v in stage.optim.items())))
    step_fn = _jitted_step(graphdef, tx, stage.sc, optim_key, shardings, batch_shardings, ref_shardings, mesh, shared)
    console = ConsoleWriter(stage.steps, start, stage.name, stage.log_offset) if jax.process_index() == 0 else Writer()
    peak, peak_source = throughput.peak_flops(cfg.peak_flops)
    counts = throughput.model_counts(model_cfg, matmul_params)
    slices = sharding.batch_slice(mesh)[1]  # processes holding alike slices of the batch
    who = f" ({k_members} members, {mesh.shape['member']} per device group)" if k_members > 1 else ""
    console.note(f"[{stage.name}] batches: {members[0].loader.describe()}{who}; MFU against the {peak_source}")

    def check_finite():
        bad = sharding.fetch(state.nonfinite_step)
        if (bad >= 0).any():
            k = int(np.argmax(bad >= 0))
            for m in members:
                m.ckpt.wait()
            who = f"member {k}: " if k_members > 1 else ""
            raise NonFiniteLoss(
                f"[{stage.name}] {who}the loss or gradient became NaN/Inf at step {int(bad[k])}; stopped without "
                f"saving. Last good checkpoint: {members[k].ckpt.last_good()}"
            )

    def save(step: int, **meta):
        for k, m in enumerate(members):
            if k and jax.process_count() > 1:  # Orbax's cross-host commit barriers are named by step: one at a time
                members[k - 1].ckpt.wait()
            record = {f.name: np.asarray(getattr(m.hparams, f.name)).tolist() for f in dataclasses.fields(m.hparams)}
            info = {"data_step": step, "stage": stage.name, **meta, "hparams": record}
            m.ckpt.save(step, take(state, k), info, force=True)

    def stop(step: int, *, eval_pending: bool = False):
        if members[0].ckpt.latest_step() != step or eval_pending:  # the regular save may already have this step
            save(step, eval_pending=eval_pending)
        for m in members:
            m.ckpt.close()
        raise Preempted(f"[{stage.name}] {signals.name()}: saved step {step}; rerun the same command to resume")

    def evaluate(step: int):
        try:
            rows = stage.evaluator(state.params, state.hparams, step)
        except Preempted:  # saved with the eval marked pending: the resume redoes it
            stop(step, eval_pending=True)
        for m, row in zip(members, rows, strict=True):
            m.writer.write(stage.log_offset + step, {**row, f"{stage.name}/step": step})
        console.write(stage.log_offset + step, rows[0])
        types = stage.sc.loss_types
        for k, (m, row) in enumerate(zip(members, rows, strict=True)):
            if m.warnings or not float(m.hparams.uses_reference) or "kto" in types:
                continue  # once per run; reference-free and KTO members have no such reference point
            sft = float(m.hparams.loss_weights[types.index("sft")]) if "sft" in types else 0.0
            warning = falling_chosen({**row, "step": step}, sft_weight=sft)  # the DPO step, as console and plots
            if warning:
                m.warnings.append(warning)
                m.writer.write(stage.log_offset + step, {FALLING_CHOSEN: row["eval/logratio/chosen_per_token"]})
                console.note(f"[{stage.name}] warning{f' (member {k})' if k_members > 1 else ''}: {warning}")

    try:
        if stage.evaluator is not None and (start == 0 or eval_pending):
            evaluate(start)  # step 0: the reference itself, the first point of every curve
            console.restart_clock()  # the bar's rate and ETA count training steps, not this eval
        t0, steps_timed, acc = time.perf_counter(), 0, {}
        for step, batch in population_batches(stage, start, shared):
            if signals.requested():
                stop(step)
            if stage.ref_cache is not None:
                reference.attach(batch, stage.ref_cache)
            state, metrics = step_fn(state, to_global(batch, mesh, members=not shared), stage.reference_params)
            done = step + 1
            steps_timed += 1
            # The population's step: a shared batch is counted once per member (its statistics computed once).
            own = [member(batch, k) for k in range(k_members)] if not shared else []
            each = [batch_stats(batch)] * k_members if shared else [batch_stats(b) for b in own]
            for stats in each:
                stats = {k: v * slices for k, v in stats.items()}
                stats["flops"] = throughput.step_flops(counts, stats, frozen_reference=stage.sc.frozen_reference)
                acc = {k: acc.get(k, 0.0) + v for k, v in stats.items()}
            for shape, seconds, row in step_fn.take_new():
                acc["compile_s"] = acc.get("compile_s", 0.0) + seconds
                stage.compiled.append(seconds)
                impl = attention.resolve(model_cfg.attention, row, row, model_cfg.attention_block)
                blocks = f" of {model_cfg.attention_block}-token blocks" if impl == "blockwise" else ""
                console.note(f"[{stage.name}] compiled the step for batch {shape} in {seconds:.1f} s "
                             f"(attention: {impl}{blocks})")  # fmt: skip
            if done % cfg.log_every == 0 or done == stage.steps:
                metrics = jax.device_get(metrics)
                check_finite()
                dt = time.perf_counter() - t0 - acc.get("compile_s", 0.0) - acc.get("paused_s", 0.0)
                figures = throughput_metrics(stage.name, acc, steps_timed, dt, peak)
                figures[f"{stage.name}/programs"] = len(stage.compiled)  # compiled so far in this process
                figures[f"{stage.name}/compile_s_total"] = sum(stage.compiled)
                figures[f"{stage.name}/step"] = done
                if k_members > 1:
                    figures[f"{stage.name}/members"] = k_members
                for k, m in enumerate(members):
                    row = {f"{stage.name}/{n}": float(v[k]) for n, v in metrics.items()}
                    row.update(figures)
                    row["train/loss" if stage.name == "dpo" else "sft/loss"] = row[f"{stage.name}/loss"]
                    if stage.name == "dpo":
                        row.update({f"train/{n}": float(v[k]) for n, v in metrics.items()})
                        row.update({f"train/{n[4:]}": v for n, v in figures.items() if "_per_s" in n})
                    m.writer.write(stage.log_offset + done, row)
                    if m is members[0]:
                        console.write(stage.log_offset + done, row)
                t0, steps_timed, acc = time.perf_counter(), 0, {}
            if stage.evaluator is not None and (done % cfg.eval.every == 0 or done == stage.steps):
                jax.block_until_ready(state)  # the steps before it count as training time, not eval time
                t_eval = time.perf_counter()
                evaluate(done)
                acc["paused_s"] = acc.get("paused_s", 0.0) + time.perf_counter() - t_eval
            if done % cfg.checkpoint.every == 0 or done == stage.steps:
                check_finite()
                save(done)
    finally:
        console.close()  # before any error line, so the message is the last thing printed
    for m in members:
        m.ckpt.close()
    return state.params


# --- The job ----------------------------------------------------------------------------------------------------


def _barrier(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_data(cfg, workdir: Path):
    """Tokenizer and data files: the built-in task (written into the workdir, rewritten when its settings change)
    or the configured files."""
    from dpo_jax.hf import HFTokenizer

    if cfg.task == "synthetic":
        data_dir = workdir / "data"
        task = dict(cfg.synthetic)
        record = data_dir / "task.json"
        if jax.process_index() == 0 and not (record.exists() and json.loads(record.read_text()) == task):
            with atomic_dir(data_dir) as tmp:  # a kill mid-write leaves the old folder or none, never half of one
                synthetic.write_task(tmp, synthetic.TaskConfig(**task))
                (tmp / "task.json").write_text(json.dumps(task))
        _barrier("data")
        paths = {k: data_dir / f"{k}.jsonl" for k in ("sft", "train", "eval")}
        return HFTokenizer.from_folder(data_dir / "tokenizer"), paths
    tokenizer_dir = cfg.data.tokenizer_path or cfg.model.hf_path
    paths = {"train": Path(cfg.data.train_path), "eval": Path(cfg.data.eval_path)}
    if cfg.data.sft_path:
        paths["sft"] = Path(cfg.data.sft_path)
    return HFTokenizer.from_folder(tokenizer_dir), paths


def tokenize_config(cfg) -> TokenizeConfig:
    d = cfg.data
    return TokenizeConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          truncation_mode=d.truncation_mode)  # fmt: skip


def max_row_chars(cfg) -> int:
    """The longest text a data row may hold: ``data.max_row_chars``, or 100 characters per token of max_length."""
    return cfg.data.get("max_row_chars", 0) or 100 * cfg.data.max_length


def columns(cfg) -> Columns:
    d = cfg.data
    return Columns(d.prompt_column, d.chosen_column, d.rejected_column, d.prob_column or None, d.weight_column or None)


def check_data(cfg, paths, reports, pairs, stats, notes: Notes) -> None:
    """Refuse data that cannot train as configured; warn once about data that is accepted but probably wrong."""
    d = cfg.data
    needs = {"train": ("optim.batch_size", cfg.optim.batch_size), "eval": ("eval.batch_size", 1)}
    for split, (field, size) in needs.items():
        if len(pairs[split]) < size:
            raise DataError(
                f"too few valid pairs in {paths[split]}: {reports[split].summary()}; one batch needs {size} "
                f"({field}): add rows{' or lower ' + field if size > 1 else ''}"
            )
    for split in ("train", "eval"):
        r, st, where = reports[split], stats[split], paths[split]
        if split == "train" and all(p.weight == 0 for p in pairs[split]):
            notes.warn(f"every pair in {where} has weight 0 ({d.weight_column!r}): the loss is 0 and nothing trains")
        if r.duplicate_keys:
            notes.warn(
                f"{r.duplicate_keys} rows of {where} give a JSON key twice (the last value is used), the first at "
                f"{r.first_duplicate}"
            )
        if r.null_prompts:
            notes.warn(
                f"{r.null_prompts} rows of {where} have a null {d.prompt_column!r}: their prompt was taken as the "
                "shared prefix of chosen and rejected"
            )
        if st.get("unknown_tokens"):
            notes.warn(
                f"{st['unknown_tokens']} pairs of {where} contain text the tokenizer maps to its unknown/pad token"
            )
        if st.get("truncated_prompts") or st.get("truncated_completions"):
            notes.warn(
                f"{where}: {st['truncated_prompts']} of {st['pairs']} prompts truncated to data.max_prompt_length="
                f"{d.max_prompt_length}, {st['truncated_completions']} completions cut to fit data.max_length="
                f"{d.max_length}"
            )
        if st.get("template_mismatch"):
            notes.warn(
                f"{st['template_mismatch']} conversational rows of {where}: the tokenized prompt is not a prefix of "
                "the tokenized conversation (the chat template or tokenizer merges across the boundary)"
            )
        if split == "train" and r.with_prob and not cfg.dpo.use_soft_targets and cfg.task == "files":
            notes.warn(
                f"{where} has a {d.prob_column!r} column ({r.with_prob} rows) but dpo.use_soft_targets=False: "
                "training on hard labels"
            )


def make_layout(cfg, mesh, *, sides: int = 2, accum: int = 1, counts: dict | None = None) -> Layout:
    """The batch layout the config asks for; packed batches hold a multiple of (data-parallel devices x accum)
    rows; ``counts`` (``throughput.model_counts``) weighs attention in the row length chosen from the data."""
    d = cfg.data
    return Layout(
        kind="packed" if d.packing else "padded",
        share_prompt=d.share_prompt,
        row_length=d.pack_length,
        buckets=tuple(d.buckets),
        scored_only=cfg.logprobs.scored_only,
        sides=sides,
        row_multiple=sharding.data_parallel_size(mesh) * accum,
        attention_cost=throughput.attention_cost(counts) if counts else 0.0,
        max_shapes=d.get("max_shapes", 0),
    )


def head_options(cfg) -> dict:
    lp = cfg.logprobs
    budget = throughput.logits_budget_mb(lp.max_logits_mb)
    return dict(token_chunk=lp.token_chunk, vocab_chunk=lp.vocab_chunk, max_logits_mb=budget)


def model_options(cfg) -> dict:
    """How the config runs a model, whatever its weights: compute dtype, remat, scan, attention."""
    m = cfg.model
    return dict(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.get("attention", "auto"),
                attention_block=m.get("attention_block", 512))  # fmt: skip


def build_model(cfg, tokenizer):
    from dpo_jax import hf
    from dpo_jax.models import ModelConfig, init_decoder

    m = cfg.model
    if m.init == "hf":
        model, _ = hf.load_pretrained(m.hf_path, **model_options(cfg))
        return model
    mc = ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, **model_options(cfg),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=cfg.data.max_length,
    )  # fmt: skip
    return init_decoder(mc, seed=cfg.seed)


def check_reference(cfg, policy_config) -> None:
    """``reference.hf_path`` must hold the policy's architecture (before anything trains)."""
    from dpo_jax import hf

    ref = hf.load_config(cfg.reference.hf_path, **model_options(cfg))
    policy = policy_config.replace(lora_rank=0, lora_alpha=ref.lora_alpha, lora_targets=(), lora_dropout=0.0)
    if ref != policy:
        a, b = dataclasses.asdict(ref), dataclasses.asdict(policy)
        diff = ", ".join(f"{k} {a[k]!r} (policy {b[k]!r})" for k in a if a[k] != b[k])
        raise ConfigError(f"config.reference.hf_path: expected a model of the policy's architecture; got {diff}")


def load_reference(cfg, mesh):
    """The parameters of ``reference.hf_path`` (checked by ``check_reference``) in the policy's layout (LoRA: its
    adapters off), placed as the policy's."""
    from dpo_jax import hf

    lo = cfg.lora
    ref, _ = hf.load_pretrained(cfg.reference.hf_path, **model_options(cfg))
    if lo.rank:
        adapters, ref_base = lora.split(lora.cast_base(nnx.state(lora.attach_config(ref, lo, cfg.seed)), lo.base_dtype))
        params = lora.compose(lora.off(adapters), ref_base)
    else:
        params = nnx.state(ref)
    return jax.device_put(params, sharding.param_shardings(params, mesh))


@dataclasses.dataclass
class Job:
    """Everything a DPO stage needs once data, model, SFT reference and reference log-probs are ready."""

    cfg: Any
    mesh: Any
    tokenizer: Any
    graphdef: Any
    model_config: Any
    n_params: int
    matmul_params: int
    loader_kw: dict
    chunks: dict
    train_pairs: list
    eval_pairs: list
    eval_examples: list
    policy: Any  # what DPO trains from: the (SFT'd) policy, or its adapters (B zero) in a LoRA run
    reference_params: Any
    ref_train: np.ndarray | None
    ref_eval: np.ndarray | None
    sft_steps: int
    summary: dict
    base: Any = None  # LoRA: the frozen base (reference_params is it with the adapters off)

    def initial_params(self):
        """What a DPO stage trains from: the (SFT'd) policy of ``model.*``, or its adapters (B zero) in a LoRA
        run; never ``reference.hf_path``'s weights, which are only the reference."""
        return self.policy

    def initial_policy(self):
        """The whole initial policy (LoRA: its adapters on the base)."""
        return lora.whole(self.policy, self.base)

    def step_config(self, cfgs) -> StepConfig:
        """The DPO step of members ``cfgs`` (equal but for what ``HParams`` holds): their loss types' union."""
        cfg = cfgs[0]
        types = tuple(dict.fromkeys(t for c in cfgs for t in loss_types(c)))
        return StepConfig(
            "dpo", types, cfg.dpo.use_soft_targets, not any(needs_reference(c) for c in cfgs),
            cfg.reference.mode == "frozen", cfg.optim.grad_accum, ld=any(c.dpo.ld_alpha != 1 for c in cfgs),
            wpo=cfg.dpo.use_weighting, bco_delta=cfg.dpo.bco_delta, sync_reference=cfg.reference.sync,
            lora=self.base is not None, **self.chunks,
        )  # fmt: skip

    def evaluator(self, cfgs):
        from dpo_jax.evaluate import Evaluator

        cfg = cfgs[0]
        reward_fn = rewards.scorer(rewards.spec(cfg), cfg.reward_timeout_s) if rewards.spec(cfg) else None
        return Evaluator(
            cfg=cfg, graphdef=self.graphdef, reference_params=self.reference_params, eval_pairs=self.eval_pairs,
            eval_examples=self.eval_examples, ref_eval=self.ref_eval, tokenizer=self.tokenizer, mesh=self.mesh,
            loader_kw=self.loader_kw, sc=self.step_config(cfgs), reward_fn=reward_fn, base=self.base,
        )  # fmt: skip

    def dpo_stage(self, cfgs, workdirs, writers, evaluator) -> Stage:
        cfg, sc = cfgs[0], self.step_config(cfgs)
        counts = throughput.model_counts(self.model_config, self.matmul_params)
        kw = {**self.loader_kw, "layout": make_layout(cfg, self.mesh, accum=cfg.optim.grad_accum, counts=counts)}
        members = [
            Member(
                HParams.from_config(c, sc.loss_types, cfg.optim.learning_rate),
                dpo_seed(c),
                PreferenceLoader(self.train_pairs, cfg.optim.batch_size, seed=dpo_seed(c), **kw),
                stage_checkpointer(c, wd, "dpo", population=len(cfgs) > 1),
                w,
            )
            for c, wd, w in zip(cfgs, workdirs, writers, strict=True)
        ]
        frozen = self.reference_params if sc.frozen_reference and not sc.sync_reference else None  # TR-DPO: in state
        if self.base is not None:
            frozen = self.base  # LoRA: every step composes the policy (and the reference) from it
        return Stage(
            "dpo", sc, cfg.optim.steps, dict(cfg.optim), members, frozen, self.ref_train, evaluator, self.sft_steps
        )

    def run(self, stage: Stage, init_params):
        return run_stage(
            stage, cfg=self.cfg, graphdef=self.graphdef, init_params=init_params, mesh=self.mesh,
            model_cfg=self.model_config, matmul_params=self.matmul_params,
        )  # fmt: skip


def make_mesh(cfg, devices, num_members: int = 1):
    m = cfg.mesh
    size = m.member or sharding.member_axis_size(num_members, len(devices), m.data, m.fsdp, m.tensor)
    if num_members % size:
        raise ConfigError(f"config.mesh.member: expected a divisor of the {num_members} members, got {size}")
    return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices, member=size)


def prepare(cfg, workdir: Path, devices, writer, notes: Notes | None = None, cfgs=None) -> Job:
    """Data, tokenizer, model, the SFT stage (if configured) and the reference log-probs (of all members ``cfgs``,
    default ``[cfg]``: cached when one of them reads the reference, with tails when one uses LD-DPO)."""
    notes = notes or Notes()
    cfgs = cfgs or [cfg]
    mesh = make_mesh(cfg, devices, len(cfgs))
    validate(cfg, num_devices=len(devices), members=mesh.shape["member"])
    tokenizer, paths = prepare_data(cfg, workdir)
    d = cfg.data
    tok_cfg = tokenize_config(cfg)
    load = functools.partial(load_examples, columns=columns(cfg), on_bad_row=d.on_bad_row, split=d.split or None,
                             max_chars=max_row_chars(cfg))  # fmt: skip
    (train_ex, train_report), (eval_ex, eval_report) = load(paths["train"]), load(paths["eval"])
    train_pairs, train_tok = tokenize_examples(train_ex, tokenizer, tok_cfg)
    eval_pairs, eval_tok = tokenize_examples(eval_ex, tokenizer, tok_cfg)
    summary: dict[str, Any] = {
        "data/train": train_report.summary(),
        "data/eval": eval_report.summary(),
        "data/train_truncation": train_tok,
        "data/eval_truncation": eval_tok,
    }
    if jax.process_index() == 0:
        print(f"train data: {train_report.summary()}; eval data: {eval_report.summary()}", flush=True)
    check_data(
        cfg,
        paths,
        {"train": train_report, "eval": eval_report},
        {"train": train_pairs, "eval": eval_pairs},
        {"train": train_tok, "eval": eval_tok},
        notes,
    )
    for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
        n = sum(p.unpaired for p in pairs)
        if n and (n < len(pairs) or "kto" not in loss_types(cfg)):
            raise DataError(
                f"{paths[split]} has {n} unpaired rows (prompt, completion, label) among {len(pairs)}: unpaired "
                "data trains with dpo.loss_type='kto' only, and a file is either paired or unpaired"
            )
    if "kto" in loss_types(cfg):  # unpaired examples with mismatched KL completions, as pairs
        train_pairs, eval_pairs = kto.from_pairs(train_pairs), kto.from_pairs(eval_pairs)
        summary["data/kto_examples"] = "{} desirable, {} undesirable".format(*kto.counts(train_pairs))
    if any(w < 0 for w in cfg.dpo.loss_weights):
        notes.warn(f"dpo.loss_weights {tuple(cfg.dpo.loss_weights)} has a negative weight: that loss is maximised")

    model = build_model(cfg, tokenizer)
    lo = cfg.lora
    if lo.rank:  # adapters on the loaded or initialised model: the same function until trained
        model = lora.attach_config(model, lo, cfg.seed)
    if lo.rank and cfg.optim.learning_rate < 2e-6:
        notes.warn(
            f"lora.rank={lo.rank} with optim.learning_rate={cfg.optim.learning_rate:g}, a full fine-tuning rate: "
            "adapters move the margins ~50x less per step at the same rate; LoRA runs usually take 1e-5 to 1e-4 "
            "(configs/hf_local.py:lora uses 2.5e-5)"
        )
    if d.max_length > model.config.max_position_embeddings:
        notes.warn(
            f"data.max_length={d.max_length} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}: positions beyond it were never trained"
        )
    if cfg.reference.hf_path:
        check_reference(cfg, model.config)
    graphdef, params = nnx.split(model)
    n_params, matmul_params = scoring.count_matmul_params(model)
    params = lora.cast_base(params, lo.base_dtype) if lo.rank else params
    params = jax.device_put(params, sharding.param_shardings(params, mesh))
    # LoRA: from here on ``params`` are the adapters; the base is frozen beside them
    params, base = lora.split(params) if lo.rank else (params, None)
    index, count = sharding.batch_slice(mesh)
    counts = throughput.model_counts(model.config, matmul_params)
    layout = make_layout(cfg, mesh, counts=counts)
    loader_kw = dict(layout=layout, pad_id=tokenizer.pad_token_id or 0, process_index=index, process_count=count)
    chunks = head_options(cfg)
    run = functools.partial(
        run_stage, cfg=cfg, graphdef=graphdef, mesh=mesh, model_cfg=model.config, matmul_params=matmul_params
    )
    sft_steps = 0
    if cfg.sft.steps > 0 and "sft" in paths:
        sft_ex = load_sft_examples(paths["sft"], on_bad_row=d.on_bad_row, max_chars=max_row_chars(cfg))
        sft_pairs, _ = tokenize_examples(sft_ex, tokenizer, tok_cfg)
        if len(sft_pairs) < cfg.sft.batch_size:
            raise DataError(
                f"too few valid rows in {paths['sft']}: {len(sft_pairs)}; one batch needs sft.batch_size="
                f"{cfg.sft.batch_size}: add rows or lower sft.batch_size"
            )
        sft_kw = {**loader_kw, "layout": make_layout(cfg, mesh, sides=1, counts=counts)}
        sft_loader = PreferenceLoader(sft_pairs, cfg.sft.batch_size, seed=cfg.seed, **sft_kw)
        ckpt = stage_checkpointer(cfg, workdir, "sft")
        sft_hparams = HParams.from_config(cfg, ("sigmoid",))  # unused by SFT; one shape for every member's stage
        sft_member = Member(sft_hparams, cfg.seed, sft_loader, ckpt, writer)
        sc_sft = StepConfig("sft", **chunks, lora=base is not None)
        sft = Stage("sft", sc_sft, cfg.sft.steps, dict(cfg.sft), [sft_member], reference_params=base)
        with shared_stage_lock(cfg):  # parallel sweep members share one SFT stage: one trains it, the others wait
            params = sharding.take_member(run(sft, init_params=params), 0, mesh)
        if base is not None:  # the SFT adapters merged into the base: DPO's reference, adapters off
            params, base = lora.split(lora.fold(lora.compose(params, base), model.config))
        sft_steps = cfg.sft.steps
    # the reference, kept outside the trained state; LoRA: the base with the adapters off (the same arrays, no copy)
    if cfg.reference.hf_path:  # another model as the reference (iterative rounds keep their first policy)
        reference_params = load_reference(cfg, mesh)
        summary["reference/hf_path"] = cfg.reference.hf_path
    elif base is None:
        reference_params = jax.tree.map(jnp.copy, params)
    else:
        reference_params = lora.compose(lora.off(params), base)

    ref_train = ref_eval = None
    summary["reference/mode"] = cfg.reference.mode
    signals.check("before the reference pass (the SFT stage is saved)")
    if cfg.reference.mode == "cached" and any(needs_reference(c) for c in cfgs):
        tails = any(c.dpo.ld_alpha != 1 for c in cfgs)
        cache_dir = cfg.reference.cache_dir or str(workdir.parent / "reference_cache")
        if jax.process_index() == 0:
            clean_stale_tmp(cache_dir)
        compute = functools.partial(
            reference.compute_logps, graphdef, reference_params, mesh=mesh, batch_size=cfg.eval.batch_size,
            layout=loader_kw["layout"], pad_id=loader_kw["pad_id"], head=chunks, tails=tails,
        )  # fmt: skip
        lay = loader_kw["layout"]
        settings = {"head": chunks, "layout": [lay.kind, lay.shared, lay.row_length, list(lay.buckets)]}
        if tails:
            settings["tails"] = True
        t0 = time.perf_counter()
        hits = []
        for pairs in (train_pairs, eval_pairs):
            key = reference.cache_key(reference_params, model.config, pairs, settings)
            values, hit = reference.cached_logps(cache_dir, key, functools.partial(compute, pairs), pairs)
            hits.append(hit)
            ref_train, ref_eval = (values, ref_eval) if pairs is train_pairs else (ref_train, values)
        summary.update(
            {
                "reference/cache_hit": all(hits),
                "reference/pass_s": time.perf_counter() - t0,
                "reference/cache_dir": cache_dir,
            }
        )
    return Job(
        cfg,
        mesh,
        tokenizer,
        graphdef,
        model.config,
        n_params,
        matmul_params,
        loader_kw,
        chunks,
        train_pairs,
        eval_pairs,
        eval_ex,
        params,
        reference_params,
        ref_train,
        ref_eval,
        sft_steps,
        summary,
        base,
    )


def make_writer(cfg, workdir: Path) -> Writer:
    """JSONL (and W&B if enabled) on process 0; nothing elsewhere."""
    if jax.process_index() != 0:
        return Writer()
    writers = [JsonlWriter(workdir / "metrics.jsonl")]
    if cfg.wandb.enabled:
        writers.append(WandbWriter(cfg.wandb, workdir, cfg.to_dict(), job_type="train"))
    return MultiWriter(writers)


def run_info(job: Job, devices, t_start: float) -> dict:
    return {
        "params": job.n_params,
        "wall_time_s": time.perf_counter() - t_start,
        "devices": len(devices),
        "processes": jax.process_count(),
        "backend": jax.default_backend(),
    }


def stage_records(cfg, workdir: Path) -> dict[Path, dict]:
    """{stage folder: the flattened config its checkpoints are made with}: the SFT stage (which sweep members may
    share) depends on ``SFT_FIELDS`` only; the DPO stage on everything."""
    full = flatten(cfg.to_dict())
    sft_dir = Path(cfg.sft.dir) / "sft" if cfg.sft.get("dir") else workdir / "sft"
    if cfg.task == "files":  # what the files hold, not only where they are: a changed file is refused on resume
        for key in ("train_path", "eval_path", "sft_path"):
            if cfg.data[key] and Path(cfg.data[key]).exists():
                full[f"data.{key}{DIGEST}"] = file_digest(cfg.data[key])
    fields = (*SFT_FIELDS, "lora") if cfg.lora.rank else SFT_FIELDS  # a LoRA SFT stage trains adapters
    sft = {k: v for k, v in full.items() if any(k == f or k.startswith(f + ".") for f in fields)}
    if f"data.sft_path{DIGEST}" in full:
        sft[f"data.sft_path{DIGEST}"] = full[f"data.sft_path{DIGEST}"]
    has_sft = cfg.sft.steps > 0 and (cfg.task == "synthetic" or bool(cfg.data.sft_path))
    return {**({sft_dir: sft} if has_sft else {}), workdir / "dpo": full}


def check_stage_configs(cfg, workdir: Path) -> list:
    """Before anything runs: refuse to resume a stage whose checkpoints were made with another config (unless the
    change is allowed in ``resume.allow_changes``); returns the allowed changes, printed once."""
    changes = []
    for folder, record in stage_records(cfg, workdir).items():
        step = checkpoint.latest_step_on_disk(folder / "checkpoints")
        if jax.process_index() == 0:
            for k, old, new in check_resume_config(
                folder, record, allow=allowed_changes(cfg.resume.allow_changes), step=step
            ):
                print(f"[{folder.name}] resuming with {k} = {new!r} (its checkpoints were made with {old!r})")
                changes.append((k, old, new))
    return changes


@contextlib.contextmanager
def shared_stage_lock(cfg):
    """Process 0 holds the lock of a shared SFT folder (``sft.dir``) while the stage runs, waiting for another
    run that holds it (sweep members started in parallel from ``commands.sh``)."""
    if not cfg.sft.get("dir") or jax.process_index() != 0:
        yield
        return
    Path(cfg.sft.dir).mkdir(parents=True, exist_ok=True)
    with WorkdirLock(cfg.sft.dir, wait=True):
        yield


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Process 0 holds the workdir's lock for the whole run (other processes of the same run share it)."""
    if jax.process_index() != 0:
        yield
        return
    with WorkdirLock(workdir):
        yield


def train(cfg, workdir: str | os.PathLike, *, devices=None) -> dict:
    """Run the configured job end to end; returns the summary (also written to ``<workdir>/summary.json``).

    A finished workdir (``summary.json``) is not run again: its summary is returned."""
    devices = list(jax.devices() if devices is None else devices)
    workdir = ensure_writable(workdir)
    if not (workdir / "summary.json").exists():
        return train_population([cfg], [workdir], devices=devices)[0]
    validate(cfg, num_devices=len(devices), members=make_mesh(cfg, devices).shape["member"])
    with workdir_lock(workdir):
        changes = check_stage_configs(cfg, workdir)
    if not changes:
        if jax.process_index() == 0:
            print(f"{workdir} is a finished run (summary.json); nothing to do. Use a new --workdir to train again")
        return load_summary(workdir)
    return train_population([cfg], [workdir], devices=devices, changes=[changes])[0]


def train_population(cfgs: list, workdirs: list, *, devices=None, changes=None) -> list[dict]:
    """Train K >= 1 member configs (equal but for what ``HParams`` and ``dpo.seed`` hold) in one program; each
    member is written out as an ordinary run (checkpoints, metrics, W&B run, eval, summary, plots, export).
    ``changes``: the members' accepted resume changes, when the caller has checked them already."""
    from dpo_jax.evaluate import write_outputs

    devices = list(jax.devices() if devices is None else devices)
    workdirs = [ensure_writable(wd) for wd in workdirs]
    cfg = cfgs[0]
    mesh = make_mesh(cfg, devices, len(cfgs))
    for c in cfgs:
        validate(c, num_devices=len(devices), members=mesh.shape["member"])
    with contextlib.ExitStack() as stack_:
        for wd in workdirs:
            stack_.enter_context(workdir_lock(wd))
            if jax.process_index() == 0 and (stale := clean_stale_tmp(wd)):
                print(f"removed {len(stale)} temporary files an earlier, killed run left in {wd}", flush=True)
        stack_.enter_context(stop_signals())
        if changes is None:
            changes = [check_stage_configs(c, wd) for c, wd in zip(cfgs, workdirs, strict=True)]
        t_start = time.perf_counter()
        notes = Notes()
        writers = [make_writer(c, wd) for c, wd in zip(cfgs, workdirs, strict=True)]
        try:
            job = prepare(cfg, workdirs[0], devices, writers[0], notes, cfgs=cfgs)
            evaluator = job.evaluator(cfgs)
            stage = job.dpo_stage(cfgs, workdirs, writers, evaluator)
            params = job.run(stage, init_params=job.initial_params())
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
            summary = {**job.summary, **finals[k], **run_info(job, devices, t_start), **compiled}
            if len(cfgs) > 1:
                summary["population/members"] = len(cfgs)
            if notes.items or stage.members[k].warnings:
                summary["warnings"] = notes.items + stage.members[k].warnings
            if changes[k]:
                summary["resume/changes"] = [f"{n}: {old!r} -> {new!r}" for n, old, new in changes[k]]
            final = lora.whole(sharding.take_member(params, k, job.mesh), job.base)
            write_outputs(c, wd, job.graphdef, final, job.tokenizer, summary)
            summaries.append(summary)
        _barrier("outputs")  # process 0 has written every member's summary
    return summaries


def load_summary(workdir) -> dict:
    return json.loads((Path(workdir) / "summary.json").read_text())
