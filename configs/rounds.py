"""Iterative (online) DPO on the built-in task: 3 rounds of 100 DPO steps (the main job's 300 in all), each on
best-vs-worst pairs of 8 samples per prompt from the previous round's policy, scored by the task's true reward.

    dpo-jax rounds --config configs/rounds.py --workdir runs/rounds
    dpo-jax rounds --config configs/rounds.py --workdir runs/rounds_refresh --config.rounds.reference=refresh
    dpo-jax rounds --config configs/rounds.py:runlocal --workdir runs/rounds_smoke     # about a minute on a CPU
    dpo-jax rounds --config configs/rounds.py --workdir runs/rounds --config.rounds.num=4   # one round more

``configs/rounds.py:online`` is online DPO, rounds of one step-batch in one run of ``dpo-jax train``: each of the
main job's 300 steps samples its 64 prompts' 8 completions from the current policy and trains on the best vs the
worst (``dpo_jax.training.online``; ``:online,runlocal`` for a smoke run):

    dpo-jax train --config configs/rounds.py:online --workdir runs/online

``configs/rounds.py:hf`` runs rounds on a local Hugging Face checkpoint (``configs/hf_local.py``'s settings): its
prompts come from the training file, its held-out pairs from the eval file, and ``config.reward`` scores the
samples (``hf_cpu``: a first look on a CPU, as ``hf_local.py:cpu``):

    dpo-jax rounds --config configs/rounds.py:hf --workdir runs/my_rounds \\
        --config.model.hf_path=/models/SmolLM2-135M-Instruct --config.reward=my_rewards.py:helpfulness \\
        --config.data.train_path=/data/prompts.jsonl --config.data.eval_path=/data/prefs_eval.jsonl
"""

from dpo_jax.configs.default import get_config as default_config
from dpo_jax.configs.hf_local import get_config as hf_local_config


def get_config(arg=None):
    if arg in ("hf", "hf_cpu"):
        c = hf_local_config("cpu" if arg == "hf_cpu" else None)
        # 64 prompts a round, 4 samples each (memory for the sampling calls is sized from rounds.sample_memory_mb)
        c.rounds.update(num=3, samples=4, prompts=64, max_new_tokens=c.eval.max_new_tokens)
        c.optim.steps = 20 if arg == "hf_cpu" else 200
        return c
    if arg in ("online", "online,runlocal"):
        c = default_config("runlocal" if arg == "online,runlocal" else None)
        c.dpo.beta = 0.1  # as the rounds (docs/rounds.md)
        c.rounds.update(online=True, samples=8)
        c.reference.mode = "frozen"  # each step's pairs are new: the reference runs in the step
        return c
    if arg not in (None, "runlocal"):
        raise ValueError(
            f"configs/rounds.py: unknown config argument {arg!r}; expected runlocal, online, online,runlocal, hf, "
            "hf_cpu or nothing"
        )
    c = default_config("runlocal" if arg == "runlocal" else None)
    c.rounds.update(num=3, samples=8)
    c.dpo.beta = 0.1  # the iterative-vs-offline figure's (docs/rounds.md)
    if arg == "runlocal":
        c.rounds.update(num=2, samples=4, prompts=128)
    else:
        c.optim.update(steps=100, warmup_steps=10)
        c.eval.every = 50
    return c
