"""The frozen reference: precomputed sequence log-probs, cached on disk and shared by later runs.

The cache key hashes (reference weights, model config, tokenized data, scoring settings), so any change to
the reference, the data or the tokenization settings (which change the token ids) makes a new entry, and
sibling runs of a sweep reuse one. Values are [N, 2] float32: (chosen, rejected) summed completion log-probs, or
[N, 4] with the sums' tails past the shorter completion (LD-DPO) appended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dpo_jax.core import scoring
from dpo_jax.data.loader import PreferenceLoader, to_global
from dpo_jax.infra import signals
from dpo_jax.infra.checkpoint import digest
from dpo_jax.infra.logging import progress
from dpo_jax.infra.sharding import batch_sharding, batch_slice, data_parallel_size


def ids_digest(pairs) -> str:
    """sha256 of the pairs' token ids (prompt, chosen, rejected, in order): what a cache's rows belong to."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt, p.chosen, p.rejected):
            h.update(np.asarray(ids, np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()


def cache_key(params, model_config, pairs, settings: dict) -> str:
    """The cache entry of a reference's log-probs of ``pairs``. LoRA adapter leaves and LoRA config fields are left
    out: a reference with its adapters off computes what the plain model does, so a LoRA run and a full run of one
    checkpoint share an entry (an int8 or bfloat16 base holds other weights, so it still gets its own)."""
    h = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0]))
    leaves = [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves if "lora" not in jax.tree_util.keystr(path)]
    # a leaf split across processes (FSDP or the context axis over hosts) is read as its on-device digest: no
    # process holds all of it (every process computes the same sums, in one program)
    spread = [leaf for _, leaf in leaves if not getattr(leaf, "is_fully_addressable", True)]
    sums = iter(digest(spread) if spread else [])
    for name, leaf in leaves:
        h.update(name.encode())
        if getattr(leaf, "is_fully_addressable", True):
            h.update(np.asarray(jax.device_get(leaf)).tobytes())
        else:
            h.update(f"digest{next(sums)}{leaf.shape}{leaf.dtype}".encode())
    plain = dataclasses.replace(
        model_config,
        lora_rank=0,
        lora_alpha=16.0,
        lora_targets=(),
        lora_dropout=0.0,
        attention="auto",
        attention_block=512,
        mlp_chunk=0,
        context_attention="ring",
    )  # how attention and the MLP are computed: same values
    h.update(repr(plain).encode())
    h.update(ids_digest(pairs).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def compute_logps(graphdef, params, pairs, *, mesh, batch_size, layout, pad_id, head: dict, tails: bool = False):
    """One pass of the reference over ``pairs`` (in order); every process gets all [N, 2] values ([N, 4] with
    the LD-DPO tails)."""
    slice_index, slice_count = batch_slice(mesh)
    loader = PreferenceLoader(
        pairs,
        batch_size,
        shuffle=False,
        drop_last=False,
        layout=dataclasses.replace(layout, row_multiple=data_parallel_size(mesh)),
        pad_id=pad_id,
        process_index=slice_index,
        process_count=slice_count,
    )

    width = 4 if tails else 2

    def score(params, batch):  # [G, P, width]: grouped like the batch, so it stays sharded
        stats = scoring.pair_stats(graphdef, params, batch, tails=tails, **head)
        logps = jnp.concatenate([stats["logps"], stats["tails"]], axis=1) if tails else stats["logps"]
        return logps.reshape(*batch.valid_GxP.shape, width), batch.index_GxP

    score = jax.jit(score, out_shardings=(batch_sharding(mesh, 3), batch_sharding(mesh, 2)))
    out = np.zeros((len(pairs), width), np.float32)
    batches = progress(loader.epoch(0), loader.steps_per_epoch, "reference log-probs")
    for _step, batch in batches:
        signals.check("during the reference pass (nothing to save; it restarts)")
        logps, index = score(params, to_global(batch, mesh))
        if jax.process_count() > 1:
            logps, index = multihost_utils.process_allgather((logps, index), tiled=True)
        index, logps = np.asarray(index).reshape(-1), np.asarray(logps).reshape(-1, width)
        out[index[index >= 0]] = logps[index >= 0]
    batches.close()
    return out


def _read_cache(path: Path, pairs) -> tuple[np.ndarray | None, str]:
    """(values, "") of a cache file that holds one finite row per pair of ``pairs``, else (None, what is wrong)."""
    try:
        with np.load(path) as f:
            values, rows, digest = f["logps"], int(f["rows"]), str(f["ids_digest"])
    except (OSError, ValueError, KeyError, EOFError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if values.ndim != 2 or values.shape[1] not in (2, 4) or rows != values.shape[0]:
        return None, f"values of shape {values.shape} for {rows} rows"
    if rows != len(pairs) or digest != ids_digest(pairs):
        return None, f"{rows} rows of other token ids than the data's {len(pairs)} pairs"
    if not np.isfinite(values).all():
        return None, "NaN/Inf values"
    return values, ""


def cached_logps(cache_dir: str | os.PathLike, key: str, compute, pairs) -> tuple[np.ndarray, bool]:
    """Load ``<cache_dir>/<key>.npz`` or compute and store it (process 0 writes, atomically); (values, hit). A cache
    file is used only when it holds exactly one finite row per pair of ``pairs``, made from the same token ids (its
    row count and their digest are stored with the values); otherwise it is recomputed, with one line saying why."""
    path = Path(cache_dir) / f"{key}.npz"
    if path.exists():
        values, problem = _read_cache(path, pairs)
        if values is not None:
            return values, True
        print(f"reference cache {path} does not match the data ({problem}); recomputing it", flush=True)
    values = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, logps=values, rows=np.int64(len(pairs)), ids_digest=np.str_(ids_digest(pairs)))
        os.replace(tmp, path)
    return values, False
