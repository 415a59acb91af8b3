"""A periodic action of your own in a run, without editing the package: every few steps, each member's distance
from the parameters its DPO stage started from (how far the policy has moved from the reference), written to its
metrics beside the loss.

    python docs/examples/drift_hook.py --workdir runs/drift --every 10 [--config.optim.steps=50 ...]
"""

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from ml_collections import config_flags

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
    """The command line: dpo-jax's --config (with --config.<field>=<value>), --workdir, and --every."""
    config = config_flags.DEFINE_config_file("config", "configs/default.py:runlocal", "a config file (as dpo-jax's)")
    workdir = flags.DEFINE_string("workdir", None, "the run's folder", required=True)
    every = flags.DEFINE_integer("every", 10, "steps between two measurements")

    def run(argv):
        del argv
        summary = train(config.value, workdir.value, hooks=[drift_hook(every.value)])
        print({k: round(v, 4) for k, v in summary.items() if k in ("eval/loss", "eval/reward", "eval/kl_seq_exact")})

    app.run(run)


if __name__ == "__main__":
    main()
