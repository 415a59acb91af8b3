"""The true reward a run is measured by (``eval/reward``) and that ``dpo-jax rounds`` labels its samples with.

``config.reward`` names a function ``(prompt: str, completion: str) -> float``: ``"module:function"`` (an importable
module: installed, or the package of this repository) or ``"path/to/file.py:function"`` (loaded from that file, as
config files are); or a local reward model folder (``*ForSequenceClassification`` of a family we load, scored in
JAX: ``dpo_jax.data.reward_model``). Nothing is downloaded and no model folder's code runs. ``""`` is the built-in
task's reward when ``task="synthetic"`` and no reward otherwise. A conversational prompt reaches the function as
its JSON text.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dpo_jax.data import reward_model
from dpo_jax.errors import ConfigError, UserError
from dpo_jax.infra import signals

BUILTIN = "dpo_jax.data.synthetic:{}_reward"  # the built-in task's rewards, by synthetic.reward
EXPECTED = (
    "'module:function' or 'path/to/file.py:function' naming a function (prompt, completion) -> float, or a "
    "local reward model folder"
)


def spec(cfg) -> str:
    """The reward a config measures with: ``config.reward``, or the built-in task's; "" for none."""
    if cfg.get("reward", ""):
        return cfg.reward
    return BUILTIN.format(cfg.synthetic.reward) if cfg.task == "synthetic" else ""


def check(value: str) -> None:
    """``config.reward`` as validation sees it: a function that loads, or a reward model folder we load (checked
    without reading its weights); a ``ConfigError`` naming ``config.reward`` otherwise."""
    if reward_model.is_reward_model(value):
        try:
            reward_model.check(value)
        except UserError as e:
            raise ConfigError(f"config.reward: expected {EXPECTED}; {e}, got {value!r}") from None
        return
    load(value)


@functools.cache
def load(value: str, *, dtype: str = "float32", mesh=None) -> Callable[[str, str], float]:
    """The function ``value`` names, or its reward model in ``dtype`` over ``mesh`` (loaded once per process); a
    ``ConfigError`` naming ``config.reward`` when it cannot be loaded."""

    def fail(why: str):
        raise ConfigError(f"config.reward: expected {EXPECTED}; {why}, got {value!r}")

    if reward_model.is_reward_model(value):
        try:
            return reward_model.load(value, dtype=dtype, mesh=mesh)
        except UserError as e:
            fail(str(e))

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


class RewardError(ConfigError):
    """The reward function raised, returned something that is not a finite number, or did not return in time."""


def _number(raw) -> float:
    """A reward value as a float: an int, float or NumPy number; never a string or a bool."""
    if isinstance(raw, bool | np.bool_) or not isinstance(raw, int | float | np.integer | np.floating):
        return math.nan
    return float(raw)


class Scorer:
    """Scores (prompt, completion) pairs with the function ``config.reward`` names. The calls run in a worker
    thread, so a stop signal is honoured within ``POLL_S`` (``signals.Preempted``) however long a call takes, and
    a call that runs past ``timeout_s`` ends the run with one line naming it; the worker is abandoned (a daemon
    thread: it cannot keep the process alive)."""

    POLL_S = 0.1

    def __init__(self, value: str, timeout_s: float = 60.0, *, dtype: str = "float32", mesh=None):
        self.value, self.fn, self.timeout_s = value, load(value, dtype=dtype, mesh=mesh), timeout_s

    def _where(self, prompt: str, completion: str) -> str:
        return f"prompt {prompt[:60]!r}, completion {completion[:60]!r}"

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """[n] rewards; raises ``RewardError`` (one line: the reward, the row, what went wrong)."""
        if isinstance(self.fn, reward_model.RewardModel):  # batched in JAX, here: the stop signal checked per batch
            return self.fn(prompts, completions)
        n = len(prompts)
        out = np.full(n, np.nan, np.float64)
        progress = {"done": 0, "error": None, "raw": None}
        finished = threading.Event()

        def work():
            for i, (p, y) in enumerate(zip(prompts, completions, strict=True)):
                try:
                    raw = self.fn(p, y)
                except Exception as e:
                    progress["error"] = e
                    break
                out[i] = _number(raw)
                if not math.isfinite(out[i]):
                    progress["raw"] = raw
                    break
                progress["done"] = i + 1
            finished.set()

        threading.Thread(target=work, name="dpo-jax-reward", daemon=True).start()
        done, since = 0, time.monotonic()
        while not finished.wait(self.POLL_S):
            signals.check(f"while {self.value} scored samples")
            if progress["done"] != done:
                done, since = progress["done"], time.monotonic()
            elif time.monotonic() - since > self.timeout_s:
                raise RewardError(
                    f"config.reward: {self.value} took longer than reward_timeout_s={self.timeout_s:g} s on "
                    f"{self._where(prompts[done], completions[done])}; expected a function that returns"
                )
        i = progress["done"]
        if progress["error"] is not None:
            e = progress["error"]
            raise RewardError(
                f"config.reward: {self.value} raised {type(e).__name__}: {str(e).strip()[:200]} on "
                f"{self._where(prompts[i], completions[i])}"
            )
        if i < n:
            raise RewardError(
                f"config.reward: expected a finite number (int or float) from {self.value} for "
                f"{self._where(prompts[i], completions[i])}; got {progress['raw']!r}"
            )
        return out


def scorer(value: str, timeout_s: float = 60.0, *, dtype: str = "float32", mesh=None) -> Scorer:
    """The batch scorer of the reward ``value`` names (``Scorer``; a reward model in ``dtype`` over ``mesh``)."""
    return Scorer(value, timeout_s, dtype=dtype, mesh=mesh)


def score_all(value: str, prompts: list[str], completions: list[str], timeout_s: float = 60.0, *,
              dtype: str = "float32") -> np.ndarray:  # fmt: skip
    """[n] rewards of (prompt, completion) pairs under the reward ``value`` names."""
    return Scorer(value, timeout_s, dtype=dtype)(prompts, completions)
