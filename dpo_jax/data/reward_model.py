"""A local reward model folder (``*ForSequenceClassification``) as ``config.reward``: (prompt, completion) pairs
scored in JAX in batches, each pair rendered with the model's own chat template when it has one (a user turn, or a
conversational prompt's turns, then the completion as the assistant's), else prompt + completion as text. In a
run it computes in the policy's dtype (bfloat16 weights and activations when the policy computes in bfloat16) and
its weights are laid out over the run's mesh by the policy's sharding rules."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.errors import ConfigError, ModelError
from dpo_jax.infra import hf, sharding, signals
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


def check(path: str) -> None:
    """A reward model folder we can load (its config, tokenizer and score head), checked without its weights."""
    hf.reward_model_config(path)
    if not (Path(path) / "tokenizer.json").is_file():
        raise ModelError(f"no tokenizer.json in {path} (a reward model scores text)")


class RewardModel:
    """(prompts, completions) -> [n] scores (the first label's) of a local reward model folder, computed in
    ``dtype`` (bfloat16: its weights stored in bfloat16 too) and, given a ``mesh``, with its weights laid out over
    it as the policy's are (``sharding.param_shardings``)."""

    def __init__(self, path: str, batch_size: int = 16, *, dtype: str = "float32", mesh=None):
        self.path, self.batch_size = path, batch_size
        self.decoder, self.score_LxD, self.tokenizer = hf.load_reward_model(path, dtype=dtype)
        if self.tokenizer is None:
            raise ConfigError(f"config.reward: expected a reward model folder with tokenizer.json, got {path!r}")
        graphdef, state = nnx.split(self.decoder)
        if dtype == "bfloat16":  # a frozen model: its weights need no float32 master copy
            state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 state)  # fmt: skip
        out = None
        if mesh is not None:
            state = jax.device_put(state, sharding.param_shardings(state, mesh))
            self.score_LxD = jax.device_put(self.score_LxD, sharding.replicated(mesh))
            out = sharding.replicated(mesh)  # every process reads the scores
        self.decoder = nnx.merge(graphdef, state)
        self.pad_id = int(self.decoder.config.pad_token_id)
        self._scores = jax.jit(reward.sequence_scores, static_argnums=3, out_shardings=out)

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
def load(path: str, *, dtype: str = "float32", mesh=None) -> RewardModel:
    """The reward model in ``path``, in ``dtype`` over ``mesh`` (loaded once per process for each)."""
    return RewardModel(path, dtype=dtype, mesh=mesh)
