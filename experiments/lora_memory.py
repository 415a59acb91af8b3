"""Memory and step time of a LoRA DPO step against a full one, on the same model and batches.

XLA's memory analysis of each compiled train step (cached reference): the bytes the step takes as arguments
(train state, the LoRA base, the batch), the temporaries it allocates, and their sum (the step's peak, donated
outputs aliasing their inputs); then the mean time of the timed steps. Rows: full fine-tuning; LoRA rank r on
every projection with a float32 base; the same with a bfloat16 base and with an int8 base (qwix: int8 values, a
float32 scale per channel, dequantized at use); the float32 one with adapter dropout (``--dropout``, default 0.05:
the masks' cost).

    python experiments/lora_memory.py                       # the 32k model of experiments/throughput.py
    python experiments/lora_memory.py --case 128k --rank 16 --steps 4
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
from flax import nnx
from throughput import CASES, make_pairs, model_config  # experiments/, the script's folder

from dpo_jax.core import optim, step
from dpo_jax.core.state import init_state
from dpo_jax.data import Layout, PreferenceLoader
from dpo_jax.models import init_decoder, lora
from dpo_jax.models.config import LORA_TARGETS
from dpo_jax.training import builders

MB = 1 << 20


def run(mc, pairs, batch, steps, rank, base_dtype, dropout=0.0) -> dict:
    model = init_decoder(mc, seed=0)
    if rank:
        model = lora.attach(model, rank=rank, alpha=2.0 * rank, target_names=LORA_TARGETS, dropout=dropout, seed=0)
    graphdef, params = nnx.split(model)
    base = None
    if rank:
        params, base = lora.split(lora.cast_base(params, base_dtype))
    loader = PreferenceLoader(pairs, batch, seed=0, layout=Layout())
    batches = []
    for _, b in loader.iterate(0, steps):
        b = b.replace(ref_logps_GxPx2=np.full((*b.index_GxP.shape, 2), -60.0, np.float32))
        batches.append(jax.device_put(b))
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-4, warmup_steps=0), 1000)
    state = jax.jit(lambda p: init_state(p, tx, builders.default_hparams(), 0))(params)
    sc = step.StepConfig("dpo", lora=bool(rank))
    train_fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc), donate_argnums=0)
    compiled = train_fn.lower(state, batches[0], base).compile()
    mem = compiled.memory_analysis()
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base)) if base is not None else 0
    for b in batches:  # every batch shape compiled once before timing
        state, m = train_fn(state, b, base)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in batches:
        state, m = train_fn(state, b, base)
    jax.block_until_ready(m)
    return {
        "trained": trained,
        "state_mb": state_bytes / MB,
        "base_mb": base_bytes / MB,
        "args_mb": mem.argument_size_in_bytes / MB,
        "temp_mb": mem.temp_size_in_bytes / MB,
        "peak_mb": (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                    + mem.temp_size_in_bytes) / MB,
        "ms": (time.perf_counter() - t0) / steps * 1e3,
    }  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="32k", choices=sorted(CASES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args(argv)
    case = CASES[args.case]
    mc = model_config(case)
    pairs = make_pairs(case, args.batch * args.steps * 2)
    print(f"backend {jax.default_backend()}; case {args.case}: vocab {mc.vocab_size}, hidden {mc.hidden_size}, "
          f"{mc.num_layers} layers; {args.batch} pairs/step; {args.steps} timed steps")  # fmt: skip
    rows = [
        ("full fine-tuning", run(mc, pairs, args.batch, args.steps, 0, "float32")),
        (f"LoRA r={args.rank}, float32 base", run(mc, pairs, args.batch, args.steps, args.rank, "float32")),
        (f"LoRA r={args.rank}, bfloat16 base", run(mc, pairs, args.batch, args.steps, args.rank, "bfloat16")),
        (f"LoRA r={args.rank}, int8 base", run(mc, pairs, args.batch, args.steps, args.rank, "int8")),
        (f"LoRA r={args.rank}, float32 base, dropout {args.dropout}",
         run(mc, pairs, args.batch, args.steps, args.rank, "float32", args.dropout)),
    ]  # fmt: skip
    full = rows[0][1]
    print("\n| run | trained params | train state MB | frozen base MB | step peak MB (args + temps) | temps MB "
          "| ms/step | peak vs full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['trained'] / 1e6:.2f}M | {r['state_mb']:.0f} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} "
              f"| {r['temp_mb']:.0f} | {r['ms']:.0f} | {r['peak_mb'] / full['peak_mb']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
