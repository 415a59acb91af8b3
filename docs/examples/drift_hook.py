"""A periodic action of your own in a run, without editing the package: every few steps, each member's distance
from the parameters its DPO stage started from (how far the policy has moved from the reference), written to its
metrics beside the loss.

    python docs/examples/drift_hook.py --workdir runs/drift [--every 10] [config overrides: optim.steps=50 ...]
"""

import argparse

import jax
import jax.numpy as jnp
import optax

from dpo_jax.config import load_config_file
from dpo_jax.training.loop import Hook, Loop
from dpo_jax.training.train import train


def drift_hook(every: int) -> Hook:
    """``dpo/param_drift``: ||theta - theta_start|| of each member, at the stage's start and every ``every`` steps.
    (A resumed run measures from where it resumed: the hook keeps its start in memory.)"""
    start = {}

    def drift(loop: Loop, step: int):
        params = loop.state.params  # a population's leaves: [K, ...]
        start.setdefault("params", jax.tree.map(jnp.copy, params))
        moved = jax.vmap(lambda p, q: optax.tree.norm(jax.tree.map(jnp.subtract, p, q)))(params, start["params"])
        for k, member in enumerate(loop.members):
            row = {"dpo/param_drift": float(moved[k]), f"{loop.stage.name}/step": step}  # the stage's step: a
            member.writer.write(loop.stage.log_offset + step, row)  # resume forgets the rows after it

    return Hook(drift, every, at_start=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/default.py:runlocal")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="field=value (as --config.field=value)")
    args = parser.parse_args()
    cfg = load_config_file(args.config)
    for item in args.overrides:
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    summary = train(cfg, args.workdir, hooks=[drift_hook(args.every)])
    print({k: v for k, v in summary.items() if k.startswith("eval/")})


if __name__ == "__main__":
    main()
