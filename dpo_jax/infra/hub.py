"""Hugging Face hub ids resolved in the local caches, never downloaded.

``model.hf_path`` (and ``reference.hf_path``, ``data.tokenizer_path``) may name a model as ``owner/name`` (or
``owner/name@revision``) whose snapshot is in the hub cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``), as ``huggingface_hub`` keeps it. ``data.*_path`` may name a dataset as
``owner/name`` or ``owner/name:split`` (default: ``train`` for train and SFT files, the first of ``test``,
``validation``, ``eval`` for eval files), found as ``load_dataset`` left it: its prepared Arrow files in the datasets
cache (``HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``), or the repository's data files (parquet, JSON lines) in the
hub cache. A split held in several shards resolves to all of them, joined by ``os.pathsep`` (``dpo_jax.data``
reads them in order). A local path is always taken as it is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dpo_jax.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?(:[\w.-]+)?$")
EVAL_SPLITS = ("test", "validation", "eval")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".jsonl.gz", ".json.gz")


def _home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def hub_cache() -> Path:
    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _home() / "hub")


def datasets_cache() -> Path:
    return Path(os.environ.get("HF_DATASETS_CACHE") or _home() / "datasets")


def is_hub_id(value: str) -> bool:
    """``owner/name[@revision][:split]`` that is not an existing local path."""
    return bool(value) and not Path(value).exists() and bool(HUB_ID.match(value))


def _snapshot(repo: str, revision: str | None, kind: str) -> Path | None:
    """A cached snapshot folder of a hub repository (``kind``: models | datasets), or None."""
    folder = hub_cache() / f"{kind}--{repo.replace('/', '--')}"
    rev = revision or "main"
    ref = folder / "refs" / rev
    commit = ref.read_text().strip() if ref.exists() else rev
    snap = folder / "snapshots" / commit
    return snap if snap.is_dir() else None


def resolve_model(value: str, field: str) -> str:
    """A local model folder: ``value`` itself, or the cached snapshot of the hub id it names."""
    if not is_hub_id(value):
        return value
    repo, _, revision = value.partition("@")
    snap = _snapshot(repo, revision or None, "models")
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    if revision and snap is None and folder.is_dir():  # the model is cached, that revision of it is not
        cached = sorted(
            {p.name for p in (folder / "refs").glob("*")} | {p.name for p in (folder / "snapshots").glob("*")}
        )
        raise ConfigError(
            f"config.{field}: {repo!r} is in the hub cache {hub_cache()} but not at revision {revision!r} (cached: "
            f"{', '.join(cached) or 'none'}); nothing is downloaded at run time: fetch that revision there first"
        )
    if snap is None or not (snap / "config.json").exists():
        raise ConfigError(
            f"config.{field}: {value!r} is neither a local folder nor a model in the hub cache {hub_cache()} "
            f"(HF_HUB_CACHE / HF_HOME); nothing is downloaded at run time: fetch it there first"
        )
    return str(snap)


def _split_files(files: list[Path], split: str) -> list[Path]:
    """The data files of ``split``: named ``<split>``, ``<split>-00000-of-00002``, ``*-<split>`` (datasets' Arrow
    files) or held in a folder named ``<split>``."""
    pattern = re.compile(rf"(^|[-_]){re.escape(split)}(-\d{{5}}-of-\d{{5}})?$")
    out = []
    for f in files:
        stem = f.name
        for suffix in DATA_SUFFIXES:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if pattern.search(stem) or f.parent.name == split:
            out.append(f)
    return sorted(out)


def _data_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES) and "refs" not in p.parts]


def resolve_dataset(value: str, field: str, default_splits: tuple[str, ...]) -> str:
    """A local data path: ``value`` itself, or the cached files of the hub dataset (and split) it names."""
    if not is_hub_id(value):
        return value
    spec, _, split = value.partition(":")
    repo, _, revision = spec.partition("@")
    splits = (split,) if split else default_splits
    candidates = []  # (where, files): the prepared Arrow files first (the newest), then the repository's files
    prepared = datasets_cache() / repo.replace("/", "___")
    if prepared.is_dir():
        folders = sorted({p.parent for p in prepared.rglob("*.arrow")}, key=lambda p: p.stat().st_mtime, reverse=True)
        candidates += [(f, [p for p in f.iterdir() if p.suffix == ".arrow"]) for f in folders]
    snap = _snapshot(repo, revision or None, "datasets")
    if snap is not None:
        candidates.append((snap, _data_files(snap)))
    for s in splits:
        for _, files in candidates:
            found = _split_files(files, s)
            if found:
                return os.pathsep.join(str(f) for f in found)
    searched = f"{prepared} and {hub_cache() / ('datasets--' + repo.replace('/', '--'))}"
    raise ConfigError(
        f"config.{field}: {value!r} is neither a local file nor a dataset with split {' / '.join(splits)} in the "
        f"caches ({searched}; HF_DATASETS_CACHE / HF_HUB_CACHE / HF_HOME); nothing is downloaded at run time"
    )


def resolve_config(cfg) -> list[str]:
    """Replace the hub ids among the config's model and data paths by their cached local paths; one line each."""
    notes = []
    fields = [("model", "hf_path"), ("reference", "hf_path"), ("data", "tokenizer_path")]
    for section, key in fields:
        value = cfg[section].get(key, "")
        local = resolve_model(value, f"{section}.{key}") if value else value
        if local != value:
            cfg[section][key] = local
            notes.append(f"{section}.{key}: {value} -> {local}")
    for key, splits in (("train_path", ("train",)), ("eval_path", EVAL_SPLITS), ("sft_path", ("train",))):
        value = cfg.data.get(key, "")
        local = resolve_dataset(value, f"data.{key}", splits) if value else value
        if local != value:
            cfg.data[key] = local
            notes.append(f"data.{key}: {value} -> {local}")
    return notes
