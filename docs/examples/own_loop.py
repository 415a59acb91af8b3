"""The losses and log-probs in your own training loop: no config, no trainer, only ``dpo_jax``'s public names.

A bigram policy (a [V, V] table of next-token logits) learns, from preference pairs, to prefer completions of even
tokens; its reference is its own starting point. The objective mixes DPO's sigmoid loss with BCO's, whose reward
offset is the running mean of the batch rewards (``RunningMoments``, kept by the loop as TRL < 1.0 did).

    python docs/examples/own_loop.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpo_jax

V, T, B = 16, 6, 32  # vocabulary, tokens a sequence (3 prompt + 3 completion), pairs a batch


def batch(rng: np.random.Generator) -> dict:
    """Pairs that share a prompt: the chosen completion all even tokens, the rejected all odd."""
    prompt = rng.integers(0, V, (B, 3))
    even, odd = 2 * rng.integers(0, V // 2, (B, 3)), 2 * rng.integers(0, V // 2, (B, 3)) + 1
    mask = np.zeros((B, T), bool)
    mask[:, 3:] = True  # the completion's tokens are scored
    return {"chosen": np.concatenate([prompt, even], 1), "rejected": np.concatenate([prompt, odd], 1), "mask": mask}


def logps(table_VxV, tokens_BxT, mask_BxT):
    """Summed completion log-probs of a bigram policy: position t's logits are the row of token t."""
    targets_BxT, scored_BxT = dpo_jax.next_token_targets(tokens_BxT, mask_BxT)
    # next_token_targets scores position t on token t + 1: the mask is of the tokens scored, shifted with them
    return dpo_jax.sequence_logprobs(table_VxV[tokens_BxT], targets_BxT, scored_BxT)[0]


def loss_fn(table, reference, data, moments):
    pol = [logps(table, data[s], data["mask"]) for s in ("chosen", "rejected")]
    ref = [logps(reference, data[s], data["mask"]) for s in ("chosen", "rejected")]
    losses_B, metrics = dpo_jax.preference_loss(
        *pol, *ref, loss_type=("sigmoid", "bco_pair"), loss_weights=(1.0, 0.5), beta=0.5, bco_delta=moments
    )
    return losses_B.mean(), metrics


def train(steps: int = 60, seed: int = 0):
    """Returns (the metrics of every step, the final running moments)."""
    rng = np.random.default_rng(seed)
    reference = jnp.asarray(rng.normal(0, 0.1, (V, V)), jnp.float32)
    table, tx = reference, optax.adam(0.05)
    opt_state, moments = tx.init(table), dpo_jax.RunningMoments.init()

    @jax.jit
    def step(table, opt_state, moments, data):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(table, reference, data, moments)
        updates, opt_state = tx.update(grads, opt_state, table)
        moments = dpo_jax.update_running_moments(moments, metrics["bco/batch_reward"])  # after the loss used it
        return optax.apply_updates(table, updates), opt_state, moments, {"loss": loss, **metrics}

    history = []
    for _ in range(steps):
        table, opt_state, moments, metrics = step(table, opt_state, moments, batch(rng))
        history.append(jax.device_get(metrics))
    return history, moments


if __name__ == "__main__":
    history, moments = train()
    for i in (0, len(history) // 2, len(history) - 1):
        h = history[i]
        print(f"step {i:3d}  loss {h['loss']:.4f}  accuracy {h['rewards/accuracies']:.2f}  "
              f"margin {h['rewards/margins']:.3f}")  # fmt: skip
    print(f"BCO running mean of the batch rewards: {float(moments.mean):.4f} over {int(moments.count)} batches")
