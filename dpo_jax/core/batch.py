"""The batch every layout produces: one typed pytree, built by the loader (``dpo_jax.data.loader``).

Shape letters: G groups (rows of a packed batch, pairs of a padded one), K rows per group, T row length, Z score
blocks (one per device and micro-batch), S scored entries per block, P pair slots per group. A population whose
members draw their own batches stacks them: every field then has a leading member axis [M, ...].
``dpo_jax.data.packing`` describes what each field holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import numpy as np

Array = Any  # NumPy on the host, jax.Array on devices

ROWS = ("tokens_GxKxT", "positions_GxKxT", "segment_ids_GxKxT", "branch_GxKxT", "pair_GxKxT")
SCORES = ("score_src_ZxS", "score_target_ZxS", "score_seq_ZxS", "score_mask_ZxS")
PAIRS = ("target_probs_GxP", "weights_GxP", "valid_GxP", "index_GxP")
REFERENCE = ("ref_logps_GxPx2", "ref_tails_GxPx2")


@flax.struct.dataclass
class Batch:
    """Token rows, the scored-token index and per-pair values; the reference's log-probs once attached."""

    tokens_GxKxT: Array  # int32 token ids (pad where segment 0)
    positions_GxKxT: Array  # int32 RoPE positions
    segment_ids_GxKxT: Array  # int32: 0 = padding, then one id per packed sequence
    branch_GxKxT: Array  # int32: 0 = prompt, 1 = chosen, 2 = rejected
    pair_GxKxT: Array  # int32: the dataset row of the token's pair (-1 = padding)
    score_src_ZxS: Array  # int32: the block's flat slot whose hidden state predicts the entry's token
    score_target_ZxS: Array  # int32: the predicted token
    score_seq_ZxS: Array  # int32: 2 * pair slot in the block + side (0 chosen, 1 rejected)
    score_mask_ZxS: Array  # float32: 1 for real entries
    target_probs_GxP: Array  # float32: P(chosen beats rejected); KTO: the label
    weights_GxP: Array  # float32: the pair's weight
    valid_GxP: Array  # float32: 1 for a real pair slot
    index_GxP: Array  # int32: the dataset row (-1 = an empty slot)
    ref_logps_GxPx2: Array | None = None  # float32 cached reference log-probs (chosen, rejected)
    ref_tails_GxPx2: Array | None = None  # float32 their tails past the shorter completion (LD-DPO)

    def arrays(self) -> dict[str, Array]:
        """The fields that hold arrays, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def of(cls, arrays: dict[str, Array]) -> Batch:
        return cls(**arrays)

    def with_reference(self, cache) -> Batch:
        """The cached reference values of the batch's pairs (``cache``: [N, 2] log-prob sums, or [N, 4] with their
        LD-DPO tails), zero in empty slots."""
        index, valid = np.asarray(self.index_GxP), np.asarray(self.valid_GxP)
        values = cache[np.maximum(index, 0)] * valid[..., None]
        tails = values[..., 2:] if cache.shape[1] == 4 else None
        return self.replace(ref_logps_GxPx2=values[..., :2], ref_tails_GxPx2=tails)
