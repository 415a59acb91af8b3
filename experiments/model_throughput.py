"""Forward throughput (tokens/s) and compile time of a tiny Llama on this machine.

python experiments/model_throughput.py
python experiments/model_throughput.py --layers 4 --width 256 --batch 8 --seq 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import ModelConfig, init_decoder


def make_forward(graphdef):
    return lambda state, ids: nnx.merge(graphdef, state)(ids).logits_BxTxV


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=int(args.width * 8 / 3) // 8 * 8,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        dtype=args.dtype,
    )
    graphdef, state = nnx.split(init_decoder(cfg))
    n_params = sum(x.size for x in jax.tree.leaves(state))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)))
    print(
        f"backend {jax.default_backend()} ({jax.device_count()} device(s)); {n_params / 1e6:.2f}M params, "
        f"{args.layers} layers, width {args.width}, vocab {args.vocab}, {args.dtype}; batch {args.batch} x {args.seq}"
    )
    for scan in (True, False):
        fwd = jax.jit(make_forward(nnx.graphdef(init_decoder(cfg.replace(scan_layers=scan)))))
        t0 = time.perf_counter()
        compiled = fwd.lower(state, ids).compile()
        compile_s = time.perf_counter() - t0
        compiled(state, ids).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            compiled(state, ids).block_until_ready()
        step_s = (time.perf_counter() - t0) / args.repeats
        tokens = args.batch * args.seq
        print(
            f"scan_layers={scan!s:<5}  compile {compile_s:6.2f} s   forward {step_s * 1e3:8.1f} ms   "
            f"{tokens / step_s:12,.0f} tokens/s"
        )


if __name__ == "__main__":
    main()
