"""Read preference rows from local files: JSONL, JSON, Parquet and Hugging Face ``save_to_disk`` folders.

Every row comes with a ``where`` string ("file:line N" or "file:row N") so later errors can name it.
Hugging Face ``datasets`` folders are read straight from their Arrow files with pyarrow (no ``datasets``
import at run time); a ``DatasetDict`` folder needs ``split``.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpo_jax.errors import UserError, one_line

FORMATS = ("jsonl", "json", "parquet", "hf_disk")


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, the line or row, and the field."""


GZIP_MAGIC = b"\x1f\x8b"


class Row(dict):
    """A JSON object that had a key more than once (``json`` keeps the last value): ``duplicate_keys`` names them."""

    duplicate_keys: tuple[str, ...] = ()


def _object(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) == len(keys):
        return dict(pairs)
    row = Row(pairs)
    row.duplicate_keys = tuple(sorted({k for k in keys if keys.count(k) > 1}))
    return row


def _loads(text: str):
    return json.loads(text, object_pairs_hook=_object)


def duplicate_keys(row) -> tuple[str, ...]:
    """Keys that occurred twice in a row's JSON object or in one of its messages."""
    found = list(getattr(row, "duplicate_keys", ()))
    for value in row.values() if isinstance(row, dict) else ():
        for m in value if isinstance(value, list) else ():
            found += getattr(m, "duplicate_keys", ())
    return tuple(found)


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open(path: Path):
    """A binary file object of the file's bytes (gzip-compressed files decompressed)."""
    return gzip.open(path, "rb") if _is_gzip(path) else path.open("rb")


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "hf_disk"
        raise DataError(f"{path}: a folder that is not a Hugging Face save_to_disk dataset (no state.json)")
    suffix = path.suffix.lower()
    if suffix == ".gz":  # rows.jsonl.gz: the format of what it holds
        suffix = Path(path.stem).suffix.lower()
        if suffix not in (".jsonl", ".ndjson", ".json"):
            raise DataError(f"{path}: a gzip file of unknown content {suffix!r}; expected .jsonl.gz or .json.gz")
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    raise DataError(
        f"{path}: unknown data format {suffix!r}; expected .jsonl, .json, .parquet or a save_to_disk folder"
    )


def local_paths(path: str | os.PathLike) -> list[Path]:
    """The files of a data path: one path, or the shards of a split joined by ``os.pathsep`` (``dpo_jax.infra.hub``)."""
    return [Path(p) for p in str(path).split(os.pathsep)]


def read_rows(path: str | os.PathLike, *, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every row of a local file or folder (or of several shards, in order)."""
    n = 0
    for part in local_paths(path):
        if not part.exists():
            raise DataError(
                f"data file not found: {part}: expected a local .jsonl, .json, .parquet or save_to_disk folder"
            )
        fmt = detect_format(part)
        reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "arrow": _read_arrow}.get(fmt)
        rows = reader(part) if reader else _read_hf_disk(part, split)
        for item in rows:
            n += 1
            yield item
    if n == 0:
        raise DataError(f"no rows in {path}: expected preference rows (prompt, chosen, rejected)")


def _utf8_error(path: Path, data: bytes, e: UnicodeDecodeError, skipped: int = 0) -> str:
    offset = skipped + e.start
    line = data[: e.start].count(b"\n") + 1
    where = f"{path}:line {line}"
    return f"{where}: bytes that are not UTF-8 at byte offset {offset} (0x{data[e.start]:02x}); expected UTF-8 text"


def _read_jsonl(path: Path):
    offset = 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            where = f"{path}:line {lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not data
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    where,
                    DataError(
                        f"{where}: bytes that are not UTF-8 at byte offset {start + e.start} (0x{raw[e.start]:02x}); "
                        "expected UTF-8 text (data.on_bad_row='skip' skips such lines)"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                yield where, _loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path):
    with _open(path) as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        data = _loads(raw[bom:].decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(_utf8_error(path, raw[bom:], e, skipped=bom)) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:line {e.lineno}: malformed JSON ({e.msg}); expected a JSON list of rows") from None
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
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"unreadable Parquet file {path} ({one_line(e)[:160]}): expected a Parquet table") from None
    yield from _read_arrow_table(table, str(path))


def _read_arrow(path: Path):
    """An Arrow IPC stream file: what ``load_dataset`` prepares in its cache (and ``save_to_disk`` writes)."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"unreadable Arrow file {path} ({one_line(e)[:120]}): expected an Arrow stream") from None
    yield from _read_arrow_table(table, str(path))


def _json_file(file: Path, what: str):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable {file.name} in {file.parent} ({one_line(e)[:120]}): expected {what}") from None


def _read_hf_disk(path: Path, split: str | None):
    if (path / "dataset_dict.json").exists():
        splits = _json_file(path / "dataset_dict.json", "a datasets DatasetDict index").get("splits", [])
        if split is None or split not in splits:
            raise DataError(
                f"no split {split!r} in the DatasetDict folder {path}: set data.split to one of its splits {splits}"
            )
        path = path / split
        if not (path / "state.json").exists():
            raise DataError(f"missing state.json in {path}: expected a datasets save_to_disk split folder")
    state = _json_file(path / "state.json", "a datasets save_to_disk state.json")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not entries:
        raise DataError(f"no _data_files in {path / 'state.json'}: expected a datasets save_to_disk folder")
    offset = 0
    for entry in entries:
        file = path / str(entry.get("filename", ""))
        try:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"unreadable Arrow file {file} ({one_line(e)[:120]}): expected the save_to_disk data files"
            ) from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {offset + i}", row
        offset += table.num_rows
