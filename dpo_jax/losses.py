"""Pure preference losses and their metrics.

Shape letters: B = preference pairs in the batch, K = loss types in a weighted mix.

Every loss is a function of per-sequence log-probabilities (no model calls), so it is jit-, grad- and
vmap-friendly. ``beta``, ``label_smoothing``, ``target_probs`` and ``loss_weights`` are ordinary traced inputs:
one compiled step serves a whole sweep and ``jax.vmap`` over beta works. Only the loss *types* are static.

Notation: ``c = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``r = log pi(y_l|x) - log pi_ref(y_l|x)`` are the chosen
and rejected log-ratios, ``h = c - r`` the reference-relative log-odds margin and ``beta * c``, ``beta * r`` the
implicit rewards of DPO.

Label softness. Every pairwise loss ``L(c, r)`` (which treats the chosen response as the winner) gets a soft
label ``q`` in [0, 1] as the expected loss under the label distribution::

    L_q(c, r) = q * L(c, r) + (1 - q) * L(r, c)

For ``sigmoid`` this is exactly the soft Bradley-Terry cross-entropy ``-q log s(beta h) - (1-q) log s(-beta h)``,
minimised at ``h = logit(q) / beta``. ``q = (1 - eps) * p + eps * (1 - p)`` combines the per-pair target ``p``
(``target_probs``, default 1) with the global flip rate ``eps`` (``label_smoothing``); at ``p = 1`` it is
conservative DPO, TRL's ``label_smoothing``. ``robust`` and ``exo_pair`` use ``eps`` natively (as TRL does), so
for them ``q = p``. TRL ignores ``label_smoothing`` (with a warning) for the other types; here it is the same
expected loss under flipped labels, which equals TRL's numbers at ``eps = 0``. For ``ipo`` the soft optimum is
``h = (q - 1/2) / beta``, the general IPO target of Azar et al. ``sft`` has no label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Loss types whose native formula already consumes label_smoothing (TRL's convention).
_NATIVE_SMOOTHING = frozenset({"robust", "exo_pair"})
# TRL's exo_pair replaces label_smoothing == 0 with this (the EXO paper needs eps in (0, 1)).
_EXO_DEFAULT_EPS = 1e-3


def _sigmoid(c, r, beta, eps, delta):
    """DPO, Rafailov et al. 2023, arXiv:2305.18290."""
    return -jax.nn.log_sigmoid(beta * (c - r))


def _ipo(c, r, beta, eps, delta):
    """IPO, Azar et al. 2023, arXiv:2310.12036, eq. 17 (beta plays tau)."""
    return (c - r - 1.0 / (2.0 * beta)) ** 2


def _hinge(c, r, beta, eps, delta):
    """SLiC hinge, Zhao et al. 2023, arXiv:2305.10425."""
    return jax.nn.relu(1.0 - beta * (c - r))


def _robust(c, r, beta, eps, delta):
    """Robust DPO (unbiased under flip rate eps), Chowdhury et al. 2024, arXiv:2403.00409."""
    z = beta * (c - r)
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _exo_pair(c, r, beta, eps, delta):
    """EXO, Ji et al. 2024, arXiv:2402.00856, eq. 16: KL from the model's to the smoothed label distribution."""
    eps = jnp.where(eps == 0, _EXO_DEFAULT_EPS, eps)
    z = beta * (c - r)
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def _nca_pair(c, r, beta, eps, delta):
    """NCA, Chen et al. 2024, arXiv:2402.05369."""
    return -jax.nn.log_sigmoid(beta * c) - 0.5 * jax.nn.log_sigmoid(-beta * c) - 0.5 * jax.nn.log_sigmoid(-beta * r)


def _bco_pair(c, r, beta, eps, delta):
    """BCO, Jung et al. 2024, arXiv:2404.04656 (delta: running mean of the implicit rewards)."""
    return -jax.nn.log_sigmoid(beta * c - delta) - jax.nn.log_sigmoid(-(beta * r - delta))


def _sppo_hard(c, r, beta, eps, delta):
    """SPPO with hard win probabilities, Wu et al. 2024, arXiv:2405.00675."""
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def _apo_zero(c, r, beta, eps, delta):
    """APO-zero, D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7."""
    return (1.0 - jax.nn.sigmoid(beta * c)) + jax.nn.sigmoid(beta * r)


def _apo_down(c, r, beta, eps, delta):
    """APO-down, D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8."""
    return jax.nn.sigmoid(beta * c) + (1.0 - jax.nn.sigmoid(beta * (c - r)))


PAIR_LOSSES = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
}
# "sft": token-mean NLL of the chosen completion (RPO / MPO auxiliary term, Pang et al. 2024, arXiv:2404.19733).
LOSS_TYPES = (*PAIR_LOSSES, "sft")


class RunningMoments(NamedTuple):
    """Running mean/variance of the implicit rewards; ``bco_pair``'s delta is ``mean``."""

    mean: Array
    var: Array
    count: Array

    @classmethod
    def init(cls) -> RunningMoments:
        # TRL starts from mean 0, var 1 and a vanishing count, so the first update returns the batch mean.
        return cls(jnp.float32(0.0), jnp.float32(1.0), jnp.float32(1e-24))


def update_running_moments(state: RunningMoments, xs: Array) -> RunningMoments:
    """Chan et al. parallel update of the running moments with the batch ``xs`` (any shape)."""
    xs = jax.lax.stop_gradient(jnp.asarray(xs, jnp.float32)).ravel()
    n = jnp.float32(xs.size)
    xs_mean, xs_var = jnp.mean(xs), jnp.var(xs)
    delta = xs_mean - state.mean
    total = state.count + n
    m2 = state.var * state.count + delta**2 * state.count * n / total + xs_var * n
    return RunningMoments(state.mean + delta * n / total, m2 / total, total)


def _float(x) -> Array:
    """``x`` as a float array of at least float32 (float64 stays float64 under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _concrete(x) -> np.ndarray | None:
    """The value of ``x`` as NumPy when it is known at trace time, else None (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_range(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False):
    """Raise a ValueError naming ``name`` if a concrete ``value`` leaves [lo, hi] (open ends as asked)."""
    v = _concrete(value)
    if v is None:
        return  # traced: the config / data layer validates before compiling
    v = v.astype(np.float64)
    bad = ~np.isfinite(v) | (v <= lo if lo_open else v < lo) | (v >= hi if hi_open else v > hi)
    if np.any(bad):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        first = v.ravel()[np.flatnonzero(bad.ravel())[0]]
        raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{rb}; got {first!r}")


def _normalize_types(loss_type: str | Sequence[str], loss_weights) -> tuple[tuple[str, ...], Array]:
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type: unknown loss type {t!r}; expected one of {', '.join(LOSS_TYPES)}")
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type: each loss type may appear once, got {list(types)}")
    if loss_weights is None:
        return types, jnp.ones((len(types),))
    weights_K = _float(loss_weights)
    if weights_K.shape != (len(types),):
        raise ValueError(
            f"loss_weights: expected {len(types)} weights for loss types {list(types)}, got shape {weights_K.shape}"
        )
    return types, weights_K


def preference_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array | None = None,
    reference_rejected_logps: Array | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | Array | None = None,
    beta: float | Array = 0.1,
    label_smoothing: float | Array = 0.0,
    target_probs: Array | None = None,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reference_free: bool = False,
    bco_delta: float | Array | None = None,
    mask: Array | None = None,
    length_normalize: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair preference losses and TRL-named metrics.

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] summed completion log-probs under the policy.
      reference_chosen_logps, reference_rejected_logps: [B] the same under the frozen reference; may be None
        only with ``reference_free=True`` (the reference is then the uniform measure: its log-probs are zero).
      loss_type: one of ``LOSS_TYPES`` or a sequence of them (a weighted sum, TRL's multi-loss).
      loss_weights: [K] weights of the types in ``loss_type`` (default: all 1).
      beta: > 0, the KL coefficient of the underlying RLHF objective (scalar or [B]).
      label_smoothing: flip rate eps in [0, 0.5) (conservative DPO; see the module docstring).
      target_probs: [B] soft preference probabilities p in [0, 1] that the chosen response wins.
      chosen_lengths, rejected_lengths: [B] completion token counts. When ``"ipo"`` is among the types, all
        log-probs are divided by them first (TRL's convention); ``"sft"`` needs ``chosen_lengths``.
      reference_free: ignore the reference (log-probs of zero).
      bco_delta: the running reward mean for ``bco_pair`` (see ``RunningMoments``); default: the batch mean of
        the implicit rewards, i.e. TRL's value at its first step.
      mask: [B] 1 for real pairs, 0 for padding pairs: metrics, the batch statistics of ``sft`` and the
        default ``bco_delta`` use real pairs only (losses_B is still returned for every pair).
      length_normalize: traced 0/1 in place of "``ipo`` is among the types" (a population computes the union of
        its members' types, each member weighting its own; its length averaging must follow its own mix).

    Returns:
      ``(losses_B, metrics)``: per-pair losses (reduce them as you like; TRL takes the mean) and scalar batch
      means ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
      ``logps/chosen``, ``logps/rejected``, ``preference_prob`` = s(beta h) and ``grad_weight`` = s(-beta h),
      the weight in the DPO gradient ``-beta s(-beta h) (grad log pi_w - grad log pi_l)``.
    """
    types, weights_K = _normalize_types(loss_type, loss_weights)
    pc = _float(policy_chosen_logps)
    pr = _float(policy_rejected_logps)
    if pc.ndim != 1 or pr.shape != pc.shape:
        raise ValueError(
            f"policy_chosen_logps and policy_rejected_logps must both have shape [B]; got {pc.shape} and {pr.shape}"
        )
    if reference_free:
        rc = rr = jnp.zeros_like(pc)
    else:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError("reference_chosen_logps / reference_rejected_logps are required unless reference_free")
        rc = _float(reference_chosen_logps)
        rr = _float(reference_rejected_logps)
        if rc.shape != pc.shape or rr.shape != pc.shape:
            raise ValueError(f"reference log-probs must have shape {pc.shape}; got {rc.shape} and {rr.shape}")

    _check_range("beta", beta, 0.0, np.inf, lo_open=True, hi_open=True)
    _check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    beta = _float(beta)
    eps = _float(label_smoothing)
    if target_probs is None:
        p = jnp.ones_like(pc)
    else:
        _check_range("target_probs", target_probs, 0.0, 1.0)
        p = jnp.broadcast_to(_float(target_probs), pc.shape)

    lengths = {}
    for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if value is not None:
            _check_range(name, value, 0.0, np.inf, lo_open=True, hi_open=True)
            lengths[name] = jnp.broadcast_to(_float(value), pc.shape)
    normalize = "ipo" in types if length_normalize is None else True
    if normalize and len(lengths) == 1:
        raise ValueError("loss_type 'ipo' length-averages with both chosen_lengths and rejected_lengths; got one")
    if "sft" in types and "chosen_lengths" not in lengths:
        raise ValueError("loss_type 'sft' needs chosen_lengths (completion token counts) for its token mean")

    m = jnp.ones_like(pc) if mask is None else _float(mask)

    def mean(x):
        return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)

    sft_nll_B = None
    if "sft" in types:
        # TRL's nll_loss: NLL pooled over all chosen tokens of the batch, the same value for every pair. Uses the
        # summed (not IPO length-averaged) log-probs.
        tokens = jnp.maximum(jnp.sum(lengths["chosen_lengths"] * m), 1.0)
        sft_nll_B = jnp.broadcast_to(-jnp.sum(pc * m) / tokens, pc.shape)
    if normalize and len(lengths) == 2:
        lc, lr = lengths["chosen_lengths"], lengths["rejected_lengths"]
        if length_normalize is not None:  # traced: 1 divides, 0 keeps the sums
            f = _float(length_normalize)
            lc, lr = f * lc + (1.0 - f), f * lr + (1.0 - f)
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr

    c, r = pc - rc, pr - rr
    chosen_rewards = jax.lax.stop_gradient(beta * c)
    rejected_rewards = jax.lax.stop_gradient(beta * r)
    if bco_delta is None:
        delta = (mean(chosen_rewards) + mean(rejected_rewards)) / 2
    else:
        delta = jax.lax.stop_gradient(_float(bco_delta))

    q_flip = (1.0 - eps) * p + eps * (1.0 - p)
    losses_B = jnp.zeros_like(pc)
    for k, t in enumerate(types):
        if t == "sft":
            per_type = sft_nll_B
        else:
            fn = PAIR_LOSSES[t]
            q = p if t in _NATIVE_SMOOTHING else q_flip
            per_type = q * fn(c, r, beta, eps, delta) + (1.0 - q) * fn(r, c, beta, eps, delta)
        losses_B = losses_B + weights_K[k] * per_type

    z = jax.lax.stop_gradient(beta * (c - r))
    metrics = {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(m.dtype)),
        "logps/chosen": mean(jax.lax.stop_gradient(pc)),
        "logps/rejected": mean(jax.lax.stop_gradient(pr)),
        "preference_prob": mean(jax.nn.sigmoid(z)),
        "grad_weight": mean(jax.nn.sigmoid(-z)),
    }
    return losses_B, metrics


def optimal_policy(ref_logps, rewards, beta):
    """The KL-regularised RLHF optimum over a finite set of completions: pi* = softmax(log pi_ref + r / beta),
    i.e. pi* is proportional to pi_ref exp(r / beta) (last axis)."""
    return jax.nn.softmax(_float(ref_logps) + _float(rewards) / beta, axis=-1)


def temper_targets(target_probs, temperature):
    """Soft targets at a temperature: sigmoid(logit(p) / T). T = 1 keeps p, T -> 0 hardens it towards the
    label, T -> inf flattens it towards 1/2; p = 0 and p = 1 stay hard."""
    p = _float(target_probs)
    return jax.nn.sigmoid((jnp.log(p) - jnp.log1p(-p)) / temperature)


def optimal_soft_margin(target_probs, beta):
    """The margin h = logit(p) / beta that minimises the soft-target sigmoid loss (finite for 0 < p < 1)."""
    p = _float(target_probs)
    return (jnp.log(p) - jnp.log1p(-p)) / beta
