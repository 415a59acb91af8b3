"""Tokenize preference examples so that the completion tokens are exactly the tokens scored.

Prompt and completions are tokenized separately (TRL's convention) without the tokenizer's own special
tokens; BOS is put in front of the prompt once (not if the prompt or chat template already starts with it)
and EOS after each completion once. Conversational rows are rendered with the tokenizer's chat template: the
prompt with the generation prompt, each completion as the rest of the rendered conversation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpo_jax.data.examples import PreferenceExample
from dpo_jax.data.formats import DataError

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 512  # prompt + completion tokens
    max_prompt_length: int = 256
    max_completion_length: int | None = None
    truncation_mode: str = "keep_end"  # for prompts: keep_end drops the start (BOS is kept)
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    prompt: np.ndarray  # int32 ids
    chosen: np.ndarray
    rejected: np.ndarray
    prob: float
    weight: float
    truncated_prompt: bool = False
    truncated_completion: bool = False

    @property
    def length(self) -> int:
        """Longest of the two full sequences."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def render(ex: PreferenceExample, tokenizer) -> tuple[str, str, str]:
    """Prompt, chosen and rejected text; conversational rows through the chat template."""
    if not ex.conversational:
        return ex.prompt, ex.chosen, ex.rejected
    prompt = tokenizer.apply_chat_template(list(ex.prompt), add_generation_prompt=True)
    out = []
    for completion in (ex.chosen, ex.rejected):
        full = tokenizer.apply_chat_template(list(ex.prompt) + list(completion))
        if not full.startswith(prompt):
            raise DataError(f"{ex.where}: the chat template does not render the prompt as a prefix of the conversation")
        out.append(full[len(prompt) :])
    return prompt, out[0], out[1]


def tokenize_example(ex: PreferenceExample, tokenizer, cfg: TokenizeConfig) -> TokenizedPair:
    prompt_text, chosen_text, rejected_text = render(ex, tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = tokenizer.encode(prompt_text)
    if cfg.add_bos and bos is not None and (not prompt or prompt[0] != bos):
        prompt = [bos, *prompt]
    completions = []
    for text in (chosen_text, rejected_text):
        ids = tokenizer.encode(text)
        if cfg.add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        completions.append(ids)

    truncated_prompt = len(prompt) > cfg.max_prompt_length
    if truncated_prompt:
        keep = cfg.max_prompt_length
        if cfg.truncation_mode == "keep_start":
            prompt = prompt[:keep]
        elif cfg.add_bos and bos is not None and prompt[0] == bos:
            prompt = [bos, *prompt[len(prompt) - keep + 1 :]]
        else:
            prompt = prompt[len(prompt) - keep :]
    room = cfg.max_length - len(prompt)
    if cfg.max_completion_length is not None:
        room = min(room, cfg.max_completion_length)
    truncated_completion = any(len(c) > room for c in completions)
    completions = [c[:room] for c in completions]
    return TokenizedPair(
        np.asarray(prompt, np.int32),
        np.asarray(completions[0], np.int32),
        np.asarray(completions[1], np.int32),
        ex.prob,
        ex.weight,
        truncated_prompt,
        truncated_completion,
    )


def tokenize_examples(examples, tokenizer, cfg: TokenizeConfig) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Tokenize all; returns the pairs and counts of truncated prompts and completions."""
    pairs = [tokenize_example(ex, tokenizer, cfg) for ex in examples]
    stats = {
        "pairs": len(pairs),
        "truncated_prompts": sum(p.truncated_prompt for p in pairs),
        "truncated_completions": sum(p.truncated_completion for p in pairs),
    }
    return pairs, stats
