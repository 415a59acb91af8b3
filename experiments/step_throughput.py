"""Data-loader throughput vs train-step throughput, and the step time saved by the reference cache.

Uses the main job's model and data (configs/default.py): tokenized synthetic pairs, the loader (the config's
layout), and the jitted DPO train step with the reference either cached (log-probs in the batch) or frozen (a reference
forward every step). Prints pairs/s, step times and MFU against the stated peak.

    python experiments/step_throughput.py
    python experiments/step_throughput.py --hidden 256 --layers 4 --steps 10   # where matmuls dominate
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.config import load_config_file
from dpo_jax.core import optim, scoring, step
from dpo_jax.core.state import init_state
from dpo_jax.data import PreferenceLoader, TokenizeConfig, load_examples, synthetic, to_global, tokenize_examples
from dpo_jax.data.packing import batch_stats
from dpo_jax.infra import throughput
from dpo_jax.infra.sharding import make_mesh, param_shardings, tree_shardings
from dpo_jax.training import builders, inputs


def time_loader(loader, steps):
    t0 = time.perf_counter()
    for _ in loader.iterate(0, steps):
        pass
    return steps * loader.global_batch_size / (time.perf_counter() - t0)


def time_step(cfg, graphdef, params, loader, mesh, *, frozen: bool, steps: int):
    sc = step.StepConfig("dpo", frozen_reference=frozen)
    tx = optim.make_optimizer({**dict(cfg.optim), "warmup_steps": 10}, 1000)

    def init(p):
        return init_state(p, tx, builders.hparams(cfg), 0)

    state = jax.jit(init, out_shardings=tree_shardings(jax.eval_shape(init, params), mesh))(params)
    reference = jax.device_put(jax.tree.map(jnp.copy, params), param_shardings(params, mesh)) if frozen else None
    step_fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc), donate_argnums=0)
    batches = []
    for _, b in loader.iterate(0, steps + 1):
        if not frozen:
            b = b.replace(ref_logps_GxPx2=np.full((*b.index_GxP.shape, 2), -20.0, np.float32))
        batches.append(to_global(b, mesh))
    state, m = step_fn(state, batches[0], reference)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in batches[1:]:
        state, m = step_fn(state, b, reference)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=0, help="pairs per step (default: the config's)")
    parser.add_argument("--hidden", type=int, default=0, help="model width (default: the config's)")
    parser.add_argument("--layers", type=int, default=0, help="model depth (default: the config's)")
    args = parser.parse_args(argv)

    cfg = load_config_file(args.config)
    if args.hidden:
        cfg.model.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    if args.layers:
        cfg.model.num_layers = args.layers
    batch = args.batch or cfg.optim.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.write_task(tmp, synthetic.TaskConfig(**{**cfg.synthetic, "n_sft": 8}))
        tok = synthetic.build_tokenizer()
        t0 = time.perf_counter()
        examples, _ = load_examples(paths["train"])
        tok_cfg = TokenizeConfig(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
        pairs, _ = tokenize_examples(examples, tok, tok_cfg)
        prep = len(pairs) / (time.perf_counter() - t0)
    mesh = make_mesh(devices=jax.devices()[:1])
    model = builders.build_model(cfg, tok)
    graphdef, params = nnx.split(model)
    _, matmul = scoring.count_matmul_params(model)
    counts = throughput.model_counts(model.config, matmul)
    loader = PreferenceLoader(pairs, batch, layout=inputs.make_layout(cfg, mesh, counts=counts))
    length = loader.batch(0).tokens_GxKxT.shape[-1]
    peak, _ = throughput.peak_flops(cfg.peak_flops)

    print(
        f"backend {jax.default_backend()}, {len(pairs)} pairs, batch {batch} pairs ({loader.describe()}, rows of "
        f"{length}), model {sum(x.size for x in jax.tree.leaves(params)):,} params; peak {peak / 1e9:.0f} GFLOP/s"
    )
    print(f"load + validate + tokenize:  {prep:12,.0f} pairs/s (once per run)")
    print(f"loader (plan + materialise): {time_loader(loader, 200):12,.0f} pairs/s")
    for frozen in (False, True):
        dt = time_step(cfg, graphdef, params, loader, mesh, frozen=frozen, steps=args.steps)
        stats = batch_stats(loader.batch(0))
        flops = throughput.step_flops(counts, stats, frozen_reference=frozen)
        name = "frozen reference (forward per step)" if frozen else "cached reference log-probs"
        print(f"train step, {name:<36} {dt * 1e3:8.1f} ms  {batch / dt:10,.0f} pairs/s  MFU {flops / dt / peak:6.2%}")


if __name__ == "__main__":
    main()
