"""The domains of the hyper-parameters a population perturbs: one declaration, read by the config's validation
(the field set directly) and by PBT's bounds check (the values a perturbation may reach)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Domain:
    """An interval of numbers; ``field``: the config field that sets the hyper-parameter (None: derived)."""

    low: float
    high: float = math.inf
    low_open: bool = True
    high_open: bool = True
    field: str | None = None

    def __contains__(self, x) -> bool:
        if not isinstance(x, int | float) or not math.isfinite(x):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


DOMAINS = {
    "beta": Domain(0.0, field="dpo.beta"),
    "lr_scale": Domain(0.0),  # the member's learning rate over the schedule's peak (optim.learning_rate > 0)
    "label_smoothing": Domain(0.0, 0.5, low_open=False, field="dpo.label_smoothing"),
    "target_temperature": Domain(0.0, field="dpo.soft_target_temperature"),
}
