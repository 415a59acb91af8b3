"""The train state of a population of K >= 1 members, and the typed hyper-parameters its members may differ in.

Shape letters: K members, T loss types. A plain run is K = 1; a vectorised sweep K > 1. Every leaf of a
population's state has a leading [K] axis; ``member(state, k)`` is an ordinary single-run state (what a member's
checkpoints hold), ``stack`` builds the population back.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax.config import loss_types, needs_reference
from dpo_jax.configs.default import get_config as default_config
from dpo_jax.losses import F_DIVERGENCES, RunningMoments


@flax.struct.dataclass
class HParams:
    """A member's traced hyper-parameters (one compile serves any values). Defaults: the config's (``from_config``
    is the one constructor the product uses; ``create`` fills what it is not given from the default config)."""

    beta: jax.Array
    label_smoothing: jax.Array
    target_temperature: jax.Array  # soft targets become sigmoid(logit(p) / T)
    lr_scale: jax.Array  # the member's learning rate over the shared schedule's peak
    loss_weights: jax.Array  # [T] weight of each of the step's loss types (0: not in this member's mix)
    f_divergence: jax.Array  # index into dpo_jax.losses.F_DIVERGENCES
    f_alpha_divergence_coef: jax.Array
    discopop_tau: jax.Array
    simpo_gamma: jax.Array
    ld_alpha: jax.Array  # LD-DPO weight of the tokens past the shorter completion (1: plain sums)
    uses_reference: jax.Array  # 0 for a reference-free member (policy-only types, or dpo.reference_free): its
    # rewards are beta * log pi alone, in a population with a reference as when it runs alone
    desirable_weight: jax.Array  # KTO
    undesirable_weight: jax.Array
    ref_mixup_alpha: jax.Array  # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference ...
    ref_sync_steps: jax.Array  # ... every this many steps (reference.sync)

    @classmethod
    def from_config(cls, cfg, types: tuple[str, ...] | None = None, peak_lr: float | None = None) -> HParams:
        """The member ``cfg``'s values; ``types``: the step's loss types (a population's union; default: the
        member's own), ``peak_lr``: the shared schedule's peak (default: the member's learning rate)."""
        own = loss_types(cfg)
        types = own if types is None else tuple(types)
        w = tuple(cfg.dpo.loss_weights) or (1.0,) * len(own)
        weights = [sum(wi for ti, wi in zip(own, w, strict=True) if ti == t) for t in types]
        peak_lr = cfg.optim.learning_rate if peak_lr is None else peak_lr
        return cls(
            beta=np.float32(cfg.dpo.beta),
            label_smoothing=np.float32(cfg.dpo.label_smoothing),
            target_temperature=np.float32(cfg.dpo.soft_target_temperature),
            lr_scale=np.float32(cfg.optim.learning_rate / peak_lr),
            loss_weights=np.asarray(weights, np.float32),
            f_divergence=np.int32(F_DIVERGENCES.index(cfg.dpo.f_divergence_type)),
            f_alpha_divergence_coef=np.float32(cfg.dpo.f_alpha_divergence_coef),
            discopop_tau=np.float32(cfg.dpo.discopop_tau),
            simpo_gamma=np.float32(cfg.dpo.simpo_gamma),
            ld_alpha=np.float32(cfg.dpo.ld_alpha),
            uses_reference=np.float32(needs_reference(cfg)),
            desirable_weight=np.float32(cfg.dpo.desirable_weight),
            undesirable_weight=np.float32(cfg.dpo.undesirable_weight),
            ref_mixup_alpha=np.float32(cfg.reference.ref_model_mixup_alpha),
            ref_sync_steps=np.int32(cfg.reference.ref_model_sync_steps),
        )

    @classmethod
    def create(cls, **values) -> HParams:
        """Tests and benchmarks: the default config with ``dpo`` fields (and ``loss_type``) replaced."""
        cfg = default_config()
        for k, v in values.items():
            cfg.dpo[k] = v
        return cls.from_config(cfg)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State, float32
    opt_state: Any
    rng: jax.Array
    hparams: HParams
    nonfinite_step: jax.Array  # first step whose loss or gradient was not finite; -1 if none
    moments: Any = None  # bco_pair's running reward moments (dpo.bco_delta="running"); None otherwise
    reference: Any = None  # TR-DPO's moving reference (reference.sync), the member's own; None otherwise


def init_state(
    params, tx: optax.GradientTransformation, hparams: HParams, seed, running_moments=False, reference=None
) -> TrainState:
    """The one way a train state is made (vmap it over ``hparams`` and ``seed`` for a population);
    ``running_moments``: carry bco_pair's running reward moments; ``reference``: TR-DPO's moving reference
    (both absent otherwise, so checkpoints keep their form)."""
    hparams = jax.tree.map(jnp.asarray, hparams)
    moments = RunningMoments.init() if running_moments else None
    rng = jax.random.PRNGKey(seed)
    if reference is not None:
        reference = jax.tree.map(jnp.copy, reference)
    return TrainState(jnp.int32(0), params, tx.init(params), rng, hparams, jnp.int32(-1), moments, reference)


def stack(trees: list):
    """K member trees -> one tree with a leading [K] axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def member(tree, k: int):
    return jax.tree.map(lambda x: x[k], tree)


def gather_members(tree_K, index_K):
    """Each member's leaves replaced by those of member ``index_K[k]`` (a gather along the member axis: PBT's
    exploit, ``dpo_jax.loop.Loop.exploit``)."""
    return jax.tree.map(lambda x: x[index_K], tree_K)
