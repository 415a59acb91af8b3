"""Attention memory against row length: the einsum (every score of the row at once) beside the blockwise kernel.

XLA's memory analysis of one compiled forward + backward (nothing is run, so rows the einsum cannot hold are
measured too): a 2-layer decoder, hidden 512, 8 query / 2 key-value heads, bfloat16 compute, full remat, one
packed row of 1k-32k tokens (sequences of 1k tokens, the prompt shared by two completions as the default layout
packs pairs), the loss a mean over the final hidden states. Prints the temporaries of each and their growth per
doubling of the row; ``--time`` also runs the rows both can hold (float32 on a CPU: XLA:CPU computes bfloat16 in
float32 anyway) and prints the median of 5 forward + backward passes.

    python experiments/attention_memory.py                       # 1k .. 8k, both; then blockwise to 32k
    python experiments/attention_memory.py --lengths 1024,2048 --block 256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import ModelConfig, init_decoder


def packed_row(t: int, pair: int = 1024):
    """Ids of one row of ``t`` tokens: pairs of ``pair`` tokens (prompt 512 | chosen 256 | rejected 256)."""
    n = t // pair
    seg = np.repeat(np.arange(1, n + 1), pair)
    p, c = pair // 2, pair // 4
    one_pos = np.concatenate([np.arange(p + c), p + np.arange(pair - p - c)])
    one_branch = np.concatenate([np.zeros(p), np.ones(c), np.full(pair - p - c, 2)])
    return (jnp.asarray(seg[None], jnp.int32), jnp.asarray(np.tile(one_pos, n)[None], jnp.int32),
            jnp.asarray(np.tile(one_branch, n)[None], jnp.int32))  # fmt: skip


def gradient(t: int, implementation: str, block: int, dtype: str = "bfloat16"):
    """(jitted gradient of the row's loss, abstract parameters, a function making real ones)."""
    cfg = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=2, num_heads=8,
                      num_kv_heads=2, dtype=dtype, remat="full", attention=implementation,
                      attention_block=block)  # fmt: skip
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_decoder(cfg)))
    seg, pos, branch = packed_row(t)
    tokens = jnp.zeros((1, t), jnp.int32)

    def loss(params):
        out = nnx.merge(graphdef, params)(tokens, positions_BxT=pos, segment_ids_BxT=seg, branch_ids_BxT=branch,
                                          attention_mask_BxT=seg > 0, return_logits=False)  # fmt: skip
        return jnp.mean(out.hidden_BxTxD.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss)), params, lambda: nnx.state(init_decoder(cfg))


def temporaries_mib(t: int, implementation: str, block: int) -> float:
    grad, params, _ = gradient(t, implementation, block)
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes / 2**20


def median_ms(t: int, implementation: str, block: int) -> float:
    grad, _, make = gradient(t, implementation, block, dtype="float32")
    params = make()
    jax.block_until_ready(grad(params))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="rows measured with both implementations")
    parser.add_argument("--long", default="16384,32768", help="rows measured with the blockwise kernel only")
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--time", default="", help="rows to time with both implementations, e.g. 1024,2048,4096")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    longer = [int(x) for x in args.long.split(",") if x]
    rows = {}
    for impl, ts in (("einsum", lengths), ("blockwise", lengths + longer)):
        for t in ts:
            rows.setdefault(t, {})[impl] = temporaries_mib(t, impl, args.block)
            print(f"  {impl:9s} {t:6d} tokens: {rows[t][impl]:9.1f} MiB", flush=True)
    print(f"\n| row tokens | einsum MiB | x per doubling | blockwise (block {args.block}) MiB | x per doubling |")
    print("|---|---|---|---|---|")
    prev = {}
    for t in sorted(rows):
        cells = []
        for impl in ("einsum", "blockwise"):
            v = rows[t].get(impl)
            growth = f"{v / prev[impl]:.2f}" if v is not None and impl in prev else "–"
            cells += [f"{v:,.0f}" if v is not None else "–", growth]
            if v is not None:
                prev[impl] = v
        print(f"| {t:,} | " + " | ".join(cells) + " |")
    timed = [int(x) for x in args.time.split(",") if x]
    if timed:
        print("\n| row tokens | einsum ms | blockwise ms | speed-up |\n|---|---|---|---|")
    for t in timed:
        e, b = median_ms(t, "einsum", args.block), median_ms(t, "blockwise", args.block)
        print(f"| {t:,} | {e:.0f} | {b:.0f} | {e / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
