"""A config's data: the built-in task or the configured files, loaded, validated, tokenized and laid out.

``load_data`` reads the train and eval files (every bad row named or skipped), tokenizes them, refuses data that
cannot train as configured and warns once about data that is accepted but probably wrong; KTO's examples are made
from pairs here. ``make_layout`` is the batch layout the config asks for.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from dpo_jax.config import loss_types
from dpo_jax.data import Columns, Layout, TokenizeConfig, kto, load_examples, synthetic, tokenize_examples
from dpo_jax.data.examples import load_sft_examples
from dpo_jax.data.formats import DataError
from dpo_jax.errors import Notes
from dpo_jax.infra import sharding, throughput
from dpo_jax.infra.hf import HFTokenizer
from dpo_jax.infra.workdir import atomic_dir
from dpo_jax.training.runs import barrier


@dataclasses.dataclass
class Data:
    """A run's tokenized pairs (KTO: its examples as pairs) and what loading them found."""

    train_pairs: list
    eval_pairs: list
    eval_examples: list  # the eval file's rows (their prompts are sampled at eval)
    summary: dict  # data/... entries of the run's summary
    train_examples: list = dataclasses.field(default_factory=list)  # the train file's rows (online: its prompts)


def task_files(cfg, workdir: Path):
    """Tokenizer and data files: the built-in task (written into the workdir, rewritten when its settings change)
    or the configured files."""
    if cfg.task == "synthetic":
        data_dir = workdir / "data"
        task = dict(cfg.synthetic)
        record = data_dir / "task.json"
        if jax.process_index() == 0 and not (record.exists() and json.loads(record.read_text()) == task):
            with atomic_dir(data_dir) as tmp:  # a kill mid-write leaves the old folder or none, never half of one
                synthetic.write_task(tmp, synthetic.TaskConfig(**task))
                (tmp / "task.json").write_text(json.dumps(task))
        barrier("data")
        paths = {k: data_dir / f"{k}.jsonl" for k in ("sft", "train", "eval")}
        return HFTokenizer.from_folder(data_dir / "tokenizer"), paths
    tokenizer_dir = cfg.data.tokenizer_path or cfg.model.hf_path
    paths = {"train": Path(cfg.data.train_path), "eval": Path(cfg.data.eval_path)}
    if cfg.data.sft_path:
        paths["sft"] = Path(cfg.data.sft_path)
    return HFTokenizer.from_folder(tokenizer_dir), paths


def load_data(cfg, paths: dict, tokenizer, notes: Notes) -> Data:
    """The train and eval files as tokenized pairs, checked (``check_data``); KTO's examples from pairs."""
    d, tok_cfg = cfg.data, tokenize_config(cfg)
    load = lambda path: load_examples(path, columns=columns(cfg), on_bad_row=d.on_bad_row,  # noqa: E731
                                      split=d.split or None, max_chars=max_row_chars(cfg))  # fmt: skip
    (train_ex, train_report), (eval_ex, eval_report) = load(paths["train"]), load(paths["eval"])
    train_pairs, train_tok = tokenize_examples(train_ex, tokenizer, tok_cfg)
    eval_pairs, eval_tok = tokenize_examples(eval_ex, tokenizer, tok_cfg)
    summary = {
        "data/train": train_report.summary(),
        "data/eval": eval_report.summary(),
        "data/train_truncation": train_tok,
        "data/eval_truncation": eval_tok,
    }
    if jax.process_index() == 0:
        print(f"train data: {train_report.summary()}; eval data: {eval_report.summary()}", flush=True)
    reports, pairs = {"train": train_report, "eval": eval_report}, {"train": train_pairs, "eval": eval_pairs}
    check_data(cfg, paths, reports, pairs, {"train": train_tok, "eval": eval_tok}, notes)
    for split, split_pairs in pairs.items():
        n = sum(p.unpaired for p in split_pairs)
        if n and (n < len(split_pairs) or "kto" not in loss_types(cfg)):
            raise DataError(
                f"{paths[split]} has {n} unpaired rows (prompt, completion, label) among {len(split_pairs)}: "
                "unpaired data trains with dpo.loss_type='kto' only, and a file is either paired or unpaired"
            )
    if "kto" in loss_types(cfg):  # unpaired examples with mismatched KL completions, as pairs
        train_pairs, eval_pairs = kto.from_pairs(train_pairs), kto.from_pairs(eval_pairs)
        summary["data/kto_examples"] = "{} desirable, {} undesirable".format(*kto.counts(train_pairs))
    if any(w < 0 for w in cfg.dpo.loss_weights):
        notes.warn(f"dpo.loss_weights {tuple(cfg.dpo.loss_weights)} has a negative weight: that loss is maximised")
    return Data(train_pairs, eval_pairs, eval_ex, summary, train_ex)


def load_sft_pairs(cfg, path: Path, tokenizer) -> list:
    """The SFT stage's demonstrations as (chosen-only) pairs; too few for one batch is an error."""
    examples = load_sft_examples(path, on_bad_row=cfg.data.on_bad_row, max_chars=max_row_chars(cfg))
    pairs, _ = tokenize_examples(examples, tokenizer, tokenize_config(cfg))
    if len(pairs) < cfg.sft.batch_size:
        raise DataError(
            f"too few valid rows in {path}: {len(pairs)}; one batch needs sft.batch_size={cfg.sft.batch_size}: "
            "add rows or lower sft.batch_size"
        )
    return pairs


def tokenize_config(cfg) -> TokenizeConfig:
    d = cfg.data
    return TokenizeConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          truncation_mode=d.truncation_mode)  # fmt: skip


def max_row_chars(cfg) -> int:
    """The longest text a data row may hold: ``data.max_row_chars``, or 100 characters per token of max_length."""
    return cfg.data.get("max_row_chars", 0) or 100 * cfg.data.max_length


def columns(cfg) -> Columns:
    d = cfg.data
    return Columns(d.prompt_column, d.chosen_column, d.rejected_column, d.prob_column or None, d.weight_column or None)


def check_data(cfg, paths, reports, pairs, stats, notes: Notes) -> None:
    """Refuse data that cannot train as configured; warn once about data that is accepted but probably wrong."""
    d = cfg.data
    needs = {"train": ("optim.batch_size", cfg.optim.batch_size), "eval": ("eval.batch_size", 1)}
    for split, (field, size) in needs.items():
        if len(pairs[split]) < size:
            raise DataError(
                f"too few valid pairs in {paths[split]}: {reports[split].summary()}; one batch needs {size} "
                f"({field}): add rows{' or lower ' + field if size > 1 else ''}"
            )
    for split in ("train", "eval"):
        r, st, where = reports[split], stats[split], paths[split]
        if split == "train" and all(p.weight == 0 for p in pairs[split]):
            notes.warn(f"every pair in {where} has weight 0 ({d.weight_column!r}): the loss is 0 and nothing trains")
        if r.duplicate_keys:
            notes.warn(
                f"{r.duplicate_keys} rows of {where} give a JSON key twice (the last value is used), the first at "
                f"{r.first_duplicate}"
            )
        if r.null_prompts:
            notes.warn(
                f"{r.null_prompts} rows of {where} have a null {d.prompt_column!r}: their prompt was taken as the "
                "shared prefix of chosen and rejected"
            )
        if st.get("unknown_tokens"):
            notes.warn(
                f"{st['unknown_tokens']} pairs of {where} contain text the tokenizer maps to its unknown/pad token"
            )
        if st.get("truncated_prompts") or st.get("truncated_completions"):
            notes.warn(
                f"{where}: {st['truncated_prompts']} of {st['pairs']} prompts truncated to data.max_prompt_length="
                f"{d.max_prompt_length}, {st['truncated_completions']} completions cut to fit data.max_length="
                f"{d.max_length}"
            )
        if st.get("template_mismatch"):
            notes.warn(
                f"{st['template_mismatch']} conversational rows of {where}: the tokenized prompt is not a prefix of "
                "the tokenized conversation (the chat template or tokenizer merges across the boundary)"
            )
        if split == "train" and r.with_prob and not cfg.dpo.use_soft_targets and cfg.task == "files":
            notes.warn(
                f"{where} has a {d.prob_column!r} column ({r.with_prob} rows) but dpo.use_soft_targets=False: "
                "training on hard labels"
            )


def make_layout(cfg, mesh, *, sides: int = 2, accum: int = 1, counts: dict | None = None) -> Layout:
    """The batch layout the config asks for; packed batches hold a multiple of (data-parallel devices x accum)
    rows; ``counts`` (``throughput.model_counts``) weighs attention in the row length chosen from the data."""
    d = cfg.data
    return Layout(
        kind="packed" if d.packing else "padded",
        share_prompt=d.share_prompt,
        row_length=d.pack_length,
        buckets=tuple(d.buckets),
        scored_only=cfg.logprobs.scored_only,
        sides=sides,
        row_multiple=sharding.data_parallel_size(mesh) * accum,
        attention_cost=throughput.attention_cost(counts) if counts else 0.0,
        max_shapes=d.get("max_shapes", 0),
    )
