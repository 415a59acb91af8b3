"""Finite-action witness: DPO on exact soft Bradley-Terry targets recovers pi* ∝ pi_ref * exp(r / beta).

One prompt, K completions, a tabular policy (K logits). Every pair (i, j) gets the soft target
p_ij = sigmoid(r_i - r_j); the policy is trained with this package's ``preference_loss`` (jax.grad + optax).
Its optimum is the KL-regularised RLHF optimum, and its implicit reward gaps
beta * [log pi/pi_ref (i) - log pi/pi_ref (j)] equal the true reward gaps (seed 000_04c307fab1a77a7a).

    python experiments/finite_action_witness.py
    python experiments/finite_action_witness.py --x64 --beta 0.2 --steps 5000
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax.core.losses import preference_loss

SEED_REFERENCE = (0.15, 0.70, 0.15)
SEED_REWARD = (1.0, 0.2, -0.5)
SEED_BETA = 0.5


def train_tabular_policy(reference, reward, beta, *, steps=3000, learning_rate=0.2, x64=False):
    """Train K logits on all pairs with soft BT targets; return the learned policy probabilities [K]."""
    with jax.enable_x64(x64):
        return _train(reference, reward, beta, steps, learning_rate, jnp.float64 if x64 else jnp.float32)


def _train(reference, reward, beta, steps, learning_rate, dtype):
    log_ref_K = jnp.log(jnp.asarray(reference, dtype))
    reward_K = jnp.asarray(reward, dtype)
    pairs = np.array(list(itertools.combinations(range(len(reference)), 2)))
    win_P, lose_P = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])
    target_P = jax.nn.sigmoid(reward_K[win_P] - reward_K[lose_P])

    def loss_fn(logits_K):
        logp_K = jax.nn.log_softmax(logits_K)
        losses_P, _ = preference_loss(
            logp_K[win_P], logp_K[lose_P], log_ref_K[win_P], log_ref_K[lose_P], beta=beta, target_probs=target_P
        )
        return jnp.mean(losses_P)

    opt = optax.sgd(learning_rate)

    @jax.jit
    def run(logits_K):
        def step(carry, _):
            logits_K, opt_state = carry
            grads_K = jax.grad(loss_fn)(logits_K)
            updates, opt_state = opt.update(grads_K, opt_state)
            return (optax.apply_updates(logits_K, updates), opt_state), None

        (logits_K, _), _ = jax.lax.scan(step, (logits_K, opt.init(logits_K)), None, length=steps)
        return jax.nn.softmax(logits_K)

    return np.asarray(run(log_ref_K), np.float64)


def kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=SEED_BETA)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--learning-rate", type=float, default=0.2)
    parser.add_argument("--x64", action="store_true", help="train in float64 (the seed's NumPy precision)")
    args = parser.parse_args(argv)

    ref = np.asarray(SEED_REFERENCE)
    reward = np.asarray(SEED_REWARD)
    pi_star = ref * np.exp(reward / args.beta)
    pi_star /= pi_star.sum()
    pi = train_tabular_policy(ref, reward, args.beta, steps=args.steps, learning_rate=args.learning_rate, x64=args.x64)

    np.set_printoptions(precision=6, suppress=True)
    precision = "float64" if args.x64 else "float32"
    print(f"beta = {args.beta}, {args.steps} steps of SGD (lr {args.learning_rate}, {precision}) on preference_loss")
    print("reference policy:   ", ref)
    print("KL-reg optimum:     ", pi_star)
    print("DPO learned policy: ", pi)
    print(f"max |pi - pi*|:      {np.max(np.abs(pi - pi_star)):.2e}")
    print(f"KL(pi || ref):       {kl(pi, ref):.6f}   KL(pi* || ref): {kl(pi_star, ref):.6f}")
    gap_tol = 1e-6 if args.x64 else 1e-5  # float32 log-probs of small probabilities carry ~1e-7 relative error
    gaps_ok = True
    for i, j in itertools.combinations(range(len(ref)), 2):
        gap = args.beta * ((np.log(pi[i]) - np.log(ref[i])) - (np.log(pi[j]) - np.log(ref[j])))
        gaps_ok &= abs(gap - (reward[i] - reward[j])) < gap_tol
        print(f"pair ({i},{j}): implicit reward gap {gap:+.6f}   true reward gap {reward[i] - reward[j]:+.6f}")
    ok = bool(np.allclose(pi, pi_star, atol=1e-6)) and gaps_ok
    print("recovered pi* to 1e-6:", "yes" if np.allclose(pi, pi_star, atol=1e-6) else "NO")
    print(f"implicit reward gaps equal true gaps to {gap_tol:g}:", "yes" if gaps_ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
