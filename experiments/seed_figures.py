"""Seed 002's figures, computed with this package's own functions (``dpo_jax.core.losses``).

    python experiments/seed_figures.py --out docs/seed_figures

Six panels in seed_figures.png, each with its CSV:
  optimal_policy.csv  pi* proportional to pi_ref exp(r / beta) for beta in {0.2, 0.5, 1, 2}   (losses.optimal_policy)
  loss_curves.csv     loss, preference probability and gradient weight vs the implicit reward difference
                      (losses.preference_loss, and jax.grad of it for the gradient weight)
  worked_example.csv  the worked example's log-probs, log-ratios and implicit rewards
  scenarios.csv       the five scenarios' loss and gradient weight
  beta_effect.csv     beta's effect on the margin and preference probability at fixed log-probs
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.core.losses import optimal_policy, preference_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from experiments.seed_worked_example import BETA, REFERENCE, SCENARIOS  # noqa: E402

# An illustrative reference over five responses and their rewards (the seed's figure uses responses A-E with D
# the best; its exact numbers are not printed, so these are ours).
RESPONSES = ("A", "B", "C", "D", "E")
REF_PROBS = (0.30, 0.25, 0.20, 0.15, 0.10)
REWARDS = (0.5, 0.2, -0.3, 1.0, -0.5)
BETAS = (0.2, 0.5, 1.0, 2.0)
WORKED = (-42.1, -39.5)  # the worked example's policy log-probs of y_w and y_l


def optimal_policies() -> list[dict]:
    rows = []
    for beta in BETAS:
        pi = np.asarray(optimal_policy(jnp.log(jnp.array(REF_PROBS)), jnp.array(REWARDS), beta))
        rows += [
            {"beta": beta, "response": y, "reference": q, "reward": r, "optimal": float(p)}
            for y, q, r, p in zip(RESPONSES, REF_PROBS, REWARDS, pi, strict=True)
        ]
    return rows


def loss_curves(beta: float = BETA) -> list[dict]:
    """Against z = beta * h, the implicit reward difference: the policy's chosen log-prob is z / beta above the
    reference's; everything else is 0."""
    z = np.linspace(-6, 6, 241)
    zeros = jnp.zeros_like(z)

    def loss_one(policy_chosen):
        return preference_loss(policy_chosen[None], jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=beta)[0][0]

    chosen = jnp.asarray(z / beta)
    losses, metrics = preference_loss(chosen, zeros, zeros, zeros, beta=beta)
    # dL/d log pi(y_w) = -beta * sigma(-z): the gradient weight is -(1 / beta) times it.
    grad_weight = -np.asarray(jax.vmap(jax.grad(loss_one))(chosen)) / beta
    return [
        {
            "reward_difference": float(zi),
            "loss": float(li),
            "preference_prob": float(np.exp(-li)),
            "grad_weight": float(g),
        }
        for zi, li, g in zip(z, np.asarray(losses), grad_weight, strict=True)
    ]


def _score(policy_chosen, policy_rejected, beta=BETA):
    losses, m = preference_loss(
        jnp.array([policy_chosen]), jnp.array([policy_rejected]),
        jnp.array([REFERENCE[0]]), jnp.array([REFERENCE[1]]), beta=beta,
    )  # fmt: skip
    return float(losses[0]), {k: float(v) for k, v in m.items()}


def worked_example() -> list[dict]:
    loss, m = _score(*WORKED)
    rows = []
    for side, policy, ref, reward in (
        ("chosen", WORKED[0], REFERENCE[0], m["rewards/chosen"]),
        ("rejected", WORKED[1], REFERENCE[1], m["rewards/rejected"]),
    ):
        rows.append(
            {"response": side, "policy_logp": policy, "reference_logp": ref, "log_ratio": reward / BETA,
             "implicit_reward": reward, "margin": m["rewards/margins"], "loss": loss}
        )  # fmt: skip
    return rows


def scenarios() -> list[dict]:
    rows = []
    for name, pc, pr in SCENARIOS:
        loss, m = _score(pc, pr)
        rows.append({"scenario": name, "loss": loss, "grad_weight": m["grad_weight"], "margin": m["rewards/margins"]})
    return rows


def beta_effect() -> list[dict]:
    rows = []
    for beta in np.linspace(0.0, 1.0, 51)[1:]:
        _, m = _score(*WORKED, beta=float(beta))
        rows.append({"beta": float(beta), "margin": m["rewards/margins"], "preference_prob": m["preference_prob"]})
    return rows


def plot(tables: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.2))
    ax = axes[0, 0]
    width = 0.16
    x = np.arange(len(RESPONSES))
    ax.bar(x - 2 * width, REF_PROBS, width, color="gray", label="reference")
    for i, beta in enumerate(BETAS):
        pi = [r["optimal"] for r in tables["optimal_policy"] if r["beta"] == beta]
        ax.bar(x + (i - 1) * width, pi, width, label=f"pi*, beta = {beta:g}")
    ax.set_xticks(x, [f"{y}\nr = {r:+.1f}" for y, r in zip(RESPONSES, REWARDS, strict=True)])
    ax.set_title("optimal policy pi* ~ pi_ref exp(r / beta)")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    lc = tables["loss_curves"]
    z = [r["reward_difference"] for r in lc]
    ax.plot(z, [r["loss"] for r in lc], label="loss -log sigma(z)")
    ax.plot(z, [r["preference_prob"] for r in lc], label="preference prob sigma(z)")
    ax.set_xlabel("implicit reward difference z = r_w - r_l")
    ax.set_title("loss and preference probability")
    ax.set_ylim(0, 4)
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    ax.plot(z, [r["grad_weight"] for r in lc], color="C3")
    ax.set_xlabel("implicit reward difference z")
    ax.set_title("gradient weight sigma(-z) (from jax.grad)")

    ax = axes[1, 0]
    we = tables["worked_example"]
    x = np.arange(2)
    ax.bar(x - 0.3, [r["reference_logp"] / 10 for r in we], 0.2, color="gray", label="log pi_ref / 10")
    ax.bar(x - 0.1, [r["policy_logp"] / 10 for r in we], 0.2, color="C0", label="log pi / 10")
    ax.bar(x + 0.1, [r["log_ratio"] for r in we], 0.2, color="C2", label="log pi / pi_ref")
    ax.bar(x + 0.3, [r["implicit_reward"] for r in we], 0.2, color="C1", label="implicit reward beta log ratio")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, ["chosen y_w", "rejected y_l"])
    ax.set_title(f"worked example: margin {we[0]['margin']:.2f}, loss {we[0]['loss']:.3f}")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    sc = tables["scenarios"]
    x = np.arange(len(sc))
    ax.bar(x - 0.2, [r["loss"] for r in sc], 0.4, label="loss")
    ax.bar(x + 0.2, [r["grad_weight"] for r in sc], 0.4, label="gradient weight")
    ax.set_xticks(x, [r["scenario"].replace("Model ", "").replace(" ", "\n") for r in sc])
    ax.set_title("five scenarios (beta = 0.1)")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    be = tables["beta_effect"]
    b = [r["beta"] for r in be]
    ax.plot(b, [r["margin"] for r in be], label="reward margin beta h")
    ax.plot(b, [r["preference_prob"] for r in be], label="preference prob sigma(beta h)")
    ax.set_xlabel("beta (worked example's log-probs fixed)")
    ax.set_title("beta's effect")
    ax.legend(fontsize=8)
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description="Seed 002's figures from dpo_jax.core.losses")
    ap.add_argument("--out", default="runs/seed_figures")
    out = Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "optimal_policy": optimal_policies(),
        "loss_curves": loss_curves(),
        "worked_example": worked_example(),
        "scenarios": scenarios(),
        "beta_effect": beta_effect(),
    }
    for name, rows in tables.items():
        with (out / f"{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    plot(tables, out / "seed_figures.png")
    print(f"wrote {out / 'seed_figures.png'} and {', '.join(f'{n}.csv' for n in tables)}")
    return tables


if __name__ == "__main__":
    main()
