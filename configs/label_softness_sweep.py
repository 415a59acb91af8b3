"""Label softness under label noise: hard labels vs conservative DPO (label smoothing) vs per-pair soft targets.

Each noise level eps flips that fraction of the built-in task's Bradley-Terry train labels; a pair's soft target
is the noisy labelling process's own probability (1 - eps) p + eps (1 - p), p = sigmoid((r_chosen - r_rejected)
/ tau): the vote share of many such annotators. Held-out labels are clean. Figure and table:
``python experiments/label_softness.py``.

    dpo-jax sweep --config configs/label_softness_sweep.py --workdir runs/softness
    dpo-jax sweep --config configs/label_softness_sweep.py:runlocal --workdir runs/softness_smoke
"""

from dpo_jax.configs.default import get_config as default_config


def get_config(arg=None):
    c = default_config("runlocal" if arg == "runlocal" else None)
    c.dpo.beta = 0.1  # the ablation's figure (docs/experiments.md)
    return c


def get_sweep(arg=None):
    noise = [0.0, 0.3] if arg == "runlocal" else [0.0, 0.2, 0.4]
    labels = [
        {"dpo.label_smoothing": 0.0, "dpo.use_soft_targets": False},  # hard labels
        {"dpo.label_smoothing": 0.2, "dpo.use_soft_targets": False},  # conservative DPO
        {"dpo.label_smoothing": 0.0, "dpo.use_soft_targets": True},  # soft Bradley-Terry targets
    ]
    return [{"synthetic.label_noise": n, **lab} for n in noise for lab in labels]
