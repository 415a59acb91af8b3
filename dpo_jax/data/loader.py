"""Fixed-shape preference batches: deterministic order, exact resume at any step, per-host shards.

Shape letters: B pairs in the (local) batch, L the bucket length, 2 = (chosen, rejected).

A batch is a dict of NumPy arrays:
  tokens, attention_mask, loss_mask, positions, segment_ids   [B, 2, L] int32
  target_probs, weights, valid                                [B] float32
  index                                                       [B] int32 (dataset row, -1 for padding)
``loss_mask`` marks completion tokens (score them with ``logprobs.next_token_targets``); ``segment_ids`` are
1 on real tokens and 0 on padding, and with ``positions`` they leave room for packed rows without changing
callers. ``tokens.reshape(2 * B, L)`` interleaves chosen and rejected (pair-major), so a batch-sharded array
stays sharded through the reshape: one concatenated forward, then ``logps[0::2]`` / ``logps[1::2]``.

Order: epoch ``e`` visits the rows in ``permutation(seed, e)``; step ``s`` is batch ``s % steps_per_epoch`` of
epoch ``s // steps_per_epoch``, so any step can be produced directly (exact resume). With P processes the
global batch of G pairs is split in P contiguous slices of G / P, one per process; bucket lengths are chosen
from the whole global batch so every process builds the same shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from dpo_jax.data.tokenize import TokenizedPair

ARRAY_KEYS = ("tokens", "attention_mask", "loss_mask", "positions", "segment_ids")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if longest <= b:
            return b
    raise ValueError(f"a sequence of {longest} tokens exceeds the largest bucket {max(buckets)}")


def collate(pairs: Sequence[TokenizedPair | None], length: int, pad_id: int, indices: Sequence[int]) -> dict:
    """Right-padded [B, 2, L] arrays; ``None`` entries are padding pairs (valid 0)."""
    b = len(pairs)
    out = {k: np.zeros((b, 2, length), np.int32) for k in ARRAY_KEYS}
    out["tokens"][:] = pad_id
    out["target_probs"] = np.ones((b,), np.float32)
    out["weights"] = np.zeros((b,), np.float32)
    out["valid"] = np.zeros((b,), np.float32)
    out["index"] = np.asarray(indices, np.int32)
    for i, pair in enumerate(pairs):
        if pair is None:
            continue
        for j, completion in enumerate((pair.chosen, pair.rejected)):
            seq = np.concatenate([pair.prompt, completion])
            n, p = len(seq), len(pair.prompt)
            out["tokens"][i, j, :n] = seq
            out["attention_mask"][i, j, :n] = 1
            out["loss_mask"][i, j, p:n] = 1
            out["positions"][i, j, :n] = np.arange(n)
            out["segment_ids"][i, j, :n] = 1
        out["target_probs"][i] = pair.prob
        out["weights"][i] = pair.weight
        out["valid"][i] = 1.0
    return out


@dataclasses.dataclass
class PreferenceLoader:
    """Batches of ``global_batch_size`` pairs; this process materialises only its slice."""

    pairs: Sequence[TokenizedPair]
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True  # training: fixed shapes; eval: False pads the last batch with valid = 0 rows
    buckets: Sequence[int] = (64, 128, 256, 512)
    pad_id: int = 0
    process_index: int = 0
    process_count: int = 1

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
        self._lengths = np.asarray([p.length for p in self.pairs])
        longest = int(self._lengths.max())
        if longest > max(self.buckets):
            self.buckets = (*self.buckets, longest)

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

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch at ``step``."""
        idx = self.global_indices(step)
        length = bucket_length(int(self._lengths[idx[idx >= 0]].max()), self.buckets)
        lo = self.process_index * self.local_batch_size
        local = idx[lo : lo + self.local_batch_size]
        return collate([self.pairs[i] if i >= 0 else None for i in local], length, self.pad_id, local)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, dict]]:
        """``(step, batch)`` from ``start_step``, across epochs, forever or for ``num_steps``."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.batch(step)
            step += 1

    def epoch(self, epoch: int = 0) -> Iterator[tuple[int, dict]]:
        """The batches of one epoch (e.g. a full eval pass)."""
        return self.iterate(epoch * self.steps_per_epoch, self.steps_per_epoch)


def to_global(batch: dict[str, np.ndarray], mesh) -> dict:
    """Assemble every process's local batch into global arrays sharded over the mesh's batch axes."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dpo_jax.sharding import BATCH_AXES

    def put(x):
        sharding = NamedSharding(mesh, P(BATCH_AXES, *([None] * (x.ndim - 1))))
        return jax.make_array_from_process_local_data(sharding, x)

    return {k: put(v) for k, v in batch.items()}
