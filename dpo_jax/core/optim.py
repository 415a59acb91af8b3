"""The optimizer: AdamW with warmup and a cosine or linear decay, global-norm clipping as one scalar factor, and
weight decay on matrices only, built from an optimizer section (``optim`` or ``sft``) given as a mapping."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax


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


def current_lr(opt_state) -> jax.Array:
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        if hasattr(s, "hyperparams"):
            return s.hyperparams["learning_rate"]
    return jnp.float32(0.0)
