"""A mixture of experts on the built-in task: a new Qwen3-MoE (8 experts, top 2) trained SFT then DPO, with TRL's
load-balancing loss and this package's router metrics (expert load, and the router drift: the KL of the policy's
routing from the reference's, per token, at eval) in ``plots.png``.

    dpo-jax train --config configs/moe.py:runlocal --workdir runs/moe_smoke      # about a minute on a CPU
    dpo-jax train --config configs/moe.py --workdir runs/moe
    dpo-jax train --config configs/moe.py --workdir runs/moe_frozen --config.moe.freeze_router=true

A local checkpoint (Qwen3-MoE, Mixtral) takes ``configs/hf_local.py`` with the same ``moe.*`` fields.
"""

from dpo_jax.configs.default import get_config as default_config


def get_config(arg=None):
    if arg not in (None, "runlocal"):
        raise ValueError(f"configs/moe.py: unknown config argument {arg!r}; expected runlocal or nothing")
    c = default_config("runlocal" if arg == "runlocal" else None)
    c.model.update(architecture="Qwen3MoeForCausalLM", num_experts=8, experts_per_token=2, expert_intermediate_size=64)
    c.moe.update(aux_loss_coef=0.01)  # a tiny model routes few tokens: balance it a little harder than 0.001
    return c
