"""Stopping a run cleanly: SIGTERM (a pre-empted VM) and the first Ctrl-C ask the run to stop at the next safe
point (after the current step, between eval or reference batches) with its state saved; a second Ctrl-C aborts.

Loops call ``check(where)``, which raises ``Preempted``; the trainer saves the step before re-raising, and
``dpo-jax`` exits with 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import signal
import threading

_state = {"flag": False, "signum": signal.SIGTERM}


class Preempted(Exception):
    """A stop signal arrived; whatever needed saving was saved. Rerunning the same command continues."""

    def __init__(self, message: str):
        super().__init__(message)
        self.exit_code = 128 + _state["signum"]


def _on_signal(signum, frame):
    if signum == signal.SIGINT and _state["flag"]:
        raise KeyboardInterrupt
    _state.update(flag=True, signum=signum)
    if signum == signal.SIGINT:
        print(
            "\n[dpo-jax] Ctrl-C: saving and stopping at the next step (Ctrl-C again aborts without saving)", flush=True
        )


def requested() -> bool:
    return _state["flag"]


def name() -> str:
    return "Ctrl-C" if _state["signum"] == signal.SIGINT else "SIGTERM"


def check(where: str) -> None:
    """Raise ``Preempted`` if a stop was requested; ``where`` completes '<signal> <where>'."""
    if _state["flag"]:
        raise Preempted(f"{name()} {where}; rerun the same command to continue")


@contextlib.contextmanager
def stop_signals():
    """Install the handlers for the duration of a run (main thread only) and restore the old ones after."""
    _state.update(flag=False, signum=signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
