"""A reward model's score: a decoder's final hidden state at a sequence's last token times the score head, as
``transformers``' ``*ForSequenceClassification`` computes it (the rightmost token that is not the pad id)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from dpo_jax.models.llama import Decoder


def last_token(tokens_BxT: Array, pad_id: int) -> Array:
    """[B] the index of each row's rightmost token that is not ``pad_id`` (0 for a row of padding only)."""
    t = tokens_BxT.shape[1]
    return jnp.argmax(jnp.arange(t) * (tokens_BxT != pad_id), axis=1)


def sequence_scores(decoder: Decoder, score_LxD: Array, tokens_BxT: Array, pad_id: int) -> Array:
    """[B, L] scores of right-padded rows (float32): the final hidden state at ``last_token`` times the head."""
    mask_BxT = jnp.arange(tokens_BxT.shape[1]) <= last_token(tokens_BxT, pad_id)[:, None]
    hidden_BxTxD = decoder(tokens_BxT, attention_mask_BxT=mask_BxT, return_logits=False).hidden_BxTxD
    index_B = last_token(tokens_BxT, pad_id)
    last_BxD = jnp.take_along_axis(hidden_BxTxD, index_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return last_BxD @ jnp.asarray(score_LxD, jnp.float32).T
