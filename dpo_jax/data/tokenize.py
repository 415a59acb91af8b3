"""Tokenize preference examples so that the completion tokens are exactly the tokens scored.

Text rows: prompt and completions are tokenized separately without the tokenizer's own special tokens; BOS is
put in front of the prompt once (not if the prompt already starts with it) and EOS after each completion once.

Conversational rows (TRL 1.16's convention): the prompt is ``apply_chat_template(prompt,
add_generation_prompt=True)`` tokenized, and a completion is ``apply_chat_template(prompt + completion)``
tokenized minus the prompt's ids. Nothing is added: the template decides BOS and how a turn ends (ChatML's
``<|im_end|>\n``, Llama 3's ``<|eot_id|>``), so the scored tokens are the ones the model emits at inference.
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
    unknown_tokens: bool = False  # some text became the tokenizer's unknown (or pad) token
    template_mismatch: bool = False  # the prompt's ids are not a prefix of the conversation's ids
    unpaired: bool = False  # an unpaired (KTO) example: chosen is its completion, prob its label

    @property
    def length(self) -> int:
        """Longest of the two full sequences."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def conversation_ids(ex: PreferenceExample, tokenizer) -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, [chosen ids, rejected ids], mismatch) of a conversational row, as the chat template makes them.
    A cut completion is its text right after the generation prompt, as it was sampled: no end-of-turn."""

    def render(messages, **kw):
        try:
            return tokenizer.encode(tokenizer.apply_chat_template(messages, **kw))
        except ValueError as e:  # no template, or the template's raise_exception (e.g. roles must alternate)
            raise DataError(f"{ex.where}: {e}") from None

    prompt = render(list(ex.prompt), add_generation_prompt=True)
    completions, mismatch = [], False
    for completion, cut in zip((ex.chosen, ex.rejected), ex.cut, strict=True):
        if cut:
            text = "".join(m["content"] for m in completion)
            full = tokenizer.encode(tokenizer.apply_chat_template(list(ex.prompt), add_generation_prompt=True) + text)
        else:
            full = render(list(ex.prompt) + list(completion))
        mismatch |= full[: len(prompt)] != prompt
        completions.append(full[len(prompt) :])
    return prompt, completions, mismatch


def text_ids(ex: PreferenceExample, tokenizer, cfg: TokenizeConfig) -> tuple[list[int], list[list[int]]]:
    """(prompt ids with BOS, [chosen ids, rejected ids] each ending in one EOS, unless cut) of a text row."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = tokenizer.encode(ex.prompt)
    if cfg.add_bos and bos is not None and (not prompt or prompt[0] != bos):
        prompt = [bos, *prompt]
    completions = []
    for text, cut in zip((ex.chosen, ex.rejected), ex.cut, strict=True):
        ids = tokenizer.encode(text)
        if cfg.add_eos and not cut and eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        completions.append(ids)
    return prompt, completions


def _unknown_ids(tokenizer) -> set[int]:
    """The unknown token, and the pad token when it is not also BOS/EOS: text should never encode to them."""
    unk, pad = tokenizer.token_id("unk_token"), tokenizer.pad_token_id
    ids = {unk} if unk is not None else set()
    if pad is not None and pad not in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        ids.add(pad)
    return ids


def tokenize_example(ex: PreferenceExample, tokenizer, cfg: TokenizeConfig) -> TokenizedPair:
    mismatch = False
    if ex.conversational:
        prompt, completions, mismatch = conversation_ids(ex, tokenizer)
    else:
        prompt, completions = text_ids(ex, tokenizer, cfg)
    unknown = _unknown_ids(tokenizer)
    has_unknown = bool(unknown) and any(i in unknown for ids in (prompt, *completions) for i in ids)
    bos = tokenizer.bos_token_id

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
        has_unknown,
        mismatch,
        ex.unpaired,
    )


def tokenize_examples(examples, tokenizer, cfg: TokenizeConfig) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Tokenize all; returns the pairs and counts of truncated prompts and completions."""
    pairs = [tokenize_example(ex, tokenizer, cfg) for ex in examples]
    stats = {
        "pairs": len(pairs),
        "truncated_prompts": sum(p.truncated_prompt for p in pairs),
        "truncated_completions": sum(p.truncated_completion for p in pairs),
        "unknown_tokens": sum(p.unknown_tokens for p in pairs),
        "template_mismatch": sum(p.template_mismatch for p in pairs),
    }
    return pairs, stats
