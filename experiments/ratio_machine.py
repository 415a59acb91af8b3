"""Seed 000's two-action "ratio machine": what a soft preference target asks of the policy.

Two completions, y_w and y_l. Given the reference winner probability q = pi_ref(y_w), a soft target p and beta,
the soft-target DPO loss is minimised at h = logit(p) / beta (``losses.optimal_soft_margin``), so the policy's
log-odds must be logit(q) + logit(p) / beta. The DPO probability sigma(beta h) of that policy is p again
(``losses.preference_loss``), and the two-action KL(pi || pi_ref) it costs spikes as p -> 1 (hard labels:
no finite optimum), as beta -> 0, and where the reference disagrees (q small).

    python experiments/ratio_machine.py --out docs/ratio_machine

Writes ratio_machine.png (static figure), ratio_machine.csv (q x p x beta grid) and ratio_machine.html: an
interactive view with sliders, self-contained (open the file in a browser; no server, no network). The page
checks its JavaScript against this script's numbers on load and shows the largest difference.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.core.losses import optimal_soft_margin, preference_loss

Q_REFS = (0.1, 0.3, 0.5, 0.7, 0.9)
BETAS = (0.1, 0.5, 1.0, 2.0)
TARGETS = tuple(np.round(np.concatenate([np.linspace(0.5, 0.95, 10), [0.98, 0.99, 0.995, 0.999]]), 4))


@jax.jit
@jax.vmap
def _dpo_prob(policy_w, policy_l, ref_w, ref_l, beta):
    """The DPO probability sigma(beta h) of one pair, as the loss computes it."""
    one = lambda x: x[None]  # noqa: E731
    return preference_loss(one(policy_w), one(policy_l), one(ref_w), one(ref_l), beta=beta)[1]["preference_prob"]


def machine(q_ref, p, beta) -> dict[str, np.ndarray]:
    """The ratio machine on broadcast arrays (float64 inputs; the losses run in float32)."""
    q_ref, p, beta = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (q_ref, p, beta)))
    ref_log_odds = np.log(q_ref) - np.log1p(-q_ref)
    h = np.asarray(optimal_soft_margin(jnp.asarray(p), jnp.asarray(beta)), np.float64)
    log_odds = ref_log_odds + h
    log_pw, log_pl = -np.logaddexp(0, -log_odds), -np.logaddexp(0, log_odds)  # log sigma(+-L), stable
    log_qw, log_ql = np.log(q_ref), np.log1p(-q_ref)
    flat = [jnp.asarray(x.ravel(), jnp.float32) for x in (log_pw, log_pl, log_qw, log_ql, beta)]
    dpo_prob = np.asarray(_dpo_prob(*flat), np.float64).reshape(p.shape)
    pw, pl = np.exp(log_pw), np.exp(log_pl)
    kl = pw * (log_pw - log_qw) + pl * (log_pl - log_ql)
    return {
        "ref_log_odds": ref_log_odds,
        "required_log_odds": log_odds,
        "policy_winner_prob": pw,
        "dpo_prob": dpo_prob,
        "kl": kl,
    }


def table() -> list[dict]:
    q, p, b = np.meshgrid(Q_REFS, TARGETS, BETAS, indexing="ij")
    out = machine(q, p, b)
    return [
        {"q_ref": float(q[i]), "p": float(p[i]), "beta": float(b[i]), **{k: float(v[i]) for k, v in out.items()}}
        for i in np.ndindex(q.shape)
    ]


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    q0 = 0.3
    p = np.linspace(0.5, 0.999, 200)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.0))
    for beta in BETAS:
        m = machine(q0, p, beta)
        axes[0].plot(p, m["required_log_odds"], label=f"beta = {beta:g}")
        axes[1].plot(p, m["policy_winner_prob"], label=f"beta = {beta:g}")
        axes[2].plot(p, m["kl"], label=f"beta = {beta:g}")
    axes[0].axhline(np.log(q0 / (1 - q0)), color="gray", ls="--", label=f"reference log-odds (q = {q0})")
    axes[0].set_title("required policy log-odds logit(q) + logit(p)/beta")
    axes[1].axhline(q0, color="gray", ls="--", label="reference")
    axes[1].set_title("policy winner probability pi(y_w)")
    axes[2].set_title("two-action KL(pi || pi_ref) [nats]")
    for ax in axes[:3]:
        ax.set_xlabel("soft target p")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    qs, ps = np.linspace(0.01, 0.99, 99), np.linspace(0.5, 0.999, 100)
    qq, pp = np.meshgrid(qs, ps, indexing="ij")
    kl = machine(qq, pp, 0.5)["kl"]
    im = axes[3].pcolormesh(ps, qs, np.maximum(kl, 1e-6), norm=LogNorm(1e-3, kl.max()), shading="auto")
    fig.colorbar(im, ax=axes[3], label="KL [nats]")
    axes[3].set_xlabel("soft target p")
    axes[3].set_ylabel("reference winner probability q")
    axes[3].set_title("KL over (q, p) at beta = 0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_points() -> list[dict]:
    """Points the HTML page recomputes in JavaScript on load (and the tests with node)."""
    rng = np.random.default_rng(0)
    q, p, b = (
        rng.uniform(0.02, 0.98, 24),
        rng.uniform(0.02, 0.995, 24),
        np.exp(rng.uniform(np.log(0.02), np.log(5), 24)),
    )
    m = machine(q, p, b)
    return [
        {"q": float(q[i]), "p": float(p[i]), "beta": float(b[i]), **{k: float(v[i]) for k, v in m.items()}}
        for i in range(len(q))
    ]


TEMPLATE = Path(__file__).with_name("ratio_machine_page.html")  # the page; __CHECKS__ becomes the check points


def write_html(path: Path) -> None:
    path.write_text(TEMPLATE.read_text().replace("__CHECKS__", json.dumps(check_points())))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description="Seed 000's two-action ratio machine")
    ap.add_argument("--out", default="runs/ratio_machine")
    out = Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table()
    with (out / "ratio_machine.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(out / "ratio_machine.png")
    write_html(out / "ratio_machine.html")
    print(f"wrote {out / 'ratio_machine.png'}, ratio_machine.csv and ratio_machine.html (open it in a browser)")
    return rows


if __name__ == "__main__":
    main()
