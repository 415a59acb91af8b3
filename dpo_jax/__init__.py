"""dpo_jax: Direct Preference Optimization in JAX. The names here are the losses and log-probs for use in your own
training loop (docs/hooks.md): every option of ``preference_loss``, BCO's running moments, soft-target tempering."""

from dpo_jax.core.logprobs import (
    chunked_sequence_logprobs,
    next_token_targets,
    sequence_logprobs,
    token_kl,
    token_logprobs,
)
from dpo_jax.core.losses import (
    BATCH_LOSSES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    LOSS_TYPES,
    POLICY_ONLY,
    RunningMoments,
    preference_loss,
    temper_targets,
    update_running_moments,
)

__all__ = [
    "BATCH_LOSSES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "LOSS_TYPES",
    "POLICY_ONLY",
    "RunningMoments",
    "temper_targets",
    "update_running_moments",
    "chunked_sequence_logprobs",
    "next_token_targets",
    "preference_loss",
    "sequence_logprobs",
    "token_kl",
    "token_logprobs",
]
__version__ = "0.1.0"
