"""The algorithm: losses, per-token log-probs and the scored-token head, scoring of packed rows, the typed batch,
hyper-parameters, the train state, the optimizer and the pure train / eval steps, and sampling. Imports jax, optax,
flax and dpo_jax.models only: no config, file system, hub, reward or data-format code."""
