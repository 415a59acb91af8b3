"""Batch layouts: padded or packed rows, the prompt once or twice per pair, and the scored-token index.

Shape letters: G groups (rows of a packed batch, pairs of a padded one), K rows per group, T row length,
P pairs per group, Z score blocks (consecutive runs of G / Z groups: one per device and micro-batch), S scored
entries per block.

Every layout is described by the same arrays (a ``dpo_jax.core.batch.Batch``), so one scoring function serves
all of them:
  tokens, positions, segment_ids, branch,  [G, K, T] int32  (segment 0 = padding; branch 0 = prompt, 1 =
  pair                                                       chosen, 2 = rejected; pair: the dataset row of the
                                                             token's pair, -1 = padding. (pair, branch, position)
                                                             names a token in every layout: its dropout mask)
  score_src, score_target, score_seq       [Z, S] int32     (entry e: the hidden state at flat slot
  score_mask                               [Z, S] float32    ``score_src`` of its block's (G/Z)*K*T slots
                                                             predicts token ``score_target`` of sequence
                                                             ``score_seq`` = 2 * (pair slot in the block) + side,
                                                             side 0 chosen / 1 rejected; pair slot = group in
                                                             the block * P + pair slot in the group)
  target_probs, weights, valid             [G, P] float32
  index                                    [G, P] int32     (dataset row; -1 = an empty pair slot)
The batch's fields carry these shapes in their names (``tokens_GxKxT``, ``score_src_ZxS``, ``valid_GxP``).

Layouts (``Layout.kind`` x ``Layout.share_prompt``):
  padded, unshared   G = pairs, K = 2: a chosen row and a rejected row, right-padded to a bucket length
  padded, shared     G = pairs, K = 1: prompt | chosen | rejected in one row
  packed, unshared   K = 1: whole pairs (two segments each) packed first-fit-decreasing into rows of T tokens
  packed, shared     K = 1: whole pairs (one segment each, prompt | chosen | rejected) packed into rows

In a shared row the rejected tokens see the prompt and themselves (not the chosen tokens), and their positions
continue from the prompt's end, so each completion's log-probs equal those of prompt + completion alone.
Static sizes (G of a packed batch, S, P) are rounded up to a few values so a run compiles few programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dpo_jax.core.batch import ROWS, SCORES, Batch
from dpo_jax.data.formats import DataError
from dpo_jax.data.tokenize import TokenizedPair

KINDS = ("packed", "padded")


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str = "packed"  # packed | padded
    share_prompt: bool = True
    row_length: int = 0  # packed: tokens per row; 0 = chosen from the data's lengths
    buckets: tuple[int, ...] = (64, 128, 256, 512)  # padded: row lengths
    scored_only: bool = True  # False: the LM head runs on every slot (the old cost; for comparison)
    sides: int = 2  # 2 = chosen and rejected; 1 = chosen only (SFT)
    row_multiple: int = 1  # a packed batch's G is a multiple of this (data-parallel devices x grad_accum)
    # packed, row_length 0: the cost of one (query, key) slot of a row's attention relative to a token's (the model
    # computes every slot of a row, so long rows of many short pairs pay for attention across pairs)
    attention_cost: float = 0.0
    # at most this many static batch shapes (programs) for the run's batches, chosen from a sample of its steps
    # (``shape_templates``); a batch that fits none takes its own grid-rounded shape. 0: grid-rounded shapes only
    max_shapes: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"layout kind must be one of {KINDS}; got {self.kind!r}")
        if self.sides not in (1, 2):
            raise ValueError(f"sides must be 1 or 2; got {self.sides}")

    @property
    def shared(self) -> bool:
        return self.share_prompt and self.sides == 2

    @property
    def rows_per_group(self) -> int:
        return 2 if self.kind == "padded" and not self.shared and self.sides == 2 else 1


def unit_length(pair: TokenizedPair, layout: Layout) -> int:
    """Tokens a pair occupies in its group (the longer row of a padded, unshared pair)."""
    p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
    if layout.sides == 1:
        return p + c
    if layout.shared:
        return p + c + r
    return p + max(c, r) if layout.kind == "padded" else 2 * p + c + r


def scored_count(pair: TokenizedPair, layout: Layout) -> int:
    """Completion tokens scored (the first completion token has no predictor when the prompt is empty)."""
    n = len(pair.chosen) + (len(pair.rejected) if layout.sides == 2 else 0)
    return n - (layout.sides if len(pair.prompt) == 0 else 0)


def round_up(n: int, multiple: int = 1, steps_per_octave: int = 4) -> int:
    """``n`` rounded up to a multiple of ``multiple`` and then to a grid of ``steps_per_octave`` (a power of two)
    values per octave: m * 2^k * {1, 1.25, 1.5, 1.75} for 4."""
    n = max(int(n), 1)
    units = -(-n // multiple)
    shift = steps_per_octave.bit_length() - 1
    if units > steps_per_octave:
        k = 1 << (units.bit_length() - 1 - shift)
        units = -(-units // k) * k
    return units * multiple


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing: lists of positions into ``lengths``; each row's total is at most ``row_length``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > row_length:
            raise DataError(f"a pair of {n} tokens does not fit a packed row of data.pack_length={row_length}")
        j = next((j for j, f in enumerate(free) if f >= n), None)
        if j is None:
            rows.append([i])
            free.append(row_length - n)
        else:
            rows[j].append(i)
            free[j] -= n
    return rows


def auto_row_length(
    lengths: np.ndarray, batch_size: int, row_multiple: int, seed: int = 0, attention_cost: float = 0.0
) -> int:
    """The packed row length of least cost on sample batches of the data: rows x T x (1 + attention_cost x T),
    the tokens' work plus the attention every slot of a row pays (ties within 2%: the shortest). With
    ``attention_cost`` 0, the best packing efficiency."""
    longest = int(lengths.max())
    rng = np.random.default_rng(seed)
    samples = [rng.choice(lengths, size=min(batch_size, len(lengths)), replace=False) for _ in range(16)]
    best, best_cost = 0, float("inf")
    for factor in (1, 1.5, 2, 3, 4, 6, 8):
        t = -(-int(longest * factor) // 8) * 8
        rows = np.mean([round_up(len(pack_rows(list(s), t)), row_multiple) for s in samples])
        cost = rows * t * (1 + attention_cost * t)
        if cost < best_cost * 0.98:
            best, best_cost = t, cost
    return best


def plan_groups(pairs: Sequence[TokenizedPair | None], layout: Layout, row_length: int) -> list[list[int]]:
    """Positions of the (non-None) pairs in each group, in slot order."""
    real = [i for i, p in enumerate(pairs) if p is not None]
    if layout.kind == "padded":
        return [[i] if pairs[i] is not None else [] for i in range(len(pairs))]
    lengths = [unit_length(pairs[i], layout) for i in real]
    return [[real[j] for j in row] for row in pack_rows(lengths, row_length)]


def shape_templates(needs: Sequence[tuple[int, ...]], count: int, weights: tuple[float, ...]) -> list[tuple[int, ...]]:
    """At most ``count`` static shapes for batches whose sizes are ``needs`` (one tuple per sampled step): with the
    steps ordered by cost (``weights`` . need), nested templates, each the element-wise maximum of the steps up to a
    cut, so each step fits the first template that holds it and the last holds them all. The cuts minimise the
    padded cost of the sample (dynamic programming over the ordered steps)."""
    cost = lambda n: float(np.dot(weights, n))  # noqa: E731
    ordered = np.asarray(sorted(needs, key=cost))
    prefix = np.maximum.accumulate(ordered, axis=0)  # the template that ends at each step
    unit = prefix @ np.asarray(weights, float)  # its cost per step
    n = len(ordered)
    best = np.full((count + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    cut = np.zeros((count + 1, n + 1), int)
    for k in range(1, count + 1):
        for j in range(1, n + 1):  # steps [i, j) take the template that ends at step j - 1
            totals = best[k - 1, :j] + (j - np.arange(j)) * unit[j - 1]
            cut[k, j] = int(np.argmin(totals))
            best[k, j] = totals[cut[k, j]]
    k = int(np.argmin(best[1:, n])) + 1
    ends, j = [], n
    while j > 0:
        ends.append(j - 1)
        j, k = cut[k, j], k - 1
    return list(dict.fromkeys(tuple(int(v) for v in prefix[e]) for e in sorted(ends)))


def _place(seq_tokens, out, g, k, start, segment, branch, positions, pair):
    n = len(seq_tokens)
    out["tokens_GxKxT"][g, k, start : start + n] = seq_tokens
    out["positions_GxKxT"][g, k, start : start + n] = positions
    out["segment_ids_GxKxT"][g, k, start : start + n] = segment
    out["branch_GxKxT"][g, k, start : start + n] = branch
    out["pair_GxKxT"][g, k, start : start + n] = pair


def materialize(
    pairs: Sequence[TokenizedPair | None],
    indices: Sequence[int],
    groups: list[list[int]],
    layout: Layout,
    *,
    num_blocks: int,
    length: int,
    scored: int,
    pairs_per_group: int,
    pad_id: int,
) -> Batch:
    """The batch of ``groups`` (lists of positions into ``pairs``; as many as the batch has groups), padded to the
    given static sizes; ``num_blocks`` must divide the number of groups."""
    g_, k_, t_, s_, p_ = len(groups), layout.rows_per_group, length, scored, pairs_per_group
    per_block = g_ // num_blocks
    out = {key: np.zeros((g_, k_, t_), np.int32) for key in ROWS}
    out["tokens_GxKxT"][:] = pad_id
    out["pair_GxKxT"][:] = -1
    for key in SCORES:
        out[key] = np.zeros((num_blocks, s_), np.float32 if key == "score_mask_ZxS" else np.int32)
    out["target_probs_GxP"] = np.ones((g_, p_), np.float32)
    out["weights_GxP"] = np.zeros((g_, p_), np.float32)
    out["valid_GxP"] = np.zeros((g_, p_), np.float32)
    out["index_GxP"] = np.full((g_, p_), -1, np.int32)
    entries: list[tuple[list, list, list]] = [([], [], []) for _ in range(num_blocks)]
    for g, group in enumerate(groups):
        src, tgt, seq = entries[g // per_block]
        offset = (g % per_block) * k_ * t_  # this group's first slot in its block
        pair0 = (g % per_block) * p_  # this group's first pair slot in its block
        cursor = 0
        for slot, i in enumerate(group):
            pair = pairs[i]
            prompt, p = pair.prompt, len(pair.prompt)
            completions = (pair.chosen, pair.rejected)[: layout.sides]
            if layout.shared:  # one segment: prompt (branch 0), chosen (1), rejected (2)
                base = cursor
                _place(prompt, out, g, 0, base, slot + 1, 0, np.arange(p), indices[i])
                cursor += p
                for side, comp in enumerate(completions):
                    c = len(comp)
                    _place(comp, out, g, 0, cursor, slot + 1, side + 1, p + np.arange(c), indices[i])
                    prev = np.concatenate([[base + p - 1], cursor + np.arange(c - 1)]) if c else np.zeros(0, int)
                    keep = prev >= base  # an empty prompt leaves the first token unpredicted
                    src += list(offset + prev[keep])
                    tgt += list(comp[keep])
                    seq += [2 * (pair0 + slot) + side] * int(keep.sum())
                    cursor += c
            else:  # a segment per sequence: prompt (branch 0) + completion (side + 1)
                for side, comp in enumerate(completions):
                    k = side if k_ == 2 else 0
                    start = 0 if k_ == 2 else cursor
                    full = np.concatenate([prompt, comp])
                    segment = slot + 1 if k_ == 2 else layout.sides * slot + side + 1
                    _place(prompt, out, g, k, start, segment, 0, np.arange(p), indices[i])
                    _place(comp, out, g, k, start + p, segment, side + 1, p + np.arange(len(comp)), indices[i])
                    first = max(p, 1)
                    src += list(offset + k * t_ + start + np.arange(first - 1, len(full) - 1))
                    tgt += list(full[first:])
                    seq += [2 * (pair0 + slot) + side] * (len(full) - first)
                    if k_ == 1:
                        cursor += len(full)
            out["target_probs_GxP"][g, slot] = pair.prob
            out["weights_GxP"][g, slot] = pair.weight
            out["valid_GxP"][g, slot] = 1.0
            out["index_GxP"][g, slot] = indices[i]
    for z, (src, tgt, seq) in enumerate(entries):
        n = len(src)
        out["score_src_ZxS"][z, :n] = src
        out["score_target_ZxS"][z, :n] = tgt
        out["score_seq_ZxS"][z, :n] = seq
        out["score_mask_ZxS"][z, :n] = 1.0
    return Batch(**out)


def block_scored(pairs, groups, layout: Layout, num_blocks: int) -> int:
    """The most scored entries in one block."""
    per_block = len(groups) // num_blocks
    counts = [sum(scored_count(pairs[i], layout) for i in g) for g in groups]
    return max(sum(counts[z * per_block : (z + 1) * per_block]) for z in range(num_blocks))


def most_pairs(groups) -> int:
    return max((len(g) for g in groups), default=1)


def batch_stats(batch: Batch) -> dict[str, float]:
    """Real tokens, slots, scored tokens and pairs of a (local) batch: the throughput accounting's inputs."""
    real = float((batch.segment_ids_GxKxT > 0).sum())
    return {
        "real_tokens": real,
        "slots": float(batch.segment_ids_GxKxT.size),
        "scored_tokens": float(batch.score_mask_ZxS.sum()),
        "head_entries": float(batch.score_mask_ZxS.size),
        "pairs": float(batch.valid_GxP.sum()),
        "attended_keys": float(_attended_keys(batch)),
    }


def _attended_keys(batch: Batch) -> int:
    """Sum over real tokens of the keys each attends to (causal, its segment, shared prefix + own branch)."""
    seg = batch.segment_ids_GxKxT.reshape(-1, batch.segment_ids_GxKxT.shape[-1])
    br = batch.branch_GxKxT
    br = br.reshape(seg.shape)
    total = 0
    for s_row, b_row in zip(seg, br, strict=True):
        for s in np.unique(s_row[s_row > 0]):
            b = b_row[s_row == s]
            prefix = int((b == 0).sum())
            total += prefix * (prefix + 1) // 2
            for v in np.unique(b[b > 0]):
                n = int((b == v).sum())
                total += n * prefix + n * (n + 1) // 2
    return total
