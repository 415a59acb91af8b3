"""A local reward model folder (``*ForSequenceClassification``) as ``config.reward``: (prompt, completion) pairs
scored in JAX in batches, each pair rendered with the model's own chat template when it has one (a user turn, or a
conversational prompt's turns, then the completion as the assistant's), else prompt + completion as text."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np

from dpo_jax.errors import ConfigError
from dpo_jax.infra import hf, signals
from dpo_jax.models import reward


def is_reward_model(value: str) -> bool:
    """Whether ``config.reward`` names a folder with a ``config.json`` (a reward model, not a function)."""
    return bool(value) and (Path(value) / "config.json").is_file()


def _messages(prompt: str) -> list[dict]:
    """A conversational prompt's turns (its JSON), else one user turn."""
    if prompt.startswith("["):
        try:
            turns = json.loads(prompt)
        except ValueError:
            turns = None
        if isinstance(turns, list) and all(isinstance(t, dict) and "role" in t for t in turns):
            return turns
    return [{"role": "user", "content": prompt}]


class RewardModel:
    """(prompts, completions) -> [n] scores (the first label's) of a local reward model folder."""

    def __init__(self, path: str, batch_size: int = 16):
        self.path, self.batch_size = path, batch_size
        self.decoder, self.score_LxD, self.tokenizer = hf.load_reward_model(path)
        if self.tokenizer is None:
            raise ConfigError(f"config.reward: expected a reward model folder with tokenizer.json, got {path!r}")
        self.pad_id = int(self.decoder.config.pad_token_id)
        self._scores = jax.jit(reward.sequence_scores, static_argnums=3)

    def token_ids(self, prompt: str, completion: str) -> list[int]:
        tok = self.tokenizer
        if tok.chat_template is None:
            return tok.encode(prompt + completion, add_special_tokens=True)
        text = tok.apply_chat_template([*_messages(prompt), {"role": "assistant", "content": completion}])
        return tok.encode(text, add_special_tokens=False)

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        rows = [self.token_ids(p, y) for p, y in zip(prompts, completions, strict=True)]
        out = np.full(len(rows), np.nan, np.float64)
        order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths share a batch and its shape
        for start in range(0, len(rows), self.batch_size):
            signals.check(f"while {self.path} scored samples")
            index = order[start : start + self.batch_size]
            width = max(16, 1 << (max(len(rows[i]) for i in index) - 1).bit_length())  # a few shapes, few compiles
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            for j, i in enumerate(index):
                ids[j, : len(rows[i])] = rows[i]
            out[index] = np.asarray(self._scores(self.decoder, self.score_LxD, ids, self.pad_id))[: len(index), 0]
        return out


@functools.cache
def load(path: str) -> RewardModel:
    """The reward model in ``path`` (loaded once per process)."""
    return RewardModel(path)
