"""Errors a user can cause and fix. The CLI prints their message as one line and exits with status 2.

Messages read ``<what> in <file/field>: <expected>``; the traceback is shown only with ``--verbose``.
"""

from __future__ import annotations

import sys

import jax


class UserError(Exception):
    """Bad input, a bad config or a workdir problem: the message alone tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the field (``config.section.field``)."""


class ModelError(UserError, ValueError):
    """A local Hugging Face folder that cannot be loaded; the message names the file and the tensor or field."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config names does not exist."""


class WorkdirError(UserError):
    """The workdir is locked by another run, not writable, or its checkpoints do not match the config."""


class DiskFullError(WorkdirError):
    """Not enough free space to write a checkpoint or an output; the message names the path and the bytes."""


class NonFiniteLoss(RuntimeError):
    """The loss, a gradient or the parameters became NaN/Inf; the message names the step and the last good
    checkpoint (exit status 1: a training failure, not an input error)."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span hundreds of lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


class Notes:
    """Warnings about input that is accepted but probably wrong: each printed once (process 0) and kept for the
    run's summary."""

    def __init__(self):
        self.items: list[str] = []

    def warn(self, message: str) -> None:
        if message in self.items:
            return
        self.items.append(message)
        if jax.process_index() == 0:
            print(f"dpo-jax: warning: {message}", file=sys.stderr, flush=True)
