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
_NATIVE_SMOOTHING = frozenset({"robust", "exo_pair", "simpo", "aot", "aot_unpaired"})
# TRL's exo_pair replaces label_smoothing == 0 with this (the EXO paper needs eps in (0, 1)).
_EXO_DEFAULT_EPS = 1e-3


class Coefs(NamedTuple):
    """Scalar coefficients a pair loss may read (all traced)."""

    beta: Array
    eps: Array  # label_smoothing
    delta: Array  # bco_pair's reward offset
    tau: Array  # discopop_tau
    gamma: Array  # simpo_gamma


def _sigmoid(c, r, k):
    """DPO, Rafailov et al. 2023, arXiv:2305.18290."""
    return -jax.nn.log_sigmoid(k.beta * (c - r))


def _ipo(c, r, k):
    """IPO, Azar et al. 2023, arXiv:2310.12036, eq. 17 (beta plays tau); c, r length-averaged."""
    return (c - r - 1.0 / (2.0 * k.beta)) ** 2


def _hinge(c, r, k):
    """SLiC hinge, Zhao et al. 2023, arXiv:2305.10425."""
    return jax.nn.relu(1.0 - k.beta * (c - r))


def _robust(c, r, k):
    """Robust DPO (unbiased under flip rate eps), Chowdhury et al. 2024, arXiv:2403.00409."""
    z = k.beta * (c - r)
    return (-(1.0 - k.eps) * jax.nn.log_sigmoid(z) + k.eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * k.eps)


def _exo_pair(c, r, k):
    """EXO, Ji et al. 2024, arXiv:2402.00856, eq. 16: KL from the model's to the smoothed label distribution."""
    eps = jnp.where(k.eps == 0, _EXO_DEFAULT_EPS, k.eps)
    z = k.beta * (c - r)
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def _nca_pair(c, r, k):
    """NCA, Chen et al. 2024, arXiv:2402.05369."""
    b = k.beta
    return -jax.nn.log_sigmoid(b * c) - 0.5 * jax.nn.log_sigmoid(-b * c) - 0.5 * jax.nn.log_sigmoid(-b * r)


def _bco_pair(c, r, k):
    """BCO, Jung et al. 2024, arXiv:2404.04656 (delta: 0 as in TRL 1.16, or the running reward mean)."""
    return -jax.nn.log_sigmoid(k.beta * c - k.delta) - jax.nn.log_sigmoid(-(k.beta * r - k.delta))


def _sppo_hard(c, r, k):
    """SPPO with hard win probabilities, Wu et al. 2024, arXiv:2405.00675."""
    return (c - 0.5 / k.beta) ** 2 + (r + 0.5 / k.beta) ** 2


def _apo_zero(c, r, k):
    """APO-zero, D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7."""
    return (1.0 - jax.nn.sigmoid(k.beta * c)) + jax.nn.sigmoid(k.beta * r)


def _apo_down(c, r, k):
    """APO-down, D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8."""
    return jax.nn.sigmoid(k.beta * c) + (1.0 - jax.nn.sigmoid(k.beta * (c - r)))


def _discopop(c, r, k):
    """DiscoPOP (log-ratio modulated), Chris Lu et al. 2024, arXiv:2406.08414, eq. 5."""
    z = k.beta * (c - r)
    mix = jax.nn.sigmoid(z / k.tau)
    return -jax.nn.log_sigmoid(z) * (1.0 - mix) + jnp.exp(-z) * mix


def _smoothed_sigmoid(z, eps):
    """-(1 - eps) log s(z) - eps log s(-z): TRL's conservative form for CPO/SimPO/AOT."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _simpo(c, r, k):
    """SimPO, Meng et al. 2024, arXiv:2405.14734: c, r are length-averaged *policy* log-probs; margin gamma."""
    return _smoothed_sigmoid(k.beta * (c - r) - k.gamma, k.eps)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    x = jnp.minimum(x, -1e-30)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _orpo(c, r, k):
    """ORPO's odds-ratio term, Hong et al. 2024, arXiv:2403.07691 (eqs. 4, 7); c, r length-averaged policy
    log-probs; beta is its lambda (add ``sft`` for its NLL term)."""
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -k.beta * jax.nn.log_sigmoid(log_odds)


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
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid,  # on length-averaged scores
    "cpo": _sigmoid,  # on policy log-probs (no reference): CPO, Xu et al. 2024, arXiv:2401.08417, eq. 3
    "simpo": _simpo,
    "orpo": _orpo,
}
# Sorted-batch types (AOT, Melnyk et al. 2024, arXiv:2406.05882): the loss couples the pairs of a batch.
BATCH_LOSSES = ("aot", "aot_unpaired")
# "sft": token-mean NLL of the chosen completion (RPO / MPO auxiliary term, Pang et al. 2024, arXiv:2404.19733;
# CPO's and ORPO's NLL term).
# "kto": unpaired (KTO, Ethayarajh et al. 2024, arXiv:2402.01306): the pair is (completion, KL completion) and
# target_probs the label (1 desirable, 0 undesirable); see dpo_jax.data.kto. It is never mixed with paired types.
LOSS_TYPES = (*PAIR_LOSSES, *BATCH_LOSSES, "sft", "kto")
# What each type is a function of. Scores: f-divergence transforms of the log-ratios (TRL's ``chosen_scores``).
_ON_SCORES = frozenset({"sigmoid", "hinge", "robust", "exo_pair", "discopop"})
_ON_MEAN_SCORES = frozenset({"ipo", "sigmoid_norm"})  # scores / completion length
_ON_POLICY = frozenset({"cpo"})  # summed policy log-probs
_ON_MEAN_POLICY = frozenset({"simpo", "orpo"})  # length-averaged policy log-probs
# Types that never read the reference: a mix of only these needs no reference pass at all.
POLICY_ONLY = frozenset({"cpo", "simpo", "orpo", "sft"})
# f-divergences of f-DPO (Wang et al. 2023, arXiv:2309.16240), TRL's names and codes; they apply to these types.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


def f_divergence_scores(logratios: Array, f_divergence: Array | int | str, alpha: Array | float = 0.5) -> Array:
    """f'(pi / pi_ref) of the f-DPO paper from log-ratios, by TRL's formulas; ``f_divergence`` is a name from
    ``F_DIVERGENCES`` or its (traced) index. Each branch sees 0 where it is not selected, so no gradient leaks."""
    code = F_DIVERGENCES.index(f_divergence) if isinstance(f_divergence, str) else f_divergence
    code = jnp.asarray(code)
    x = logratios
    alpha = _float(alpha)
    near_one = jnp.abs(alpha - 1.0) < 1e-6  # the limit f'(t) -> log t: reverse KL
    a1 = jnp.where(near_one, 1.0, alpha - 1.0)

    def on(k):
        return jnp.where(code == k, x, 0.0)

    forward = 1.0 - jnp.exp(-on(1))
    js = jnp.log(2.0) + jax.nn.log_sigmoid(on(2))
    alpha_x = on(3)
    alpha_div = jnp.where(near_one, alpha_x, (jnp.exp(jnp.minimum(a1 * alpha_x, 80.0)) - 1.0) / a1)
    return jnp.select([code == 0, code == 1, code == 2], [x, forward, js], alpha_div)


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
    types = tuple(t.strip() for t in loss_type.split("+")) if isinstance(loss_type, str) else tuple(loss_type)
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


def _aot_losses(x, y, beta, eps, m):
    """AOT on a batch: -(1-eps) log s(beta d) - eps log s(-beta d), d = sort(x) - sort(y) over the valid pairs;
    the j-th smallest difference's loss goes to the pair holding the j-th smallest ``x`` (padding pairs get 0)."""
    valid = m > 0
    fill = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(x)), jnp.max(jnp.abs(y)))) + 1.0  # sorts last
    order = jnp.argsort(jnp.where(valid, x, fill))
    xs = jnp.take(jnp.where(valid, x, fill), order)
    ys = jnp.sort(jnp.where(valid, y, fill))
    per_rank = jnp.where(jnp.arange(x.shape[0]) < jnp.sum(valid), _smoothed_sigmoid(beta * (xs - ys), eps), 0.0)
    return jnp.zeros_like(x).at[order].set(per_rank)


def _kto(c, kl_ratios, pc, beta, labels, mask, w_desirable, w_undesirable):
    """KTO as TRL computes it: z0 = max(batch mean of the KL completions' log-ratios, 0), no gradient;
    desirable: w_d (1 - s(beta (c - z0))), undesirable: w_u (1 - s(beta (z0 - c)))."""
    m = jnp.ones_like(c) if mask is None else _float(mask)
    kl = jnp.maximum(jax.lax.stop_gradient(jnp.sum(kl_ratios * m) / jnp.maximum(jnp.sum(m), 1.0)), 0.0)
    good = labels > 0.5
    losses = jnp.where(good, w_desirable * (1.0 - jax.nn.sigmoid(beta * (c - kl))),
                       w_undesirable * (1.0 - jax.nn.sigmoid(beta * (kl - c))))  # fmt: skip
    rewards = jax.lax.stop_gradient(beta * c)
    md, mu = m * good, m * ~good

    def mean(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)

    z = jax.lax.stop_gradient(beta * (c - kl))
    metrics = {
        "rewards/chosen": mean(rewards, md),  # desirable examples
        "rewards/rejected": mean(rewards, mu),  # undesirable examples
        "rewards/margins": mean(rewards, md) - mean(rewards, mu),
        "rewards/accuracies": mean(((z > 0) == good).astype(c.dtype), m),  # the implied classifier is right
        "logps/chosen": mean(jax.lax.stop_gradient(pc), md),
        "logps/rejected": mean(jax.lax.stop_gradient(pc), mu),
        "preference_prob": mean(jax.nn.sigmoid(z), m),
        "grad_weight": mean(jax.nn.sigmoid(z) * jax.nn.sigmoid(-z), m),
        "kto/kl": kl,  # TRL's "kl": the reference point z0
    }
    share_d = jnp.sum(md) / jnp.maximum(jnp.sum(m), 1.0)  # what each per-label mean averages over (eval sums)
    metrics.update({f"share/{k}": share_d for k in ("rewards/chosen", "logps/chosen")})
    metrics.update({f"share/{k}": 1.0 - share_d for k in ("rewards/rejected", "logps/rejected")})
    return losses, metrics


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
    bco_delta: float | Array | str = 0.0,
    mask: Array | None = None,
    f_divergence_type: str | int | Array = "reverse_kl",
    f_alpha_divergence_coef: float | Array = 0.5,
    discopop_tau: float | Array = 0.05,
    simpo_gamma: float | Array = 0.5,
    pair_weights: Array | None = None,
    desirable_weight: float | Array = 1.0,
    undesirable_weight: float | Array = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair preference losses and TRL-named metrics.

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] summed completion log-probs under the policy (LD-DPO
        weights its tail before the sum: see ``dpo_jax.core.scoring``).
      reference_chosen_logps, reference_rejected_logps: [B] the same under the frozen reference; may be None
        with ``reference_free=True`` (the reference is then the uniform measure: its log-probs are zero) or when
        every type is in ``POLICY_ONLY``.
      loss_type: one of ``LOSS_TYPES`` or a sequence of them (a weighted sum, TRL's multi-loss).
      loss_weights: [K] weights of the types in ``loss_type`` (default: all 1).
      beta: > 0, the KL coefficient of the underlying RLHF objective (scalar or [B]); ORPO's lambda.
      label_smoothing: flip rate eps in [0, 0.5) (conservative DPO; see the module docstring).
      target_probs: [B] soft preference probabilities p in [0, 1] that the chosen response wins.
      chosen_lengths, rejected_lengths: [B] completion token counts: ``ipo`` and ``sigmoid_norm`` divide their
        scores by them, ``simpo`` and ``orpo`` the policy log-probs (TRL's conventions; without them: the sums);
        ``sft`` needs the chosen.
      reference_free: ignore the reference (log-probs of zero).
      bco_delta: ``bco_pair``'s reward offset: 0 (TRL 1.16, the default), a value, ``"batch"`` (the batch mean
        of the implicit rewards) or ``RunningMoments`` (the BCO paper and TRL < 1.0: the running mean of the
        batch means, updated with this batch's first; the caller keeps the update, ``update_running_moments``
        with ``metrics["bco/batch_reward"]``).
      mask: [B] 1 for real pairs, 0 for padding pairs: metrics, batch statistics (``sft``, ``aot``, the batch
        ``bco_delta``) use real pairs only (losses_B is still returned for every pair).
      f_divergence_type: the f-DPO divergence (a name from ``F_DIVERGENCES`` or its traced index); other than
        ``reverse_kl`` only for ``F_DIVERGENCE_LOSS_TYPES``, as in TRL.
      f_alpha_divergence_coef: alpha of ``alpha_divergence``.
      discopop_tau: DiscoPOP's temperature. simpo_gamma: SimPO's target margin gamma (TRL's ``simpo_gamma``).
      pair_weights: [B] multiply every type's per-pair loss (WPO's policy-probability weights; no gradient).
      desirable_weight, undesirable_weight: KTO's weights of desirable / undesirable examples (TRL's names).

    Returns:
      ``(losses_B, metrics)``: per-pair losses (reduce them as you like; TRL takes the mean) and scalar batch
      means ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
      ``logps/chosen``, ``logps/rejected``, ``preference_prob`` = s(beta h) and ``grad_weight`` = s(-beta h),
      the weight in the DPO gradient ``-beta s(-beta h) (grad log pi_w - grad log pi_l)``.
    """
    types, weights_K = _normalize_types(loss_type, loss_weights)
    if "kto" in types and len(types) > 1:
        raise ValueError(f"loss_type 'kto' trains on unpaired examples: it cannot be mixed with {list(types)}")
    if "kto" in types and target_probs is None:
        raise ValueError("loss_type 'kto' needs target_probs: the labels (1 desirable, 0 undesirable)")
    pc, pr, rc, rr = _logps(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                            reference_rejected_logps, types, reference_free)  # fmt: skip
    _check_hyperparameters(beta, label_smoothing, discopop_tau, f_divergence_type, types)
    beta, eps = _float(beta), _float(label_smoothing)
    if "kto" in types:
        return _kto(pc - rc, pr - rr, pc, beta, _float(target_probs), mask, desirable_weight, undesirable_weight)
    p = _targets(target_probs, types, pc)
    lc, lr = _lengths(chosen_lengths, rejected_lengths, types, pc.shape)
    m = jnp.ones_like(pc) if mask is None else _float(mask)

    def mean(x):
        return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)

    c, r = pc - rc, pr - rr  # log-ratios
    chosen_rewards, rejected_rewards = jax.lax.stop_gradient(beta * c), jax.lax.stop_gradient(beta * r)
    batch_reward = (mean(chosen_rewards) + mean(rejected_rewards)) / 2  # the mean of both sides' rewards
    delta = _bco_delta(bco_delta, batch_reward)
    coefs = Coefs(beta, eps, delta, _float(discopop_tau), _float(simpo_gamma))
    sc, sr = (f_divergence_scores(x, f_divergence_type, f_alpha_divergence_coef) for x in (c, r))
    operands = {"scores": (sc, sr), "mean_scores": (sc / lc, sr / lr), "policy": (pc, pr),
                "mean_policy": (pc / lc, pr / lr), "ratios": (c, r)}  # fmt: skip
    losses_B = jnp.zeros_like(pc)
    for k, t in enumerate(types):
        losses_B = losses_B + weights_K[k] * _type_losses(t, operands, p, eps, coefs, pc, pr, rc, rr, lc, m)
    if pair_weights is not None:
        losses_B = losses_B * jax.lax.stop_gradient(_float(pair_weights))
    z = jax.lax.stop_gradient(beta * (c - r))
    metrics = {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(m.dtype)),
        # pairs whose implicit rewards tie (|h| < 1e-3 nats): all of them at the reference itself, where
        # accuracy (chosen strictly above rejected, as TRL counts it) is 0
        "rewards/ties": mean((jnp.abs(jax.lax.stop_gradient(c - r)) < 1e-3).astype(m.dtype)),
        "logps/chosen": mean(jax.lax.stop_gradient(pc)),
        "logps/rejected": mean(jax.lax.stop_gradient(pr)),
        "preference_prob": mean(jax.nn.sigmoid(z)),
        "grad_weight": mean(jax.nn.sigmoid(-z)),
        # log pi - log pi_ref per completion token: where each side's likelihood went (chosen < 0 while the
        # margin rises is DPO's known failure mode; see dpo_jax.training.evaluate.falling_chosen)
        "logratio/chosen_per_token": mean(jax.lax.stop_gradient(c / lc)),
        "logratio/rejected_per_token": mean(jax.lax.stop_gradient(r / lr)),
    }
    if "bco_pair" in types:
        metrics["bco/batch_reward"] = batch_reward  # what a running mean is updated with
        metrics["bco/delta"] = delta
    return losses_B, metrics


def _logps(pc, pr, rc, rr, types, reference_free: bool):
    """The four [B] log-prob sums as float arrays, checked; a reference of zeros when there is none."""
    pc, pr = _float(pc), _float(pr)
    if pc.ndim != 1 or pr.shape != pc.shape:
        raise ValueError(
            f"policy_chosen_logps and policy_rejected_logps must both have shape [B]; got {pc.shape} and {pr.shape}"
        )
    missing = rc is None or rr is None
    if reference_free or (missing and set(types) <= POLICY_ONLY):  # metrics: rewards are beta * policy log-probs
        return pc, pr, jnp.zeros_like(pc), jnp.zeros_like(pc)
    if missing:
        raise ValueError("reference_chosen_logps / reference_rejected_logps are required unless reference_free")
    rc, rr = _float(rc), _float(rr)
    if rc.shape != pc.shape or rr.shape != pc.shape:
        raise ValueError(f"reference log-probs must have shape {pc.shape}; got {rc.shape} and {rr.shape}")
    return pc, pr, rc, rr


def _check_hyperparameters(beta, label_smoothing, discopop_tau, f_divergence_type, types) -> None:
    _check_range("beta", beta, 0.0, np.inf, lo_open=True, hi_open=True)
    _check_range("label_smoothing", label_smoothing, 0.0, 0.5, hi_open=True)
    _check_range("discopop_tau", discopop_tau, 0.0, np.inf, lo_open=True, hi_open=True)
    if isinstance(f_divergence_type, str):
        if f_divergence_type not in F_DIVERGENCES:
            names = ", ".join(F_DIVERGENCES)
            raise ValueError(f"f_divergence_type: expected one of {names}; got {f_divergence_type!r}")
        if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(
                f"f_divergence_type {f_divergence_type!r} applies to loss types {sorted(F_DIVERGENCE_LOSS_TYPES)} "
                f"only; got {list(types)}"
            )


def _targets(target_probs, types, pc) -> Array:
    """[B] soft targets (hard labels: 1), shaped like ``pc``."""
    if target_probs is None:
        return jnp.ones_like(pc)
    if set(types) & set(BATCH_LOSSES):
        raise ValueError("aot / aot_unpaired sort the batch: per-pair target_probs have no pair to apply to")
    _check_range("target_probs", target_probs, 0.0, 1.0)
    return jnp.broadcast_to(_float(target_probs), pc.shape)


def _lengths(chosen_lengths, rejected_lengths, types, shape) -> tuple[Array | float, Array | float]:
    """(chosen, rejected) completion token counts as [B] arrays; 1.0 where not given (then sums are used)."""
    lengths = {}
    for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if value is not None:
            _check_range(name, value, 0.0, np.inf, lo_open=True, hi_open=True)
            lengths[name] = jnp.broadcast_to(_float(value), shape)
    if len(lengths) == 1 and set(types) & (_ON_MEAN_SCORES | _ON_MEAN_POLICY):
        raise ValueError("length-averaging loss types need both chosen_lengths and rejected_lengths; got one")
    if "sft" in types and "chosen_lengths" not in lengths:
        raise ValueError("loss_type 'sft' needs chosen_lengths (completion token counts) for its token mean")
    return lengths.get("chosen_lengths", 1.0), lengths.get("rejected_lengths", 1.0)


def _bco_delta(bco_delta, batch_reward) -> Array:
    """``bco_pair``'s reward offset (see ``preference_loss``)."""
    if isinstance(bco_delta, RunningMoments):  # TRL < 1.0: update with this batch's mean, then use the mean
        return update_running_moments(bco_delta, batch_reward).mean
    if isinstance(bco_delta, str):
        if bco_delta != "batch":
            raise ValueError(f"bco_delta: expected a number, 'batch' or RunningMoments; got {bco_delta!r}")
        return batch_reward
    return jax.lax.stop_gradient(_float(bco_delta))


def _operands(t: str) -> str:
    """What loss type ``t`` is a function of (TRL's conventions)."""
    if t in _ON_SCORES:
        return "scores"
    if t in _ON_MEAN_SCORES:
        return "mean_scores"
    if t in _ON_POLICY:
        return "policy"
    if t in _ON_MEAN_POLICY:
        return "mean_policy"
    return "ratios"


def _type_losses(t: str, operands: dict, p, eps, coefs, pc, pr, rc, rr, lc, m) -> Array:
    """[B] losses of loss type ``t`` at soft targets ``p`` (label smoothing ``eps`` flips them, but for types
    that smooth natively)."""
    if t == "sft":  # TRL's nll_loss: NLL pooled over all chosen tokens of the batch, the same value for every pair
        tokens = jnp.maximum(jnp.sum(lc * m), 1.0)
        return jnp.broadcast_to(-jnp.sum(pc * m) / tokens, pc.shape)
    if t == "aot":
        return _aot_losses(pc - pr, rc - rr, coefs.beta, eps, m)
    if t == "aot_unpaired":
        return _aot_losses(pc - rc, pr - rr, coefs.beta, eps, m)
    fn, (x, y) = PAIR_LOSSES[t], operands[_operands(t)]
    q = p if t in _NATIVE_SMOOTHING else (1.0 - eps) * p + eps * (1.0 - p)
    won, lost = fn(x, y, coefs), fn(y, x, coefs)
    # hard labels pick one side exactly (0 * inf would make an overflowing loss nan instead of inf)
    return jnp.where(q == 1, won, jnp.where(q == 0, lost, q * won + (1.0 - q) * lost))


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
