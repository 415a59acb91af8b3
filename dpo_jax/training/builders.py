"""Small builders a run wires together: the mesh, the policy (a local checkpoint or a new model; LoRA adapters on
a frozen base), the reference's parameters, and its log-probs cached on disk."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dpo_jax.config import ConfigError, check_moe_fields, config_value, loss_types, needs_reference
from dpo_jax.configs.default import get_config as default_config
from dpo_jax.core import scoring
from dpo_jax.core.hparams import DECLARED, HParams
from dpo_jax.core.losses import F_DIVERGENCES
from dpo_jax.errors import Notes
from dpo_jax.infra import hf, sharding, signals, throughput
from dpo_jax.infra.workdir import clean_stale_tmp
from dpo_jax.models import ModelConfig, config_from_hf, init_decoder, lora
from dpo_jax.models.config import FAMILIES
from dpo_jax.training import reference


def make_mesh(cfg, devices, num_members: int = 1):
    """The config's ``(member, data, fsdp, expert, context, tensor)`` mesh over ``devices`` for ``num_members``
    members."""
    m = cfg.mesh
    expert, context = m.get("expert", 1), m.get("context", 1)
    size = m.member or sharding.member_axis_size(num_members, len(devices) // expert // context, m.data, m.fsdp,
                                                 m.tensor)  # fmt: skip
    if num_members % size:
        raise ConfigError(f"config.mesh.member: expected a divisor of the {num_members} members, got {size}")
    return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices, member=size, expert=expert, context=context)


def hparams(cfg, types: tuple[str, ...] | None = None, peak_lr: float | None = None) -> HParams:
    """The traced hyper-parameters of member ``cfg``; ``types``: the step's loss types (a population's union;
    default: the member's own), ``peak_lr``: the shared schedule's peak (default: the member's learning rate).
    Each declared in ``dpo_jax.core.hparams``: one set by one field is that field's value; the derived ones here."""
    own = loss_types(cfg)
    types = own if types is None else tuple(types)
    w = tuple(cfg.dpo.loss_weights) or (1.0,) * len(own)
    peak_lr = cfg.optim.learning_rate if peak_lr is None else peak_lr
    derived = dict(
        lr_scale=cfg.optim.learning_rate / peak_lr,
        loss_weights=[sum(wi for ti, wi in zip(own, w, strict=True) if ti == t) for t in types],
        f_divergence=F_DIVERGENCES.index(cfg.dpo.f_divergence_type),
        uses_reference=needs_reference(cfg),
    )
    values = {n: derived[n] if h.derived else config_value(cfg, h.fields[0]) for n, h in DECLARED.items()}
    return HParams(**{n: np.asarray(v, DECLARED[n].dtype) for n, v in values.items()})


def default_hparams(**dpo) -> HParams:
    """Tests and benchmarks: the default config's hyper-parameters with ``dpo`` fields (and ``loss_type``) set."""
    cfg = default_config()
    for k, v in dpo.items():
        cfg.dpo[k] = v
    return hparams(cfg)


def optim_section(**values) -> dict:
    """The default config's ``optim`` section with ``values`` replaced (tests and benchmarks)."""
    return {**dict(default_config().optim), **values}


def head_options(cfg) -> dict:
    """The LM head's chunking (``logprobs.*``; the kept-logits budget sized from the device)."""
    lp = cfg.logprobs
    budget = throughput.logits_budget_mb(lp.max_logits_mb)
    return dict(token_chunk=lp.token_chunk, vocab_chunk=lp.vocab_chunk, max_logits_mb=budget)


def model_options(cfg) -> dict:
    """How the config runs a model, whatever its weights: compute dtype, remat, scan, attention."""
    m = cfg.model
    return dict(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.get("attention", "auto"),
                attention_block=m.get("attention_block", 512), mlp_chunk=m.get("mlp_chunk", 0),
                context_attention=m.get("context_attention", "ring"),
                moe_impl=cfg.moe.impl)  # fmt: skip


def moe_options(cfg, model: ModelConfig) -> dict:
    """The step's mixture-of-experts switches: the load-balancing weight (``moe.aux_loss_coef``, -1: the
    checkpoint's) and ``moe.freeze_router``; nothing for a dense model."""
    if not model.num_experts:
        return {}
    coef = cfg.moe.aux_loss_coef
    return dict(aux_loss_coef=model.router_aux_loss_coef if coef < 0 else coef, freeze_router=cfg.moe.freeze_router)


def scratch_config(cfg, tokenizer) -> ModelConfig:
    """A new model of ``model.*``'s sizes and family: the family's switches set as from its ``config.json``."""
    m = cfg.model
    hf = dict(
        architectures=[m.architecture], vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=cfg.data.max_length, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        num_experts=m.num_experts, num_experts_per_tok=m.experts_per_token, norm_topk_prob=True,
        moe_intermediate_size=m.expert_intermediate_size or m.intermediate_size,
    )  # fmt: skip
    if FAMILIES[m.architecture].expert_width == "intermediate_size":  # Mixtral: the field is the experts' width
        hf["intermediate_size"] = m.expert_intermediate_size or m.intermediate_size
    return config_from_hf(hf, where="config.model", **model_options(cfg))


def build_model(cfg, tokenizer):
    """The config's model: ``model.hf_path`` loaded, or a new one of ``model.*``'s sizes (seed ``seed``)."""
    m = cfg.model
    if m.init == "hf":
        model, _ = hf.load_pretrained(m.hf_path, **model_options(cfg))
        return model
    return init_decoder(scratch_config(cfg, tokenizer), seed=cfg.seed)


@dataclasses.dataclass
class Policy:
    """The policy a run trains: ``params`` (the whole model, or LoRA adapters with the frozen ``base``)."""

    graphdef: Any
    config: ModelConfig
    params: Any
    base: Any  # LoRA: the frozen base (bfloat16 / int8 as lora.base_dtype says); None otherwise
    n_params: int
    matmul_params: int  # parameters in a per-token matmul (the throughput accounting's)

    def whole(self, params=None):
        """The whole model state of ``params`` (default: the policy's own)."""
        return lora.whole(self.params if params is None else params, self.base)


def build_policy(cfg, tokenizer, mesh, notes: Notes) -> Policy:
    """The config's model with its LoRA adapters (if any), placed on the mesh; warnings about what it was given."""
    model, lo = build_model(cfg, tokenizer), cfg.lora
    if lo.rank:  # adapters on the loaded or initialised model: the same function until trained
        model = lora.attach_config(model, lo, cfg.seed)
    if lo.rank and cfg.optim.learning_rate < 2e-6:
        notes.warn(
            f"lora.rank={lo.rank} with optim.learning_rate={cfg.optim.learning_rate:g}, a full fine-tuning rate: "
            "adapters move the margins ~50x less per step at the same rate; LoRA runs usually take 1e-5 to 1e-4 "
            "(configs/hf_local.py:lora uses 2.5e-5)"
        )
    if cfg.data.max_length > model.config.max_position_embeddings:
        notes.warn(
            f"data.max_length={cfg.data.max_length} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}: positions beyond it were never trained"
        )
    if cfg.reference.hf_path:
        check_reference(cfg, model.config)
    check_moe_fields(cfg, model.config.num_experts > 0)
    graphdef, params = nnx.split(model)
    n_params, matmul_params = scoring.count_matmul_params(model)
    params = lora.cast_base(params, lo.base_dtype) if lo.rank else params
    params = jax.device_put(params, sharding.param_shardings(params, mesh))
    params, base = lora.split(params) if lo.rank else (params, None)  # LoRA: the adapters train, the base is frozen
    return Policy(graphdef, model.config, params, base, n_params, matmul_params)


def check_reference(cfg, policy_config) -> None:
    """``reference.hf_path`` must hold the policy's architecture (before anything trains)."""
    ref = hf.load_config(cfg.reference.hf_path, **model_options(cfg))
    policy = policy_config.replace(lora_rank=0, lora_alpha=ref.lora_alpha, lora_targets=(), lora_dropout=0.0)
    if ref != policy:
        a, b = dataclasses.asdict(ref), dataclasses.asdict(policy)
        diff = ", ".join(f"{k} {a[k]!r} (policy {b[k]!r})" for k in a if a[k] != b[k])
        raise ConfigError(f"config.reference.hf_path: expected a model of the policy's architecture; got {diff}")


def reference_params(cfg, policy: Policy, mesh):
    """The reference, kept outside the trained state: ``reference.hf_path``'s weights (in the policy's layout, LoRA
    adapters off), or the initial policy: its own arrays, no copy (no program donates them: a stage starts from a
    state its init makes; a full-size model's reference costs no second copy of its weights), LoRA: the base with
    the adapters off."""
    lo = cfg.lora
    if cfg.reference.hf_path:
        ref, _ = hf.load_pretrained(cfg.reference.hf_path, **model_options(cfg))
        if lo.rank:
            state = lora.cast_base(nnx.state(lora.attach_config(ref, lo, cfg.seed)), lo.base_dtype)
            adapters, ref_base = lora.split(state)
            params = lora.compose(lora.off(adapters), ref_base)
        else:
            params = nnx.state(ref)
        return jax.device_put(params, sharding.param_shardings(params, mesh))
    if policy.base is None:
        return policy.params
    return lora.compose(lora.off(policy.params), policy.base)


def reference_cache(cfg, cfgs, workdir: Path, policy: Policy, ref_params, data, mesh, layout, pad_id):
    """The reference's log-probs of the train and eval pairs, computed once and cached on disk (``reference``),
    when ``reference.mode='cached'`` and some member reads a reference (with LD-DPO's tails when one needs them);
    (train values, eval values, summary entries), values None otherwise."""
    summary: dict[str, Any] = {"reference/mode": cfg.reference.mode}
    if cfg.reference.hf_path:
        summary["reference/hf_path"] = cfg.reference.hf_path
    signals.check("before the reference pass (the SFT stage is saved)")
    if cfg.reference.mode != "cached" or not any(needs_reference(c) for c in cfgs):
        return None, None, summary
    tails = any(c.dpo.ld_alpha != 1 for c in cfgs)
    cache_dir = cfg.reference.cache_dir or str(workdir.parent / "reference_cache")
    if jax.process_index() == 0:
        clean_stale_tmp(cache_dir)
    head = head_options(cfg)
    compute = functools.partial(
        reference.compute_logps, policy.graphdef, ref_params, mesh=mesh, batch_size=cfg.eval.batch_size,
        layout=layout, pad_id=pad_id, head=head, tails=tails,
    )  # fmt: skip
    settings = {"head": head, "layout": [layout.kind, layout.shared, layout.row_length, list(layout.buckets)]}
    if tails:
        settings["tails"] = True
    t0, values, hits = time.perf_counter(), [], []
    for pairs in (data.train_pairs, data.eval_pairs):
        key = reference.cache_key(ref_params, policy.config, pairs, settings)
        v, hit = reference.cached_logps(cache_dir, key, functools.partial(compute, pairs), pairs)
        values.append(v)
        hits.append(hit)
    summary.update({"reference/cache_hit": all(hits), "reference/pass_s": time.perf_counter() - t0,
                    "reference/cache_dir": cache_dir})  # fmt: skip
    return values[0], values[1], summary
