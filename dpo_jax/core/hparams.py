"""A member's traced hyper-parameters, each declared once: the config fields it is made from, its domain, whether
PBT may perturb it, whether it may change on resume, whether the loss takes it by name.

The declarations are the one source of the facts other parts used to keep by hand: the fields in which the
members of one vectorised program may differ (``traced_fields``), PBT's perturbable names and bounds check,
the fields a resume may change (``resume_fields``), the config's domain checks (``Domain``), and the
coefficients ``dpo_jax.core.step`` passes to ``dpo_jax.core.losses.preference_loss``. A new loss coefficient is one
declaration here (and its default in ``configs/default.py``) plus the loss that reads it.

Shape letters: T loss types. ``HParams`` is built from the declarations; every leaf of a population's has a
leading [K] axis. Building one from a config is the engine's (``dpo_jax.training.builders.hparams``): this module reads
no config.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax


@dataclasses.dataclass(frozen=True)
class Domain:
    """An interval of numbers (of integers when ``integer``); ``note`` is added to the description."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = True
    high_open: bool = True
    integer: bool = False
    note: str = ""

    def __contains__(self, x) -> bool:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            return False
        if self.integer and not isinstance(x, int):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low == -math.inf and self.high == math.inf:
            text = f"a finite {kind.split()[-1]}"
        elif self.high == math.inf:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        else:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {lo}{self.low:g}, {self.high:g}{hi}"
        return f"{text} ({self.note})" if self.note else text


@dataclasses.dataclass(frozen=True)
class HyperParameter:
    """One traced hyper-parameter. ``fields``: the config fields it is made from (one: the value is that field's,
    checked against ``domain``; several, or ``derived``: the engine computes it); ``perturbable``: PBT may
    perturb it (its bounds must lie in ``domain``); ``resume``: its fields may change on resume (named in
    ``resume.allow_changes``); ``loss_kwarg``: ``preference_loss`` takes it by this name."""

    fields: tuple[str, ...]
    domain: Domain | None = None
    perturbable: bool = False
    resume: bool = False
    loss_kwarg: bool = False
    derived: bool = False
    dtype: str = "float32"
    doc: str = ""


H = HyperParameter
POSITIVE = Domain(0.0)
FINITE = Domain()
DECLARED: dict[str, HyperParameter] = {
    "beta": H(("dpo.beta",), POSITIVE, perturbable=True, resume=True),
    "label_smoothing": H(("dpo.label_smoothing",), Domain(0.0, 0.5, low_open=False), perturbable=True, resume=True),
    "target_temperature": H(("dpo.soft_target_temperature",), POSITIVE, perturbable=True, resume=True,
                            doc="soft targets become sigmoid(logit(p) / T)"),
    "lr_scale": H(("optim.learning_rate",), POSITIVE, perturbable=True, resume=True, derived=True,
                  doc="the member's learning rate over the shared schedule's peak"),
    "loss_weights": H(("dpo.loss_type", "dpo.loss_weights"), resume=True, derived=True,
                      doc="[T] weight of each of the step's loss types (0: not in this member's mix)"),
    "f_divergence": H(("dpo.f_divergence_type",), derived=True, dtype="int32",
                      doc="index into dpo_jax.core.losses.F_DIVERGENCES"),
    "f_alpha_divergence_coef": H(("dpo.f_alpha_divergence_coef",), FINITE, loss_kwarg=True),
    "discopop_tau": H(("dpo.discopop_tau",), POSITIVE, loss_kwarg=True),
    "simpo_gamma": H(("dpo.simpo_gamma",), FINITE, loss_kwarg=True),
    "ld_alpha": H(("dpo.ld_alpha",), Domain(0.0, 1.0, False, False, note="1: plain DPO"),
                  doc="LD-DPO weight of the tokens past the shorter completion (1: plain sums)"),
    "uses_reference": H(("dpo.reference_free", "dpo.loss_type"), derived=True,
                        doc="0 for a reference-free member: its rewards are beta * log pi alone"),
    "desirable_weight": H(("dpo.desirable_weight",), Domain(0.0, low_open=False), loss_kwarg=True),  # KTO
    "undesirable_weight": H(("dpo.undesirable_weight",), Domain(0.0, low_open=False), loss_kwarg=True),
    "ref_mixup_alpha": H(("reference.ref_model_mixup_alpha",), Domain(0.0, 1.0, high_open=False),
                         doc="TR-DPO: reference <- alpha * policy + (1 - alpha) * reference ..."),
    "ref_sync_steps": H(("reference.ref_model_sync_steps",), Domain(1, low_open=False, integer=True), dtype="int32",
                        doc="... every this many steps (reference.sync)"),
    # BEMA's reference (reference.bema; dpo_jax.core.bema): TRL's BEMACallback arguments
    "bema_update_freq": H(("reference.bema_update_freq",), Domain(1, low_open=False, integer=True), dtype="int32"),
    "bema_update_after": H(("reference.bema_update_after",), Domain(0, low_open=False, integer=True), dtype="int32"),
    "bema_ema_power": H(("reference.bema_ema_power",), Domain(0.0, low_open=False)),
    "bema_bias_power": H(("reference.bema_bias_power",), Domain(0.0, low_open=False)),
    "bema_lag": H(("reference.bema_lag",), POSITIVE),
    "bema_multiplier": H(("reference.bema_multiplier",), Domain(0.0, low_open=False)),
    "bema_min_ema_multiplier": H(("reference.bema_min_ema_multiplier",), Domain(0.0, 1.0, False, False)),
    "bema_ref_update_freq": H(("reference.bema_ref_model_update_freq",), Domain(1, low_open=False, integer=True),
                              dtype="int32"),
    "bema_ref_update_after": H(("reference.bema_ref_model_update_after",), Domain(0, low_open=False, integer=True),
                               dtype="int32"),
}  # fmt: skip
SEED_FIELD = "dpo.seed"  # members differ in their seeds too (the state's rng, not a hyper-parameter)

PERTURBABLE = tuple(n for n, h in DECLARED.items() if h.perturbable)
LOSS_KWARGS = tuple(n for n, h in DECLARED.items() if h.loss_kwarg)


def traced_fields() -> tuple[str, ...]:
    """The config fields in which members of one vectorised program may differ."""
    fields = [f for h in DECLARED.values() for f in h.fields] + [SEED_FIELD]
    return tuple(dict.fromkeys(fields))


def resume_fields() -> tuple[str, ...]:
    """The hyper-parameters' fields a resume may change (with ``resume.allow_changes``)."""
    return tuple(dict.fromkeys(f for h in DECLARED.values() if h.resume for f in h.fields))


def direct_domains() -> dict[str, Domain]:
    """``{config field: domain}`` of every hyper-parameter set directly by one field (the config's checks)."""
    return {h.fields[0]: h.domain for h in DECLARED.values() if h.domain is not None and not h.derived}


def field_domain(name: str) -> tuple[Domain, str | None]:
    """The domain of hyper-parameter ``name`` and the config field that sets it directly (None: derived)."""
    h = DECLARED[name]
    return h.domain, None if h.derived else h.fields[0]


def _make_hparams():
    annotations = {name: jax.Array for name in DECLARED}
    namespace = {
        "__annotations__": annotations,
        "__doc__": "A member's traced hyper-parameters (one compile serves any values), one field per declaration "
        "in ``dpo_jax.core.hparams.DECLARED``.",
        "__module__": __name__,
        "loss_kwargs": lambda self: {n: getattr(self, n) for n in LOSS_KWARGS},
    }
    return flax.struct.dataclass(type("HParams", (), namespace))


HParams = _make_hparams()
