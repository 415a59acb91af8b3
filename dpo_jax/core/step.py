"""The algorithm: the one DPO / SFT objective and the pure train and eval steps, below all machinery.

``train_step(state, batch, reference) -> (state, metrics)`` is one optimizer step (``StepConfig.grad_accum``
micro-batches) of one member; the loop (``dpo_jax.training.loop``) vmaps it over a population's members and jits it once
per batch shape. Hyper-parameters (beta, label smoothing, soft-target temperature, learning-rate scale, loss-type
weights) live in ``state.hparams``: traced, so one compile serves any values, for training and eval alike
(``pair_losses`` is the one objective; ``eval_sums`` the eval step). ``reference`` is the frozen reference's
parameters (``reference.mode='frozen'``), a LoRA run's frozen base, or None when the batch carries precomputed
reference log-probs (``'cached'``, the default).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from dpo_jax.core import bema, scoring
from dpo_jax.core.batch import Batch
from dpo_jax.core.hparams import HParams
from dpo_jax.core.losses import preference_loss, temper_targets, update_running_moments
from dpo_jax.core.optim import current_lr
from dpo_jax.core.state import TrainState
from dpo_jax.models import lora, moe
from dpo_jax.models.paths import path_str


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
    bema: bool = False  # BEMA: the state carries the reference BEMA's weights replace (dpo_jax.core.bema)
    lora: bool = False  # the state's params are LoRA adapters; the step's frozen argument is the base
    aux_loss_coef: float = 0.0  # a mixture of experts: the load-balancing loss's weight in every objective
    freeze_router: bool = False  # ... and its routers never update (the reference's routing kept)
    # a population member that fails is frozen at its last good state, so the others train on: the step computes
    # the whole new state before choosing it (one more copy of params and optimizer state in memory). A single run
    # stops at a failure without saving (``Loop.check_finite``), so its step updates in place (the default).
    keep_last_good: bool = False

    @property
    def head(self) -> dict:
        return dict(token_chunk=self.token_chunk, vocab_chunk=self.vocab_chunk, max_logits_mb=self.max_logits_mb)


# --- The step ---------------------------------------------------------------------------------------------------


def batch_totals(batch: Batch) -> dict:
    """Normalisers of a whole batch (all micro-batches): pair weight, valid pairs, chosen tokens. Micro-batches of
    packed rows hold different numbers of pairs, so each micro-batch divides by the whole batch's totals."""
    valid = scoring.pair_values(batch.valid_GxP)
    chosen_tokens = scoring.sequence_sums(batch.score_mask_ZxS.astype(jnp.float32), batch)[:, 0]
    return {
        "weight": jnp.maximum(jnp.sum(scoring.pair_values(batch.weights_GxP) * valid), 1e-9),
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
        stats = {"logps": batch.ref_logps_GxPx2.reshape(-1, 2)}
        if sc.ld:
            stats["tails"] = batch.ref_tails_GxPx2.reshape(-1, 2)
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
    targets = scoring.pair_values(batch.target_probs_GxP)  # KTO: the labels
    if "kto" in sc.loss_types:
        return preference_loss(
            logps[:, 0], logps[:, 1], *ref, loss_type="kto", beta=hparams.beta, target_probs=targets,
            mask=scoring.pair_values(batch.valid_GxP), **hparams.loss_kwargs(),
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
        mask=scoring.pair_values(batch.valid_GxP),
        f_divergence_type=hparams.f_divergence,
        pair_weights=weights,
        **hparams.loss_kwargs(),  # the coefficients declared as the loss's (dpo_jax.core.hparams)
    )  # fmt: skip


def objective(params, graphdef, batch, ref_logps, hparams: HParams, sc: StepConfig, totals=None, moments=None,
              dropout_key=None):  # fmt: skip
    """Scalar loss and metrics of one (micro-)batch, normalised by ``totals`` (default: this batch's);
    ``dropout_key``: a training step's (LoRA dropout; eval passes none)."""
    totals = batch_totals(batch) if totals is None else totals
    valid = scoring.pair_values(batch.valid_GxP)
    share = jnp.sum(valid) / totals["pairs"]  # metrics are means over this micro-batch's pairs
    if sc.stage == "sft":
        stats = scoring.pair_stats(graphdef, params, batch, dropout_key=dropout_key, **sc.head)
        nll = -jnp.sum(stats["logps"][:, 0] * valid) / totals["tokens"]
        loss, metrics = nll, {"nll": nll}
    else:
        stats = scoring.pair_stats(graphdef, params, batch, tails=sc.ld, wpo=sc.wpo, dropout_key=dropout_key,
                                   **sc.head)  # fmt: skip
        losses, metrics = pair_losses(stats, ref_logps, batch, hparams, sc, moments)
        metrics = {k: v for k, v in metrics.items() if not k.startswith("share/")}  # eval's pooling weights
        w = scoring.pair_values(batch.weights_GxP) * valid
        loss = jnp.sum(losses * w) / totals["weight"]
        metrics = jax.tree.map(lambda m: m * share, metrics)
    if "router" in stats:  # TRL's router_aux_loss_coef * aux_loss, a micro-batch's share of it
        router_metrics = router_summary(stats["router"])
        loss = loss + sc.aux_loss_coef * router_metrics["aux_loss"] * share
        metrics.update(jax.tree.map(lambda m: m * share, router_metrics))
    return loss, metrics


def router_summary(stats_L: dict) -> dict:
    """A mixture's load-balancing loss and expert load (max and min over experts of the mean over layers of an
    expert's share of the top-k assignments, times the number of experts: 1 is balanced)."""
    load_E = jnp.mean(moe.expert_load(stats_L), axis=0) * stats_L["counts"].shape[-1]
    return {"aux_loss": moe.aux_loss(stats_L), "moe/load_max": jnp.max(load_E), "moe/load_min": jnp.min(load_E)}


def micro_batches(x, *, a: int, blocks: int):
    """[n, ...] -> [a, n / a, ...]: a device holds ``a`` consecutive score blocks (with their groups); micro-batch
    k takes the k-th from every device, so the split needs no transfer."""
    per = x.shape[0] // blocks
    x = x.reshape(blocks // a, a, per, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(a, x.shape[0] * per, *x.shape[3:])


def train_step(state: TrainState, batch: Batch, reference_params, *, graphdef, tx, sc: StepConfig):
    """One optimizer step (``sc.grad_accum`` micro-batches); a non-finite loss, gradient or updated parameter
    leaves the state unchanged and records the step in ``nonfinite_step``, after which the member's state never
    changes again (the loop stops a run, or lets a population's other members train on)."""
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
            if sc.sync_reference or sc.bema:  # a moving reference: the member's own
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
        split = jax.tree.map(functools.partial(micro_batches, a=a, blocks=batch.score_src_ZxS.shape[0]), batch)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro, jax.tree.map(lambda x: x[0], split)))

        def body(carry, batch_m):
            return jax.tree.map(jnp.add, carry, micro(batch_m)), None

        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, split)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr_scale = state.hparams.lr_scale  # each member's learning rate over the shared schedule's peak
    updates = jax.tree.map(lambda u: u * lr_scale, updates)
    if sc.freeze_router:  # the routers keep the reference's weights: no update (weight decay included)
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: jnp.zeros_like(u) if path_str(path).endswith("mlp/router") else u, updates
        )
    params = optax.apply_updates(state.params, updates)
    # a member that failed once stays at its last good state (a population trains the others on)
    ok = (
        jnp.isfinite(loss)
        & jnp.isfinite(grad_norm)
        & jnp.isfinite(optax.tree.norm(params))
        & ~(state.nonfinite_step >= 0)
    )
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
    if not sc.keep_last_good:
        keep = lambda new, old: new  # noqa: E731
    buffers = state.bema
    if sc.bema:  # TRL's BEMACallback (update_ref_model): after step t, the EMA, the BEMA weights, the reference
        buffers, reference = keep(bema.update(state.bema, reference, params, state.step + 1, state.hparams),
                                  (state.bema, reference))  # fmt: skip
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        moments=moments,
        reference=reference,
        bema=buffers,
        nonfinite_step=jnp.where(~ok & (state.nonfinite_step < 0), state.step, state.nonfinite_step),
    )
    lr = current_lr(state.opt_state) * lr_scale
    return new_state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, **metrics}


def eval_sums(params, hparams: HParams, batch: Batch, reference_params, base, *, graphdef, sc: StepConfig,
              cached: bool) -> dict:  # fmt: skip
    """One eval batch of one member: the objective's per-pair losses and metrics summed over the valid pairs (and
    the exact token KL to the reference), to be pooled over batches and divided by ``n`` (a metric with a
    ``share/<key>`` averages over that share of the pairs only: KTO's per-label means, counted in ``n/<key>``)."""
    params = lora.whole(params, base)
    stats = scoring.pair_stats(graphdef, params, batch, tails=sc.ld, wpo=sc.wpo, **sc.head)
    ref = reference_logps(graphdef, batch, reference_params, hparams, sc, cached=cached)
    losses, metrics = pair_losses(stats, ref, batch, hparams, sc)
    valid = scoring.pair_values(batch.valid_GxP)
    n = jnp.sum(valid)
    kl, kl_tokens, drift = scoring.completion_token_kl(
        graphdef, params, reference_params, batch, max_logits_mb=sc.max_logits_mb
    )
    if drift is not None:  # router drift per token (``n/moe/router_kl``: its tokens), load and aux loss per pair
        tokens = jnp.maximum(drift[1], 1.0)
        metrics.update({"moe/router_kl": drift[0] / tokens, "share/moe/router_kl": tokens / jnp.maximum(n, 1.0)})
        metrics.update(router_summary(stats["router"]))
    shares = {k[len("share/") :]: v for k, v in metrics.items() if k.startswith("share/")}
    sums = {k: v * n * shares.get(k, 1.0) for k, v in metrics.items() if not k.startswith("share/")}
    sums.update({f"n/{k}": n * s for k, s in shares.items()})
    sums.update(loss=jnp.sum(losses * valid), n=n, kl=jnp.sum(kl * valid), kl_tokens=jnp.sum(kl_tokens * valid))
    return sums
