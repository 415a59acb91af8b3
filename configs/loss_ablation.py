"""A loss-type ablation of the main job: sigmoid, IPO, hinge and robust DPO, each at two betas, as one program.

Loss type and loss weights are traced (``HParams.loss_weights`` over the union of the members' types), so the
8 members (robust with label smoothing 0.1) train together in one vectorised population:

    dpo-jax sweep --config configs/loss_ablation.py --workdir runs/loss_ablation --mode vectorized
    dpo-jax sweep --config configs/loss_ablation.py:runlocal --workdir runs/loss_smoke --mode vectorized  # minutes
"""

from dpo_jax.configs.default import get_config as default_config

from dpo_jax.sweep import grid


def get_config(arg=None):
    return default_config("runlocal" if arg == "runlocal" else None)


def get_sweep(arg=None):
    """Robust DPO with an assumed flip rate of 0.1 (at 0 it is plain sigmoid DPO); the others with clean labels."""
    members = grid({"dpo.loss_type": ["sigmoid", "ipo", "hinge", "robust"], "dpo.beta": [0.1, 0.5]})
    return [{**m, "dpo.label_smoothing": 0.1 if m["dpo.loss_type"] == "robust" else 0.0} for m in members]
