"""Preference rows -> validated ``PreferenceExample``s, with every bad row named or skipped and counted.

Accepted rows (column names configurable with ``Columns``):
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, messages {role, content}
  implicit prompt {"chosen": str | [messages], "rejected": ...}: the prompt is their common prefix
Optional per-pair columns: a soft preference probability that ``chosen`` wins (``chosen_prob``), a weight, and
``<chosen>_cut`` / ``<rejected>_cut`` (true: the completion was cut off, as a sample that reached its token limit;
it is tokenized without an end-of-turn).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Any

from dpo_jax.data.formats import DataError, duplicate_keys, read_rows

Messages = tuple[dict[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    prob: str | None = "chosen_prob"  # P(chosen beats rejected) in [0, 1]; absent means a hard label (1)
    weight: str | None = "weight"  # >= 0; absent means 1


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt: str | Messages
    chosen: str | Messages  # the completion only (assistant turns for conversational rows)
    rejected: str | Messages
    prob: float = 1.0
    weight: float = 1.0
    where: str = ""
    unpaired: bool = False  # TRL's unpaired format (KTO): chosen is the completion, prob its label (1 / 0)
    cut: tuple[bool, bool] = (False, False)  # (chosen, rejected) cut off: scored without an end-of-turn

    @property
    def conversational(self) -> bool:
        return not isinstance(self.chosen, str)


@dataclasses.dataclass
class LoadReport:
    rows: int = 0
    kept: int = 0
    identical_dropped: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)  # reason -> count
    null_prompts: int = 0  # kept rows whose prompt column was present but null (taken as the shared prefix)
    duplicate_keys: int = 0  # kept rows with a JSON key given twice (the last value was used)
    first_duplicate: str = ""  # where the first of them is, and its keys
    with_prob: int = 0  # kept rows with a soft-probability value

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.rows} rows: {self.kept} kept, {self.identical_dropped} dropped (chosen == rejected), "
            f"skipped: {skipped}"
        )


class _BadRow(DataError):
    def __init__(self, where: str, field: str, reason: str, detail: str):
        super().__init__(f"{where}: field {field!r}: {detail}")
        self.reason = reason


def _messages(value: list, where: str, field: str) -> Messages:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRow(
                where, field, "bad message", f"message {i} must be {{'role': str, 'content': str}}, got {m!r}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _text_or_messages(row: dict, key: str, where: str, *, required: bool = True):
    if key not in row or row[key] is None:
        if required:
            raise _BadRow(where, key, "missing field", "missing")
        return None
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where, key)
    raise _BadRow(
        where, key, "non-string field", f"expected a string or a list of messages, got {type(value).__name__}"
    )


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _number(row: dict, key: str | None, where: str, default: float, lo: float, hi: float) -> float:
    if key is None or row.get(key) is None:
        return default
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _BadRow(where, key, "bad number", f"expected a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise _BadRow(where, key, "number out of range", f"must lie in [{lo}, {hi}], got {value!r}")
    return float(value)


def _unpaired_row(row: dict, where: str, columns: Columns) -> PreferenceExample:
    """TRL's unpaired format: ``prompt``, ``completion``, ``label`` (true: desirable)."""
    prompt = _text_or_messages(row, columns.prompt, where)
    completion = _text_or_messages(row, "completion", where)
    if isinstance(prompt, str) != isinstance(completion, str):
        raise _BadRow(where, columns.prompt, "mixed formats", "prompt and completion must both be text or messages")
    label = row.get("label")
    if not isinstance(label, bool) and label not in (0, 1):
        raise _BadRow(where, "label", "bad label", f"expected true or false, got {label!r}")
    if (isinstance(completion, str) and not completion.strip()) or not completion:
        raise _BadRow(where, "completion", "empty completion", "empty completion")
    weight = _number(row, columns.weight, where, 1.0, 0.0, math.inf)
    return PreferenceExample(prompt, completion, completion, float(bool(label)), weight, where, unpaired=True)


def _chars(value) -> int:
    """Characters of a text or of a conversation's contents."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(m.get("content", "")) if isinstance(m, dict) and isinstance(m.get("content"), str) else 0
                   for m in value)  # fmt: skip
    return 0


def check_size(row: dict, where: str, max_chars: int) -> None:
    """Refuse a row whose text is far past what a run tokenizes (``max_chars``; 0: no bound) before it is
    tokenized: a tokenizer takes hundreds of bytes of memory per character."""
    if not max_chars:
        return
    for key, value in row.items():
        n = _chars(value)
        if n > max_chars:
            raise _BadRow(
                where, key, "row too long",
                f"{n:,} characters, far past data.max_length (rows over data.max_row_chars={max_chars:,} characters "
                "are refused before tokenizing: raise it, or data.on_bad_row='skip' skips such rows)",
            )  # fmt: skip


def parse_row(row: Any, where: str, columns: Columns = Columns(), max_chars: int = 0) -> PreferenceExample:
    """One raw row -> a ``PreferenceExample``; raises ``DataError`` naming ``where`` and the field. A row with
    ``completion`` and ``label`` and no chosen column is TRL's unpaired format (KTO)."""
    if isinstance(row, DataError):
        raise _BadRow(where, "<line>", "malformed line", str(row).split(": ", 1)[-1])
    if not isinstance(row, dict):
        raise _BadRow(where, "<row>", "malformed line", f"expected an object, got {type(row).__name__}")
    check_size(row, where, max_chars)
    if columns.chosen not in row and "completion" in row and "label" in row:
        return _unpaired_row(row, where, columns)
    chosen = _text_or_messages(row, columns.chosen, where)
    rejected = _text_or_messages(row, columns.rejected, where)
    prompt = _text_or_messages(row, columns.prompt, where, required=False)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _BadRow(
            where, columns.rejected, "mixed formats", "chosen and rejected must both be text or both messages"
        )
    if prompt is None:  # implicit prompt: the shared prefix
        n = _common_prefix(chosen, rejected)
        if not isinstance(chosen, str):
            # The completion starts at the first assistant turn after the shared messages.
            while n > 0 and chosen[n - 1]["role"] == "assistant":
                n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(prompt, str) != isinstance(chosen, str):
        raise _BadRow(where, columns.prompt, "mixed formats", "prompt and completions must both be text or messages")
    for key, completion in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if isinstance(completion, str):
            if not completion.strip():
                raise _BadRow(where, key, "empty completion", "empty completion")
        else:
            if not completion or not any(m["role"] == "assistant" for m in completion):
                raise _BadRow(where, key, "no assistant turn", "conversational completion without an assistant turn")
            if not any(m["content"].strip() for m in completion if m["role"] == "assistant"):
                raise _BadRow(where, key, "empty completion", "empty completion")
    prob = _number(row, columns.prob, where, 1.0, 0.0, 1.0)
    weight = _number(row, columns.weight, where, 1.0, 0.0, math.inf)
    cut = []
    for key in (f"{columns.chosen}_cut", f"{columns.rejected}_cut"):
        value = row.get(key, False)
        if not isinstance(value, bool):
            raise _BadRow(where, key, "bad flag", f"expected true or false, got {value!r}")
        cut.append(value)
    return PreferenceExample(prompt, chosen, rejected, prob, weight, where, cut=tuple(cut))


def load_examples(
    path: str | os.PathLike,
    *,
    columns: Columns = Columns(),
    on_bad_row: str = "error",
    split: str | None = None,
    max_chars: int = 0,
) -> tuple[list[PreferenceExample], LoadReport]:
    """All valid examples of a file, and what was dropped or skipped (``on_bad_row``: "error" or "skip");
    ``max_chars``: the longest text a row may hold (``check_size``)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    report = LoadReport()
    examples = []
    for where, row in read_rows(path, split=split):
        report.rows += 1
        try:
            ex = parse_row(row, where, columns, max_chars)
        except _BadRow as e:
            if on_bad_row == "error":
                raise DataError(str(e)) from None
            report.skipped[e.reason] += 1
            continue
        if ex.chosen == ex.rejected and not ex.unpaired:
            report.identical_dropped += 1
            continue
        report.null_prompts += columns.prompt in row and row[columns.prompt] is None
        if dup := duplicate_keys(row):
            report.duplicate_keys += 1
            report.first_duplicate = report.first_duplicate or f"{where} ({', '.join(map(repr, dup))})"
        report.with_prob += columns.prob is not None and row.get(columns.prob) is not None
        examples.append(ex)
    report.kept = len(examples)
    return examples, report


def load_sft_examples(
    path: str | os.PathLike,
    *,
    prompt: str = "prompt",
    completion: str = "completion",
    on_bad_row: str = "error",
    max_chars: int = 0,
) -> list[PreferenceExample]:
    """SFT demonstrations ``{prompt, completion}`` as examples whose chosen and rejected are the completion
    (the loader's layout; the SFT step scores the chosen row only)."""
    examples = []
    for where, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise _BadRow(where, "<line>", "malformed line", str(row).split(": ", 1)[-1])
            if not isinstance(row, dict):
                raise _BadRow(where, "<row>", "malformed line", f"expected an object, got {type(row).__name__}")
            check_size(row, where, max_chars)
            p = _text_or_messages(row, prompt, where)
            c = _text_or_messages(row, completion, where)
            if isinstance(c, str) and not c.strip():
                raise _BadRow(where, completion, "empty completion", "empty completion")
        except _BadRow as e:
            if on_bad_row == "error":
                raise DataError(str(e)) from None
            continue
        examples.append(PreferenceExample(p, c, c, 1.0, 1.0, where))
    return examples
