"""Read preference rows from local files: JSONL, JSON, Parquet and Hugging Face ``save_to_disk`` folders.

Every row comes with a ``where`` string ("file:line N" or "file:row N") so later errors can name it.
Hugging Face ``datasets`` folders are read straight from their Arrow files with pyarrow (no ``datasets``
import at run time); a ``DatasetDict`` folder needs ``split``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "json", "parquet", "hf_disk")


class DataError(ValueError):
    """Bad input data; the message names the file, the line or row, and the field."""


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "hf_disk"
        raise DataError(f"{path}: a folder that is not a Hugging Face save_to_disk dataset (no state.json)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(
        f"{path}: unknown data format {suffix!r}; expected .jsonl, .json, .parquet or a save_to_disk folder"
    )


def read_rows(path: str | os.PathLike, *, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every row of a local file or folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    fmt = detect_format(path)
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt == "json":
        yield from _read_json(path)
    elif fmt == "parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_hf_disk(path, split)


def _read_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:line {e.lineno}: malformed JSON ({e.msg})") from e
    if isinstance(data, dict):  # {"data": [...]} or column-oriented {"prompt": [...], ...}
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif data and all(isinstance(v, list) for v in data.values()):
            n = len(next(iter(data.values())))
            if any(len(v) != n for v in data.values()):
                raise DataError(f"{path}: column-oriented JSON with columns of different lengths")
            data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}}), got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}:row {i}", row


def _read_arrow_table(table, label: str):
    for i, row in enumerate(table.to_pylist()):
        yield f"{label}:row {i}", row


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    yield from _read_arrow_table(pq.read_table(path), str(path))


def _read_hf_disk(path: Path, split: str | None):
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split is None or split not in splits:
            raise DataError(f"{path}: a DatasetDict folder with splits {splits}; choose one with split=")
        path = path / split
    state = json.loads((path / "state.json").read_text())
    offset = 0
    for entry in state["_data_files"]:
        file = path / entry["filename"]
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {offset + i}", row
        offset += table.num_rows
