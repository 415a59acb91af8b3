"""Population-based training over beta and the learning rate: 8 members in one program select and perturb their
own hyper-parameters every 50 steps by the true reward of their samples (the built-in task's). The lineage is
``<workdir>/lineage.jsonl``; each member's ``plots.png`` shows its hyper-parameters over steps.

    dpo-jax sweep --config configs/pbt.py --workdir runs/pbt --mode vectorized
    dpo-jax sweep --config configs/pbt.py:runlocal --workdir runs/pbt_smoke --mode vectorized
"""

from dpo_jax.configs.default import get_config as default_config


def get_config(arg=None):
    c = default_config("runlocal" if arg == "runlocal" else None)
    c.pbt.update(enabled=True, every=50, metric="reward", fraction=0.25, hparams="beta,lr_scale")
    c.eval.every = 50
    if arg == "runlocal":
        c.pbt.every, c.eval.every = 10, 10
    return c


def get_sweep(arg=None):
    betas, lrs = ((0.1, 0.3), (1.0, 2.0)) if arg == "runlocal" else ((0.03, 0.1, 0.3, 1.0), (0.5, 2.0))
    base_lr = default_config("runlocal" if arg == "runlocal" else None).optim.learning_rate
    return [{"dpo.beta": b, "optim.learning_rate": base_lr * f} for b in betas for f in lrs]
