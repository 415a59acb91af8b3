"""Scoring batches with a decoder: pair log-probs, teacher-forced sample log-probs, token KL.

Shape letters: B pairs, L tokens, R rows per pair scored (2 = chosen, rejected; 1 = chosen only), N new tokens,
P prompt tokens, V vocabulary. ``params`` is the ``nnx.State`` of a ``Decoder`` whose ``graphdef`` is static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import logprobs as lp


def _rows(batch: dict, key: str, rows: int):
    x = batch[key][:, :rows]
    return x.reshape(x.shape[0] * rows, x.shape[2])  # pair-major: chosen, rejected, chosen, ...


def pair_logps(graphdef, params, batch: dict, *, rows: int = 2, token_chunk: int = 1024, vocab_chunk: int = 8192):
    """Summed completion log-probs and token counts, each [B, R], via the chunked LM head (no [.., V] logits)."""
    model = nnx.merge(graphdef, params)
    tokens = _rows(batch, "tokens", rows)
    out = model(
        tokens,
        positions_BxT=_rows(batch, "positions", rows),
        segment_ids_BxT=_rows(batch, "segment_ids", rows),
        attention_mask_BxT=_rows(batch, "attention_mask", rows),
        return_logits=False,
    )
    targets, mask = lp.next_token_targets(tokens, _rows(batch, "loss_mask", rows))
    sums, counts = lp.chunked_sequence_logprobs(
        out.hidden_BxTxD, model.lm_head_weight(), targets, mask, token_chunk=token_chunk, vocab_chunk=vocab_chunk
    )
    b = batch["tokens"].shape[0]
    return sums.reshape(b, rows), counts.reshape(b, rows)


def completion_token_kl(graphdef, policy, reference, batch: dict):
    """Exact full-vocabulary KL(pi || pi_ref) summed over each chosen completion's tokens: ([B], token counts [B])."""
    kw = dict(
        positions_BxT=_rows(batch, "positions", 1),
        segment_ids_BxT=_rows(batch, "segment_ids", 1),
        attention_mask_BxT=_rows(batch, "attention_mask", 1),
    )
    tokens = _rows(batch, "tokens", 1)
    p_logits = nnx.merge(graphdef, policy)(tokens, **kw).logits_BxTxV
    q_logits = nnx.merge(graphdef, reference)(tokens, **kw).logits_BxTxV
    _, mask = lp.next_token_targets(tokens, _rows(batch, "loss_mask", 1))
    kl_BxT = lp.token_kl(p_logits, q_logits, mask)
    return jnp.sum(kl_BxT, axis=-1), jnp.sum(mask, axis=-1).astype(jnp.float32)


def sample_logps(graphdef, params, prompt_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN):
    """Per-token log-probs [B, N] of sampled continuations (left-padded prompts), teacher-forced."""
    tokens = jnp.concatenate([prompt_BxP, tokens_BxN], axis=1)
    attn = jnp.concatenate([prompt_mask_BxP, mask_BxN], axis=1).astype(bool)
    positions = jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0)
    logits = nnx.merge(graphdef, params)(tokens, positions_BxT=positions, attention_mask_BxT=attn).logits_BxTxV
    p = prompt_BxP.shape[1]
    per_token = lp.token_logprobs(logits[:, p - 1 : -1], tokens_BxN)
    return jnp.where(mask_BxN, per_token, 0.0)


def count_matmul_params(model) -> tuple[int, int]:
    """(all parameters, those in a per-token matmul): the embedding lookup is free, the LM head (tied or not) is not."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    tied = model.lm_head is None
    return total, total if tied else total - model.embed_tokens[...].size
