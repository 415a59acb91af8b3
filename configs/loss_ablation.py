"""A loss-type ablation of the main job: the DPO family side by side on the built-in task, with one command.

sigmoid (DPO), IPO, hinge (SLiC), robust DPO (flip rate 0.1), DPO with the Jensen-Shannon f-divergence, SimPO
and ORPO (reference-free: SimPO's margin gamma; ORPO's odds-ratio term plus its NLL), and KTO (the pairs split
into desirable / undesirable examples). Loss type, weights, f-divergence and SimPO's gamma are traced, so the
first seven train as one vectorised population (one program); KTO trains on different (unpaired) examples and
runs as its own population after them:

    dpo-jax sweep --config configs/loss_ablation.py --workdir runs/loss_ablation --mode vectorized
    dpo-jax sweep --config configs/loss_ablation.py:runlocal --workdir runs/loss_smoke --mode vectorized  # minutes
"""

from dpo_jax.configs.default import get_config as default_config


def get_config(arg=None):
    return default_config("runlocal" if arg == "runlocal" else None)


def get_sweep(arg=None):
    """Each objective at its usual setting (TRL's defaults where the method has no other recommendation)."""
    return [
        {"dpo.loss_type": "sigmoid", "dpo.beta": 0.1},
        {"dpo.loss_type": "ipo", "dpo.beta": 0.1},
        {"dpo.loss_type": "hinge", "dpo.beta": 0.1},
        {"dpo.loss_type": "robust", "dpo.beta": 0.1, "dpo.label_smoothing": 0.1},
        {"dpo.loss_type": "sigmoid", "dpo.beta": 0.1, "dpo.f_divergence_type": "js_divergence"},
        {"dpo.loss_type": "simpo", "dpo.beta": 2.0, "dpo.simpo_gamma": 1.0},  # SimPO paper: beta 2, gamma 1
        {"dpo.loss_type": "orpo+sft", "dpo.beta": 0.1},  # TRL ORPOConfig: lambda (beta) 0.1
        {"dpo.loss_type": "kto", "dpo.beta": 0.1},
    ]
