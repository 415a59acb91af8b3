"""BEMA: the bias-corrected exponential moving average of the policy (Block & Zhang 2025), as DPO's reference.

TRL's ``BEMACallback`` (``trl.experimental.bema_for_ref_model``, ``update_ref_model=True``) as a pure function of
the train state. After optimizer step ``t`` (1 after the first), with theta the new policy:

    t == update_after:                               theta_0 <- theta, EMA <- theta
    t > update_after, (t - update_after) % update_freq == 0:
        beta_t  = max((lag + multiplier t)^-ema_power, min_ema_multiplier)
        alpha_t = (lag + multiplier t)^-bias_power
        EMA     <- (1 - beta_t) EMA + beta_t theta
        BEMA    <- EMA + alpha_t (theta - theta_0)
    t >= ref_update_after, (t - ref_update_after) % ref_update_freq == 0:   reference <- BEMA

theta_0, EMA and BEMA start as the policy the stage starts from (the reference too: the run's initial policy).
Every coefficient is a traced hyper-parameter (``dpo_jax.core.hparams``, ``reference.bema_*``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Bema(NamedTuple):
    """The state BEMA keeps beside the policy: theta_0, the EMA and the last BEMA weights (the reference's source)."""

    theta0: Any
    ema: Any
    weights: Any

    @classmethod
    def init(cls, params) -> Bema:
        copy = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731 (three buffers, none aliasing the policy)
        return cls(copy(), copy(), copy())


def update(bema: Bema, reference, params, t, hp) -> tuple[Bema, Any]:
    """(BEMA state, reference) after optimizer step ``t`` (int32, traced) left the policy at ``params``; ``hp``:
    the member's ``HParams`` (its ``bema_*`` fields)."""
    t = jnp.asarray(t, jnp.int32)
    after, freq = hp.bema_update_after, hp.bema_update_freq
    snapshot = t == after
    due = (t > after) & ((t - after) % freq == 0)
    age = hp.bema_lag + hp.bema_multiplier * t.astype(jnp.float32)
    beta = jnp.maximum(age ** (-hp.bema_ema_power), hp.bema_min_ema_multiplier)
    alpha = age ** (-hp.bema_bias_power)
    pick = lambda cond, new, old: jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)  # noqa: E731

    ema = jax.tree.map(lambda e, p: (1.0 - beta) * e + beta * p, bema.ema, params)
    weights = jax.tree.map(lambda e, p, p0: e + alpha * (p - p0), ema, params, bema.theta0)
    new = Bema(
        theta0=pick(snapshot, params, bema.theta0),
        ema=pick(snapshot, params, pick(due, ema, bema.ema)),
        weights=pick(due, weights, bema.weights),
    )
    ref_after, ref_freq = hp.bema_ref_update_after, hp.bema_ref_update_freq
    sync = (t >= ref_after) & ((t - ref_after) % ref_freq == 0)
    return new, pick(sync, new.weights, reference)
