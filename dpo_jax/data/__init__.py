"""Preference data: formats, validation, tokenization, batching and the built-in synthetic task."""

from dpo_jax.core.batch import Batch
from dpo_jax.data.examples import Columns, LoadReport, PreferenceExample, load_examples, parse_row
from dpo_jax.data.formats import DataError, read_rows
from dpo_jax.data.loader import PreferenceLoader, epoch_order, pad_batches, to_global
from dpo_jax.data.packing import Layout
from dpo_jax.data.tokenize import TokenizeConfig, TokenizedPair, tokenize_example, tokenize_examples

__all__ = [
    "Batch",
    "Columns",
    "DataError",
    "LoadReport",
    "PreferenceExample",
    "PreferenceLoader",
    "TokenizeConfig",
    "TokenizedPair",
    "Layout",
    "pad_batches",
    "epoch_order",
    "load_examples",
    "parse_row",
    "read_rows",
    "to_global",
    "tokenize_example",
    "tokenize_examples",
]
