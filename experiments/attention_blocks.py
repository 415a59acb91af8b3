"""The work each attention kernel does on the default layout: (query block, key block) pairs computed for a row of
one pair (the prompt half, each completion a quarter, the prompt shared), blocks of ``--block`` tokens.

- **blockwise** (``attention.block_bounds``): each query block reads one range of key blocks (causal, from its
  segment's start), so a rejected completion's queries read the chosen completion's blocks and mask them;
- **flashmask** (``flashmask.block_tables``): the lists of key blocks some query may see;
- **splash** (its own mask info: the blocks its static causal mask does not skip), once per pass: two on shared
  rows (a completion's own run, its prompt's keys).

Counts, not times: what a GPU or TPU computes (each block pair is the same matmuls); no accelerator is needed.

    python experiments/attention_blocks.py --rows 4096,16384
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from dpo_jax.models import attention, flashmask, splash
from dpo_jax.models.attention import Ids


def pair_row(row: int) -> Ids:
    """One pair's ids: prompt (half), chosen and rejected (a quarter each), positions continuing from the prompt."""
    p, c = row // 2, row // 4
    branch = np.concatenate([np.zeros(p), np.ones(c), np.full(row - p - c, 2)]).astype(np.int32)
    position = np.concatenate([np.arange(p + c), p + np.arange(row - p - c)]).astype(np.int32)
    as_row = lambda x: jnp.asarray(x)[None]  # noqa: E731
    return Ids(as_row(np.arange(row, dtype=np.int32)), as_row(np.ones(row, bool)), as_row(np.ones(row, np.int32)),
               as_row(branch), as_row(position))  # fmt: skip


def block_pairs(row: int, block: int) -> dict[str, int]:
    ids = pair_row(row)
    n = row // block
    one = Ids(*(x[0] for x in ids))
    lo, hi = attention.block_bounds(one, one, block, block, n, n)
    blockwise = int(jnp.sum(jnp.maximum(hi - lo + 1, 0)))
    ends = flashmask.key_ends(ids)[0]
    table, _ = flashmask.block_tables(ends, one.slot, one.position, one.valid, one.slot, one.position, one.valid,
                                      None, block)  # fmt: skip
    kernel = splash.splash_kernel(row, row, 1, block, None, True, True)
    per_pass = int(np.count_nonzero(np.asarray(kernel.fwd_mask_info.block_mask)[0]))
    passes = len(splash.pass_ids(ids))
    return dict(causal=n * (n + 1) // 2, blockwise=blockwise, flashmask=int(table[:, 0].sum()),
                splash=per_pass * passes)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="4096,16384", help="row lengths (tokens of one pair)")
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args(argv)
    print(
        f"| row tokens | blocks of {args.block} | causal block pairs | blockwise | flashmask | splash (both passes) |"
    )
    print("|---|---|---|---|---|---|")
    results = []
    for row in (int(r) for r in args.rows.split(",")):
        r = block_pairs(row, args.block)
        results.append(dict(row=row, **r))
        ratio = lambda name, r=r: f"{r[name]:,} ({r[name] / r['blockwise']:.2f}x)"  # noqa: E731
        print(f"| {row:,} | {row // args.block} | {r['causal']:,} | {r['blockwise']:,} | {ratio('flashmask')} | "
              f"{ratio('splash')} |")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
