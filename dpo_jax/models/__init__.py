"""Flax NNX decoders."""

from dpo_jax.models.config import ARCHITECTURES, ModelConfig
from dpo_jax.models.families import config_from_hf, config_to_hf
from dpo_jax.models.llama import Decoder, DecoderOutput, KVCache, init_decoder

__all__ = [
    "ARCHITECTURES",
    "Decoder",
    "DecoderOutput",
    "KVCache",
    "ModelConfig",
    "config_from_hf",
    "config_to_hf",
    "init_decoder",
]
