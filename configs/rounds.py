"""Iterative (online) DPO on the built-in task: 3 rounds of 100 DPO steps (the main job's 300 in all), each on
best-vs-worst pairs of 8 samples per prompt from the previous round's policy, scored by the task's true reward.

    dpo-jax rounds --config configs/rounds.py --workdir runs/rounds
    dpo-jax rounds --config configs/rounds.py --workdir runs/rounds_refresh --config.rounds.reference=refresh
    dpo-jax rounds --config configs/rounds.py:runlocal --workdir runs/rounds_smoke     # about a minute on a CPU
    dpo-jax rounds --config configs/rounds.py --workdir runs/rounds --config.rounds.num=4   # one round more
"""

from dpo_jax.configs.default import get_config as default_config


def get_config(arg=None):
    c = default_config("runlocal" if arg == "runlocal" else None)
    c.rounds.update(num=3, samples=8)
    if arg == "runlocal":
        c.rounds.update(num=2, samples=4, prompts=128)
    else:
        c.optim.update(steps=100, warmup_steps=10)
        c.eval.every = 50
    return c
