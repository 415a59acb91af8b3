"""The true reward a run is measured by (``eval/reward``) and that ``dpo-jax rounds`` labels its samples with.

``config.reward`` names a function ``(prompt: str, completion: str) -> float``: ``"module:function"`` (an importable
module: installed, or the package of this repository) or ``"path/to/file.py:function"`` (loaded from that file, as
config files are). Nothing is downloaded and no model folder's code runs. ``""`` is the built-in task's reward when
``task="synthetic"`` and no reward otherwise. A conversational prompt reaches the function as its JSON text.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dpo_jax.config import ConfigError

BUILTIN = "dpo_jax.data.synthetic:{}_reward"  # the built-in task's rewards, by synthetic.reward
EXPECTED = "'module:function' or 'path/to/file.py:function' naming a function (prompt, completion) -> float"


def spec(cfg) -> str:
    """The reward a config measures with: ``config.reward``, or the built-in task's; "" for none."""
    if cfg.get("reward", ""):
        return cfg.reward
    return BUILTIN.format(cfg.synthetic.reward) if cfg.task == "synthetic" else ""


@functools.cache
def load(value: str) -> Callable[[str, str], float]:
    """The function ``value`` names (loaded once per process); a ``ConfigError`` naming ``config.reward`` when it
    cannot be loaded."""

    def fail(why: str):
        raise ConfigError(f"config.reward: expected {EXPECTED}; {why}, got {value!r}")

    where, sep, name = value.rpartition(":")
    if not sep or not where or not name.isidentifier():
        fail("no ':function'")
    if where.endswith(".py"):
        file = Path(where)
        if not file.is_file():
            fail(f"no file {file}")
        module_spec = importlib.util.spec_from_file_location(f"_dpo_jax_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            fail(f"{file} raised {type(e).__name__}: {e}")
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            fail(f"cannot import {where} ({e})")
    fn = getattr(module, name, None)
    if not callable(fn):
        fail(f"{where} has no function {name}")
    return fn


def scorer(value: str) -> Callable[[str, str], float]:
    """``(prompt, completion) -> float`` of the reward ``value`` names, each value checked finite (otherwise a
    ``ConfigError`` naming the reward, the prompt and the completion)."""
    fn = load(value)

    def score(prompt: str, completion: str) -> float:
        raw = fn(prompt, completion)
        try:
            r = float(raw)
        except (TypeError, ValueError):
            r = math.nan
        if not math.isfinite(r):
            raise ConfigError(
                f"config.reward: expected a finite number from {value} for prompt {prompt[:60]!r}, completion "
                f"{completion[:60]!r}; got {raw!r}"
            )
        return r

    return score


def score_all(value: str, prompts: list[str], completions: list[str]) -> np.ndarray:
    """[n] rewards of (prompt, completion) pairs under the reward ``value`` names."""
    score = scorer(value)
    return np.array([score(p, y) for p, y in zip(prompts, completions, strict=True)], np.float64)
