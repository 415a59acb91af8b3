"""A beta sweep of the main job: how the KL coefficient trades reward against KL(pi || pi_ref).

dpo-jax sweep --config configs/beta_sweep.py --workdir runs/beta_sweep
dpo-jax sweep --config configs/beta_sweep.py:runlocal --workdir runs/beta_smoke     # minutes on a CPU
dpo-jax sweep --config configs/beta_sweep.py --workdir runs/beta_sweep --mode export  # cluster / W&B
"""

from dpo_jax.configs.default import get_config as default_config

from dpo_jax.research.sweep import grid


def get_config(arg=None):
    return default_config("runlocal" if arg == "runlocal" else None)


def get_sweep(arg=None):
    betas = [0.03, 0.3] if arg == "runlocal" else [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    return grid({"dpo.beta": betas})
