"""Preference batches: deterministic order, exact resume at any step, per-host shards, packed or padded rows.

A batch holds ``global_batch_size`` pairs laid out as ``packing.Layout`` says (the arrays are described in
``dpo_jax.data.packing``): by default whole pairs packed into rows, the prompt once per pair, and only
completion tokens in the scored-token index.

Order: epoch ``e`` visits the rows in ``permutation(seed, e)``; step ``s`` is batch ``s % steps_per_epoch`` of
epoch ``s // steps_per_epoch``, so any step can be produced directly (exact resume). With P processes every
process plans the whole global batch (the same packing, the same static sizes) and materialises its contiguous
slice of G / P groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from dpo_jax.core.batch import PAIRS, REFERENCE, ROWS, Batch
from dpo_jax.data import packing
from dpo_jax.data.packing import Layout
from dpo_jax.data.tokenize import TokenizedPair
from dpo_jax.infra.sharding import batch_shardings, batch_slice


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if longest <= b:
            return b
    raise ValueError(f"a sequence of {longest} tokens exceeds the largest bucket {max(buckets)}")


@dataclasses.dataclass
class PreferenceLoader:
    """Batches of ``global_batch_size`` pairs; this process materialises only its slice."""

    pairs: Sequence[TokenizedPair]
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True  # training: fixed pair count; eval: False pads the last batch with empty pair slots
    layout: Layout = dataclasses.field(default_factory=Layout)
    pad_id: int = 0
    process_index: int = 0
    process_count: int = 1
    # the reference's cached log-probs of ``pairs`` ([N, 2] sums, or [N, 4] with LD-DPO tails): every batch carries
    # its pairs' values (``Batch.ref_logps_GxPx2``); None: none attached
    reference: np.ndarray | None = None
    # static shapes (groups, row length, scored entries per block, pairs per group) a batch takes, the first that
    # holds it (else its own): a caller that knows the worst case (the online loader) compiles one step
    shapes: Sequence[tuple[int, int, int, int]] = ()

    def __post_init__(self):
        n, g = len(self.pairs), self.global_batch_size
        if g <= 0 or g % self.process_count:
            raise ValueError(
                f"global_batch_size ({g}) must be a positive multiple of process_count ({self.process_count})"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} outside [0, {self.process_count})")
        if n == 0 or (self.drop_last and n < g):
            raise ValueError(f"{n} pairs cannot fill one batch of {g}")
        lay = self.layout
        self._units = np.asarray([packing.unit_length(p, lay) for p in self.pairs])
        longest = int(self._units.max())
        if lay.kind == "padded" and longest > max(lay.buckets):
            self.layout = lay = dataclasses.replace(lay, buckets=(*lay.buckets, longest))
        self._multiple = math.lcm(lay.row_multiple, self.process_count)
        self._templates = None
        if lay.kind == "padded" and g % self._multiple:
            raise ValueError(f"a padded batch of {g} pairs does not split into {self._multiple} devices/micro-batches")
        self.row_length = 0
        if lay.kind == "packed":
            self.row_length = lay.row_length or packing.auto_row_length(
                self._units, min(g, n), self._multiple, self.seed, lay.attention_cost
            )
            if longest > self.row_length:
                raise packing.DataError(
                    f"a pair of {longest} tokens does not fit a packed row of data.pack_length={self.row_length}: "
                    "raise data.pack_length (or set 0 to choose it from the data)"
                )

    def describe(self) -> str:
        lay = self.layout
        prompt = "prompt shared" if lay.shared else "prompt per completion"
        if lay.kind == "packed":
            return f"{self.global_batch_size} pairs packed into rows of {self.row_length} tokens, {prompt}"
        return f"{self.global_batch_size} pairs, padded to {sorted(lay.buckets)}, {prompt}"

    @property
    def steps_per_epoch(self) -> int:
        n, g = len(self.pairs), self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset rows of the global batch at ``step`` (-1 = padding)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.pairs), self.seed, epoch, self.shuffle)
        idx = order[k * self.global_batch_size : (k + 1) * self.global_batch_size]
        return np.pad(idx, (0, self.global_batch_size - len(idx)), constant_values=-1)

    def needs(self, step: int) -> tuple[dict, tuple[int, int, int, int]]:
        """The global batch's groups and its own grid-rounded sizes (groups, row length, scored entries per block,
        pairs per group)."""
        lay = self.layout
        idx = self.global_indices(step)
        pairs = [self.pairs[i] if i >= 0 else None for i in idx]
        if lay.kind == "padded":
            length = bucket_length(int(self._units[idx[idx >= 0]].max()), lay.buckets)
        else:
            length = self.row_length
        groups = packing.plan_groups(pairs, lay, length)
        num_groups = len(groups) if lay.kind == "padded" else packing.round_up(len(groups), self._multiple)
        blocks = self._multiple  # one per (device, micro-batch); divides the number of groups
        groups = groups + [[] for _ in range(num_groups - len(groups))]
        if lay.scored_only:
            scored = packing.round_up(packing.block_scored(pairs, groups, lay, blocks), 8, steps_per_octave=8)
        else:
            scored = num_groups // blocks * lay.rows_per_group * length
        per_group = 1 if lay.kind == "padded" else packing.round_up(packing.most_pairs(groups))
        return dict(idx=idx, pairs=pairs, groups=groups, blocks=blocks), (num_groups, length, scored, per_group)

    def templates(self) -> list[tuple[int, int, int, int]]:
        """The run's static shapes (``Layout.max_shapes``), from up to 256 steps spread over two epochs (the same on
        every process and every resume: a function of the data, the seed and the layout)."""
        if self._templates is None:
            lay = self.layout
            span = 2 * self.steps_per_epoch if self.shuffle else self.steps_per_epoch
            steps = np.unique(np.linspace(0, span - 1, min(256, span)).astype(int))
            needs = [self.needs(int(s))[1] for s in steps]
            weights = (lay.rows_per_group * max(n[1] for n in needs), 0.0, 1.0 * self._multiple, 0.0)  # G*T + S
            self._templates = packing.shape_templates(needs, lay.max_shapes, weights)
        return self._templates

    def plan(self, step: int) -> dict:
        """The global batch's groups and static sizes (identical on every process)."""
        plan, need = self.needs(step)
        if self.shapes or self.layout.max_shapes:  # the first template that holds this batch, else its own shape
            templates = self.shapes or self.templates()
            need = next((t for t in templates if all(a >= b for a, b in zip(t, need, strict=True))), need)
        num_groups, length, scored, per_group = need
        # a template with more groups: empty groups at the end of every block, so each block holds the pairs (and
        # the scored entries) it holds in the batch's own shape
        groups, z = plan["groups"], plan["blocks"]
        per, extra = len(groups) // z, (num_groups - len(groups)) // z
        plan["groups"] = [g for b in range(z) for g in (*groups[b * per : (b + 1) * per], *([] for _ in range(extra)))]
        return dict(**plan, length=length, scored=scored, pairs_per_group=per_group)

    def batch(self, step: int) -> Batch:
        """This process's slice of the global batch at ``step`` (with the reference's values of its pairs)."""
        p = self.plan(step)
        local = len(p["groups"]) // self.process_count
        lo = self.process_index * local
        batch = packing.materialize(
            p["pairs"], p["idx"], p["groups"][lo : lo + local], self.layout,
            num_blocks=p["blocks"] // self.process_count, length=p["length"], scored=p["scored"],
            pairs_per_group=p["pairs_per_group"], pad_id=self.pad_id,
        )  # fmt: skip
        return batch if self.reference is None else batch.with_reference(self.reference)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, Batch]]:
        """``(step, batch)`` from ``start_step``, across epochs, forever or for ``num_steps``."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.batch(step)
            step += 1

    def epoch(self, epoch: int = 0) -> Iterator[tuple[int, Batch]]:
        """The batches of one epoch (e.g. a full eval pass)."""
        return self.iterate(epoch * self.steps_per_epoch, self.steps_per_epoch)


def pad_batches(batches: Sequence[Batch]) -> list[Batch]:
    """Pad batches of one layout (the same number of score blocks) to common static sizes: vectorised members
    whose batches differ. Groups are padded within each block, and the score indices re-addressed."""
    z = batches[0].score_src_ZxS.shape[0]
    g = max(b.tokens_GxKxT.shape[0] for b in batches)
    k, t = batches[0].tokens_GxKxT.shape[1], max(b.tokens_GxKxT.shape[2] for b in batches)
    p = max(b.valid_GxP.shape[1] for b in batches)
    s = max(b.score_src_ZxS.shape[1] for b in batches)

    rest = {key: (k, t) for key in ROWS} | {key: (p,) for key in PAIRS} | {key: (p, 2) for key in REFERENCE}

    def group_array(key, x):  # [G, ...] -> per block [Z, G / Z, ...], padded, back to [G', ...]
        fill = -1 if key in ("index_GxP", "pair_GxKxT") else (1 if key == "target_probs_GxP" else 0)
        x = x.reshape(z, x.shape[0] // z, *x.shape[1:])
        new = (z, g // z, *rest[key])
        x = np.pad(x, [(0, n - d) for n, d in zip(new, x.shape, strict=True)], constant_values=fill)
        return x.reshape(g, *x.shape[2:])

    out = []
    for b in batches:
        tb, pb = b.tokens_GxKxT.shape[2], b.valid_GxP.shape[1]
        group, within = np.divmod(b.score_src_ZxS, k * tb)
        row, slot = np.divmod(within, tb)
        pair, side = np.divmod(b.score_seq_ZxS, 2)
        group_p, pslot = np.divmod(pair, pb)
        moved = {
            "score_src_ZxS": group * k * t + row * t + slot,
            "score_seq_ZxS": 2 * (group_p * p + pslot) + side,
            "score_target_ZxS": b.score_target_ZxS,
            "score_mask_ZxS": b.score_mask_ZxS,
        }
        padded = {key: np.pad(v, [(0, 0), (0, s - v.shape[1])]) for key, v in moved.items()}
        padded.update({key: group_array(key, v) for key, v in b.arrays().items() if key not in moved})
        out.append(Batch(**padded))
    return out


def stack(batches: Sequence[Batch]) -> Batch:
    """Members' own batches (of one shape) as one with a leading member axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def to_global(batch: Batch, mesh, *, members: bool = False) -> Batch:
    """Assemble every process's slice of a batch (``sharding.batch_slice``) into global arrays split over the
    mesh's batch axes; ``members``: arrays [M, ...] of members' own batches, also split over ``member``."""
    index, count = batch_slice(mesh)
    ax = 1 if members else 0

    def put(x, sh):
        shape = list(x.shape)
        shape[ax] *= count
        offset = index * x.shape[ax]

        def local(idx):
            idx = list(idx)
            s = idx[ax]
            idx[ax] = slice((s.start or 0) - offset, (shape[ax] if s.stop is None else s.stop) - offset)
            return x[tuple(idx)]

        return jax.make_array_from_callback(tuple(shape), sh, local)

    return jax.tree.map(put, batch, batch_shardings(mesh, batch, members=members))
