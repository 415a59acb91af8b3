"""Seed 002's worked example and five-scenario table, computed with ``dpo_jax.core.losses.preference_loss``.

python experiments/seed_worked_example.py
"""

from __future__ import annotations

import jax.numpy as jnp

from dpo_jax.core.losses import preference_loss

BETA = 0.1
REFERENCE = (-45.2, -38.7)  # log pi_ref(y_w | x), log pi_ref(y_l | x)
# The seed's prose calls the first and last gradient weights "0.000" and "0.993"; its own table (and the formula
# sigma(-beta h)) gives 0.161 and 0.701, which is what this prints.
SCENARIOS = (
    ("Model strongly correct", -35.0, -45.0),
    ("Model weakly correct", -42.1, -39.5),
    ("Model uncertain", -41.0, -41.5),
    ("Model weakly wrong", -44.0, -38.0),
    ("Model strongly wrong", -50.0, -35.0),
)


def score(policy_chosen, policy_rejected):
    losses_B, metrics = preference_loss(
        jnp.array([policy_chosen]),
        jnp.array([policy_rejected]),
        jnp.array([REFERENCE[0]]),
        jnp.array([REFERENCE[1]]),
        beta=BETA,
    )
    return float(losses_B[0]), {k: float(v) for k, v in metrics.items()}


def main():
    loss, m = score(-42.1, -39.5)
    print(f"Worked example (beta = {BETA})")
    print(f"Chosen implicit reward: {m['rewards/chosen']:.3f}")
    print(f"Rejected implicit reward: {m['rewards/rejected']:.3f}")
    print(f"Reward difference: {m['rewards/margins']:.3f}")
    print(f"Preference probability: {m['preference_prob']:.3f}")
    print(f"DPO loss: {loss:.3f}\n")
    print(f"{'Scenario':<28}{'Loss':>6}{'Grad Weight':>15}")
    print("-" * 50)
    for name, pc, pr in SCENARIOS:
        loss, m = score(pc, pr)
        print(f"{name:<28}{loss:>6.3f}{m['grad_weight']:>15.3f}")


if __name__ == "__main__":
    main()
