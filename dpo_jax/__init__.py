"""dpo_jax: Direct Preference Optimization in JAX."""

from dpo_jax.logprobs import (
    chunked_sequence_logprobs,
    next_token_targets,
    sequence_logprobs,
    token_kl,
    token_logprobs,
)
from dpo_jax.losses import LOSS_TYPES, preference_loss

__all__ = [
    "LOSS_TYPES",
    "chunked_sequence_logprobs",
    "next_token_targets",
    "preference_loss",
    "sequence_logprobs",
    "token_kl",
    "token_logprobs",
]
__version__ = "0.1.0"
