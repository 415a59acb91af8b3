"""The train state of a population of K >= 1 members (their traced hyper-parameters: ``dpo_jax.core.hparams``).

Shape letters: K members, T loss types. A plain run is K = 1; a vectorised sweep K > 1. Every leaf of a
population's state has a leading [K] axis; ``member(state, k)`` is an ordinary single-run state (what a member's
checkpoints hold), ``stack`` builds the population back.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax.core.bema import Bema
from dpo_jax.core.hparams import HParams
from dpo_jax.core.losses import RunningMoments


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State, float32
    opt_state: Any
    rng: jax.Array
    hparams: HParams
    nonfinite_step: jax.Array  # first step whose loss or gradient was not finite; -1 if none
    moments: Any = None  # bco_pair's running reward moments (dpo.bco_delta="running"); None otherwise
    reference: Any = None  # a moving reference (TR-DPO's reference.sync, BEMA's), the member's own; None otherwise
    bema: Any = None  # BEMA's theta_0, EMA and weights (dpo_jax.core.bema.Bema; reference.bema); None otherwise


def init_state(
    params,
    tx: optax.GradientTransformation,
    hparams: HParams,
    seed,
    running_moments=False,
    reference=None,
    bema=False,
) -> TrainState:
    """The one way a train state is made (vmap it over ``hparams`` and ``seed`` for a population);
    ``running_moments``: carry bco_pair's running reward moments; ``reference``: a moving reference's start;
    ``bema``: carry BEMA's buffers, from ``params`` (all absent otherwise, so checkpoints keep their form)."""
    hparams = jax.tree.map(jnp.asarray, hparams)
    moments = RunningMoments.init() if running_moments else None
    rng = jax.random.PRNGKey(seed)
    if reference is not None:
        reference = jax.tree.map(jnp.copy, reference)
    buffers = Bema.init(params) if bema else None
    return TrainState(jnp.int32(0), params, tx.init(params), rng, hparams, jnp.int32(-1), moments, reference, buffers)


def stack(trees: list):
    """K member trees -> one tree with a leading [K] axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def member(tree, k: int):
    return jax.tree.map(lambda x: x[k], tree)


def gather_members(tree_K, index_K):
    """Each member's leaves replaced by those of member ``index_K[k]`` (a gather along the member axis: PBT's
    exploit, ``dpo_jax.training.loop.Loop.exploit``)."""
    return jax.tree.map(lambda x: x[index_K], tree_K)
