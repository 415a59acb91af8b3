"""Scoring batches with a decoder: pair log-probs, teacher-forced sample log-probs, token KL.

Shape letters: G groups, K rows per group, T row length, P pairs per group, Z score blocks, S scored entries
per block, N new tokens, V vocabulary. Batches are laid out as ``dpo_jax.data.packing`` describes; whatever the layout,
the LM head runs only on the S scored entries of each block (completion tokens), never on prompt or padding
slots, and per-sequence sums come back by segment. ``params`` is the ``nnx.State`` of a ``Decoder`` whose
``graphdef`` is static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.core import logprobs as lp
from dpo_jax.core.batch import Batch
from dpo_jax.models import moe


def token_keys(key: jax.Array, pair_BxT, branch_BxT, positions_BxT) -> jax.Array:
    """A typed key per token from (dataset row of its pair, branch, position): what names a token in every layout,
    so its dropout masks do not depend on the layout, the batch's order, grad_accum or the devices."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key (``TrainState.rng``)

    def one(pair, branch, position):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, pair), branch), position)

    ids = (pair_BxT, branch_BxT, positions_BxT)
    return jax.vmap(one)(*(x.reshape(-1) for x in ids)).reshape(pair_BxT.shape)


def scored_hidden(graphdef, params, batch: Batch, dropout_key=None, *, router_logits=False):
    """(model, hidden states [Z, S, D] at the scored entries, router statistics or None): one forward over the
    batch's rows (a training step's ``dropout_key``: LoRA dropout, a mask per token from ``token_keys``). The router
    statistics of a mixture of experts cover every real token of the rows (``router_logits``: with the logits)."""
    model = nnx.merge(graphdef, params)
    g, k, t = batch.tokens_GxKxT.shape

    def rows(x_GxKxT):
        return x_GxKxT.reshape(g * k, t)

    segments = rows(batch.segment_ids_GxKxT)
    keys = None
    if dropout_key is not None and model.config.lora_dropout > 0:  # only a model that drops needs the token keys
        keys = token_keys(dropout_key, rows(batch.pair_GxKxT), rows(batch.branch_GxKxT), rows(batch.positions_GxKxT))
    out = model(
        rows(batch.tokens_GxKxT),
        positions_BxT=rows(batch.positions_GxKxT),
        segment_ids_BxT=segments,
        branch_ids_BxT=rows(batch.branch_GxKxT),
        attention_mask_BxT=segments > 0,
        return_logits=False,
        dropout_keys_BxT=keys,
        router_logits=router_logits,
    )
    z = batch.score_src_ZxS.shape[0]
    hidden_ZxSlotsxD = out.hidden_BxTxD.reshape(z, g // z * k * t, -1)  # consecutive groups: a device-local reshape
    return model, jnp.take_along_axis(hidden_ZxSlotsxD, batch.score_src_ZxS[..., None], axis=1), out.router


def token_logps(graphdef, params, batch: Batch, *, token_chunk=1024, vocab_chunk=8192, max_logits_mb=256.0,
                sum_sq=False, dropout_key=None, router=None):  # fmt: skip
    """Log-probs [Z, S] of the scored entries (0 where ``score_mask`` is 0); with ``sum_sq`` also
    log sum_v p_v^2 [Z, S] at each entry (WPO's alignment term; no gradient). ``router``: a dict that receives the
    forward's router statistics (a mixture of experts)."""
    model, h_ZxSxD, stats = scored_hidden(graphdef, params, batch, dropout_key)
    if router is not None and stats is not None:
        router["router"] = stats
    z, s, d = h_ZxSxD.shape
    w, vocab_axis = model.lm_head_as_stored()
    head = dict(token_chunk=token_chunk, vocab_chunk=vocab_chunk, max_logits_mb=max_logits_mb,
                softcap=model.config.final_softcap, vocab_axis=vocab_axis)  # fmt: skip
    targets = jnp.where(batch.score_mask_ZxS > 0, batch.score_target_ZxS, 0).reshape(z * s)
    h_NxD = h_ZxSxD.reshape(z * s, d)
    logps = lp.head_token_logprobs(h_NxD, w, targets, **head)
    logps = jnp.where(batch.score_mask_ZxS > 0, logps.reshape(z, s), 0.0)
    if not sum_sq:
        return logps
    sq = lp.head_log_sum_sq_probs(h_NxD, w, **head).reshape(z, s)
    return logps, jnp.where(batch.score_mask_ZxS > 0, sq, 0.0)


def completion_ranks(batch: Batch) -> jax.Array:
    """[Z, S] 0-based position of each scored entry within its completion (entries of a sequence are
    consecutive in their block, in token order)."""
    z, s = batch.score_seq_ZxS.shape
    g, p = batch.valid_GxP.shape
    idx_S = jnp.arange(s)

    def one(seq_S, mask_S):
        first = jax.ops.segment_min(jnp.where(mask_S > 0, idx_S, s), seq_S, num_segments=2 * (g // z) * p)
        return idx_S - first[seq_S]

    return jax.vmap(one)(batch.score_seq_ZxS, batch.score_mask_ZxS)


def tail_mask(batch: Batch, counts: jax.Array) -> jax.Array:
    """[Z, S] entries past the shorter completion of their pair (LD-DPO's verbose tail); ``counts`` [G * P, 2]."""
    z = batch.score_seq_ZxS.shape[0]
    shared_Zx = jnp.min(counts, axis=1).reshape(z, -1)  # per block, pair slot
    shared_ZxS = jnp.take_along_axis(shared_Zx, batch.score_seq_ZxS // 2, axis=1)
    return (completion_ranks(batch) >= shared_ZxS) & (batch.score_mask_ZxS > 0)


def sequence_sums(values_ZxS: jax.Array, batch: Batch) -> jax.Array:
    """Per-pair, per-side sums [G * P, 2] of per-entry values (a segment sum over ``score_seq`` in each block)."""
    g, p = batch.valid_GxP.shape
    z = batch.score_seq_ZxS.shape[0]
    q = 2 * (g // z) * p  # sequences per block
    values_ZxS = jnp.where(batch.score_mask_ZxS > 0, values_ZxS, 0.0)
    sums_ZxQ = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=q))(values_ZxS, batch.score_seq_ZxS)
    return sums_ZxQ.reshape(g * p, 2)


def pair_values(values_GxP: jax.Array) -> jax.Array:
    """A per-pair array of the batch, flattened to [G * P] in the order of ``pair_logps``."""
    return values_GxP.reshape(-1)


def pair_logps(graphdef, params, batch: Batch, **head):
    """Summed completion log-probs and token counts, each [G * P, 2] (chosen, rejected; rejected is empty in a
    chosen-only SFT batch), via the scored-token LM head."""
    stats = pair_stats(graphdef, params, batch, **head)
    return stats["logps"], stats["counts"]


def pair_stats(graphdef, params, batch: Batch, *, tails=False, wpo=False, dropout_key=None, **head) -> dict:
    """``pair_logps`` and, on request, from the same pass: ``tails`` [G * P, 2], the part of each sum past the
    shorter completion (LD-DPO weights it: sum - (1 - alpha) * tail), and ``wpo`` [G * P, 2], each sequence's
    mean of log p - log sum p^2 (WPO's aligned log-probability; no gradient); a mixture of experts adds
    ``router``, the forward's router statistics (``dpo_jax.models.moe``)."""
    router: dict = {}
    out = token_logps(graphdef, params, batch, sum_sq=wpo, dropout_key=dropout_key, router=router, **head)
    logps_ZxS, sq_ZxS = out if wpo else (out, None)
    counts = sequence_sums(batch.score_mask_ZxS.astype(jnp.float32), batch)
    stats = {"logps": sequence_sums(logps_ZxS, batch), "counts": counts, **router}
    if tails:
        stats["tails"] = sequence_sums(jnp.where(tail_mask(batch, counts), logps_ZxS, 0.0), batch)
    if wpo:
        aligned = jax.lax.stop_gradient(logps_ZxS) - sq_ZxS
        stats["wpo"] = sequence_sums(aligned, batch) / jnp.maximum(counts, 1.0)
    return stats


def completion_token_kl(graphdef, policy, reference, batch: Batch, *, max_logits_mb: float = 256.0):
    """Exact full-vocabulary KL(pi || pi_ref) summed over each chosen completion's tokens: ([G * P], token counts,
    router drift). Full logits are computed at the scored entries only, in chunks of at most ``max_logits_mb``.
    The router drift of a mixture of experts is (the sum over the rows' real tokens of KL(policy routing ||
    reference routing), averaged over layers; tokens), else None."""
    pol, h_pol, r_pol = scored_hidden(graphdef, policy, batch, router_logits=True)
    ref, h_ref, r_ref = scored_hidden(graphdef, reference, batch, router_logits=True)
    chosen_ZxS = (batch.score_seq_ZxS % 2 == 0) & (batch.score_mask_ZxS > 0)
    z, s, d = h_pol.shape
    kl_N = lp.chunked_token_kl(pol.logits, ref.logits, h_pol.reshape(z * s, d), h_ref.reshape(z * s, d),
                               chosen_ZxS.reshape(z * s), vocab_size=pol.config.vocab_size,
                               max_logits_mb=max_logits_mb)  # fmt: skip
    kl_ZxS = kl_N.reshape(z, s)
    n = chosen_ZxS.astype(jnp.float32)
    drift = None
    if r_pol is not None:
        g, k, t = batch.tokens_GxKxT.shape
        valid_BxT = batch.segment_ids_GxKxT.reshape(g * k, t) > 0
        drift = moe.routing_kl(r_pol["logits"], r_ref["logits"], valid_BxT)
    return sequence_sums(kl_ZxS, batch)[:, 0], sequence_sums(n, batch)[:, 0], drift


def sample_logps(graphdef, params, prompt_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN, *, max_logits_mb=256.0):
    """Per-token log-probs [B, N] of sampled continuations (left-padded prompts), teacher-forced: the LM head on
    the N continuation positions only (not the prompt's), chunked as the training head is."""
    tokens = jnp.concatenate([prompt_BxP, tokens_BxN], axis=1)
    attn = jnp.concatenate([prompt_mask_BxP, mask_BxN], axis=1).astype(bool)
    positions = jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0)
    model = nnx.merge(graphdef, params)
    hidden = model(tokens, positions_BxT=positions, attention_mask_BxT=attn, return_logits=False).hidden_BxTxD
    p = prompt_BxP.shape[1]
    b, n = tokens_BxN.shape
    w, vocab_axis = model.lm_head_as_stored()
    per_token = lp.head_token_logprobs(hidden[:, p - 1 : -1].reshape(b * n, -1), w, tokens_BxN.reshape(b * n),
                                       max_logits_mb=max_logits_mb, softcap=model.config.final_softcap,
                                       vocab_axis=vocab_axis)  # fmt: skip
    return jnp.where(mask_BxN, per_token.reshape(b, n), 0.0)


def count_matmul_params(model) -> tuple[int, int]:
    """(all parameters, those in a per-token matmul): the embedding lookup is free, the LM head (tied or not) is not."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    tied = model.lm_head is None
    return total, total if tied else total - model.embed_tokens[...].size
