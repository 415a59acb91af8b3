"""K = 8 betas of a shortened main job: the workload of ``experiments/sweep_benchmark.py`` (vectorised vs
sequential vs separate processes). 100 DPO steps per member instead of 300; everything else as the main job.

    dpo-jax sweep --config configs/sweep_benchmark.py --workdir runs/bench --mode vectorized
"""

from dpo_jax.configs.default import get_config as default_config

from dpo_jax.research.sweep import grid


def get_config(arg=None):
    c = default_config("runlocal" if arg == "runlocal" else None)
    if arg != "runlocal":
        c.optim.steps = 100
        c.eval.every = 100
        c.checkpoint.every = 100
    return c


def get_sweep(arg=None):
    k = 2 if arg == "runlocal" else 8
    return grid({"dpo.beta": [round(0.01 * 2**i, 4) for i in range(k)]})
