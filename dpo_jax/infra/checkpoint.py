"""Orbax checkpoints of the train state, with the data position, a content digest and the stage beside it.

Resume order: (1) take the newest step whose restore succeeds, whose digest matches the restored arrays and
whose parameters are finite; a damaged step (a truncated, deleted or altered file) is moved aside to
``damaged-<step>`` with one line saying so, and the next older step is tried; (2) read its metadata; the data
loader restarts at ``data_step`` (batches are a pure function of the step, so this is exact); (3) training
continues from ``step`` with the hyper-parameters of the current config (``workdir.check_resume_config`` has
already refused changes that were not allowed). A save is atomic (Orbax commits a step only when it is
complete), so an interrupted run keeps its last good checkpoint.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dpo_jax.errors import NonFiniteLoss, WorkdirError, one_line
from dpo_jax.infra.workdir import ensure_free_space, os_error, promote_pending_record

SAVE_SLACK_BYTES = 512 * 1024


def _as_u32(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 vector (every element contributes all its bytes)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


# A leaf larger than this many elements is read a chunk at a time (every check of a save and a restore): XLA:CPU
# writes out a reduction's elementwise input before reducing it, so one program over a whole 270M-parameter state
# held two uint32 copies of it (+6.4 GB at every save of a 3.2 GB state) where chunks hold two of 16 MB.
CHUNK_ELEMENTS = 1 << 22


def _sums(u: jax.Array, i: jax.Array) -> jax.Array:
    """Two position-weighted uint32 sums of ``u`` at flat positions ``i``. The weights are odd, so changing any one
    element always changes both sums (mod 2**32)."""
    w1 = 2 * (i % jnp.uint32(65521)) + 1
    w2 = 2 * (i % jnp.uint32(65519)) + 1
    return jnp.stack([jnp.sum(u * w1, dtype=jnp.uint32), jnp.sum((u ^ (u >> 16)) * w2, dtype=jnp.uint32)])


def _leaf_sums(x: jax.Array) -> jax.Array:
    u = _as_u32(x)
    return _sums(u, jax.lax.iota(jnp.uint32, u.shape[0]))


def _finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _small_digest(leaves: list) -> jax.Array:
    """[n, 2] digest sums of leaves of at most ``CHUNK_ELEMENTS``: one program."""
    return jnp.stack([_leaf_sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


@jax.jit
def _small_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([_finite(x) for x in leaves])) if leaves else jnp.bool_(True)


@functools.partial(jax.jit, static_argnames=("width", "rows"))
def _chunk(x: jax.Array, start: jax.Array, width: int, rows: int) -> tuple[jax.Array, jax.Array]:
    """(digest sums, finite) of rows ``[start, start + rows)`` of ``x`` seen as ``[-1, width]``."""
    block = jax.lax.dynamic_slice_in_dim(x.reshape(-1, width), start, rows)
    u = _as_u32(block)
    offset = start.astype(jnp.uint32) * jnp.uint32(width * (u.shape[0] // block.size))  # uint32 positions wrap alike
    return _sums(u, offset + jax.lax.iota(jnp.uint32, u.shape[0])), _finite(block)


def _large_leaf(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(digest sums, finite) of one leaf of more than ``CHUNK_ELEMENTS``, a chunk of rows at a time (two programs
    a shape: the full chunks and the rest)."""
    width = math.gcd(x.size, CHUNK_ELEMENTS)
    total, per = x.size // width, max(CHUNK_ELEMENTS // width, 1)
    sums, finite = jnp.zeros(2, jnp.uint32), jnp.bool_(True)
    for start in range(0, total, per):
        s, f = _chunk(x, jnp.int32(start), width, min(per, total - start))
        sums, finite = sums + s, finite & f
    return sums, finite


def _leaves(tree) -> list[jax.Array]:
    return [x if hasattr(x, "dtype") else jnp.asarray(x) for x in jax.tree.leaves(tree)]


def digest(tree) -> list[list[int]]:
    """Two position-weighted uint32 sums per leaf (``_sums``), computed on device (sharded arrays included) with
    temporaries of at most a few chunks: any one changed element changes both."""
    leaves = _leaves(tree)
    small = [i for i, x in enumerate(leaves) if x.size <= CHUNK_ELEMENTS]
    rows = dict(zip(small, _small_digest([leaves[i] for i in small]), strict=True))
    rows.update({i: _large_leaf(x)[0] for i, x in enumerate(leaves) if i not in rows})
    sums = jnp.stack([rows[i] for i in range(len(leaves))]) if leaves else np.zeros((0, 2))
    return np.asarray(jax.device_get(sums)).astype(np.int64).tolist()


def all_finite(tree) -> bool:
    """Whether every float in ``tree`` is finite (sharded arrays included; large leaves a chunk at a time)."""
    leaves = [x for x in _leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = _small_finite([x for x in leaves if x.size <= CHUNK_ELEMENTS])
    for x in leaves:
        if x.size > CHUNK_ELEMENTS:
            finite = finite & _large_leaf(x)[1]
    return bool(finite)


def state_bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, reserve_mb: float = 0.0, name=""):
        self.directory = Path(os.path.abspath(directory))
        self.name = name or self.directory.parent.name
        self.reserve_mb = reserve_mb
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # a save cut short by a kill or a full disk leaves a tmp folder
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        except OSError as e:
            raise os_error(e, self.directory) from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def last_good(self) -> str:
        """Where a rerun resumes from, for messages."""
        step = self.latest_step()
        if step is None:
            return f"none yet in {self.directory} (a rerun starts the {self.name} stage afresh)"
        return f"step {step} in {self.directory}"

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Asynchronous save (every ``every`` steps, or now with ``force``); returns whether one started.
        Refuses with ``DiskFullError`` (before writing anything) when the disk cannot hold the checkpoint."""
        if not force and not self.manager.should_save(step):
            return False
        self.wait()  # the previous save's files are on disk: the free space below is real
        if not all_finite(state):  # never a "last good" checkpoint that is not
            raise NonFiniteLoss(
                f"[{self.name}] the state of step {step} holds NaN/Inf values: not saved. Last good checkpoint: "
                f"{self.last_good()}"
            )
        # Orbax's files are about the arrays' size plus metadata; the slack keeps its writer clear of ENOSPC (which
        # it reports from background threads, tracebacks and all).
        needed = int(state_bytes(state) * 1.05) + SAVE_SLACK_BYTES
        ensure_free_space(self.directory, needed, f"the checkpoint of step {step}", self.reserve_mb)
        meta = {**meta, "digest": digest(state)}
        if jax.process_index() == 0:  # this checkpoint is made with the current config: it becomes the record
            promote_pending_record(self.directory.parent)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._bytes = state_bytes(state)
        try:
            return self.manager.save(step, args=args, force=force)
        except OSError as e:
            raise os_error(e, self.directory, needed=self._bytes) from e

    def restore(self, step: int, abstract_state):
        """``abstract_state``: ``jax.ShapeDtypeStruct`` leaves carrying the target shardings."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return out["state"], out["meta"]

    def _problem(self, state, meta) -> str | None:
        saved = meta.get("digest")
        if saved is not None and saved != digest(state):
            return "its contents do not match the digest written when it was saved"
        if not all_finite(state):
            return "it holds NaN/Inf values"
        return None

    def layout_change(self, step: int, abstract_state) -> str | None:
        """What differs between the arrays (shapes, dtypes) saved at ``step`` and those ``abstract_state`` asks for,
        read from the checkpoint's metadata; None when they agree or the metadata cannot be read."""
        try:
            saved = self.manager.item_metadata(step)["state"]
            have = Counter((tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(saved) if hasattr(m, "shape"))
        except Exception:  # unreadable metadata: the files are damaged, not the config changed
            return None
        want = Counter((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(abstract_state))
        if have == want:
            return None
        extra, missing = sorted((have - want).elements()), sorted((want - have).elements())
        return f"it holds arrays {extra[:3]} where this config makes {missing[:3]}"

    def restore_step(self, step: int, abstract_state):
        """(state, meta) of ``step`` if it is intact; else it is moved aside (one line) and None is returned. A
        checkpoint whose arrays have other shapes than the config makes is not damaged: that is a ``WorkdirError``
        (the config changed), and nothing is moved."""
        try:
            state, meta = self.restore(step, abstract_state)
            problem = self._problem(state, meta)
        except Exception as e:  # a truncated / missing / unparsable file: Orbax and TensorStore errors vary
            change = self.layout_change(step, abstract_state)
            if change is not None:
                raise WorkdirError(
                    f"checkpoint step {step} in {self.directory} was made with another config ({change}): rerun "
                    "with the config it was made with, or use a new --workdir"
                ) from None
            problem = f"it cannot be read ({one_line(e).split(' See full')[0][:160]})"
        if problem is None:
            return state, meta
        aside = self.move_aside(step, "damaged")
        older = [s for s in self.manager.all_steps() if s < step]
        then = f"falling back to step {max(older)}" if older else "no older checkpoint: starting the stage afresh"
        print(f"[{self.name}] checkpoint step {step} is damaged ({problem}); moved to {aside}; {then}", flush=True)
        return None

    def move_aside(self, step: int, why: str) -> Path:
        """Rename step ``step``'s folder to ``<why>-<step>`` (process 0; every process waits for it)."""
        aside = self.directory / f"{why}-{step}"
        if jax.process_index() == 0:
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(self.directory / str(step), aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"{why}-{step}")
        self.manager.reload()
        return aside

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state):
        """(step, state, meta) of the newest intact checkpoint, or None; damaged steps are moved aside."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            restored = self.restore_step(step, abstract_state)
            if restored is not None:
                return step, *restored
        return None

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except OSError as e:  # an asynchronous save failed (e.g. the disk filled up while it wrote)
            raise os_error(e, self.directory, needed=getattr(self, "_bytes", None)) from e
        except ValueError as e:  # TensorStore reports ENOSPC as RESOURCE_EXHAUSTED
            if "No space left" not in str(e):
                raise
            raise os_error(OSError(errno.ENOSPC, str(e)), self.directory, needed=getattr(self, "_bytes", None)) from e

    def close(self):
        self.wait()
        self.manager.close()


def restore_common(ckpts: list[Checkpointer], abstract_state):
    """(step, [(state, meta)] per checkpointer) at the newest step every one of them holds intact, or None. A
    population killed between two members' saves has members at different steps: it resumes from the newest step
    they share, and a member's newer checkpoints are moved aside to ``ahead-<step>`` (they are redone)."""
    while True:
        common = set.intersection(*(set(c.steps()) for c in ckpts))
        step = max(common) if common else None
        ahead = [(c, s) for c in ckpts for s in c.steps() if step is None or s > step]
        if ahead:
            where = f"from step {step}, the newest they share" if common else "afresh: they share no step"
            print(
                f"[{ckpts[0].name}] the members' checkpoints are at steps {[c.latest_step() for c in ckpts]}: "
                f"resuming {where}; {len(ahead)} newer member checkpoints moved to ahead-<step>",
                flush=True,
            )
            for c, s in ahead:
                c.move_aside(s, "ahead")
        if step is None:
            return None
        out = []
        for c in ckpts:
            restored = c.restore_step(step, abstract_state)
            if restored is None:  # damaged (moved aside): look for an older shared step
                break
            out.append(restored)
        else:
            return step, out


def latest_step_on_disk(directory: str | os.PathLike) -> int | None:
    """The newest committed step in a checkpoint folder, without opening a manager (Orbax names a step's folder
    by its number only once the save is complete)."""
    d = Path(directory)
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return max(steps) if steps else None


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
