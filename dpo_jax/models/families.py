"""Hugging Face ``config.json`` <-> ``ModelConfig``, family by family.

Every supported architecture is the Llama decoder with a few switches (``ModelConfig``'s family fields):

| architecture | what differs from Llama |
|---|---|
| Mistral | a sliding window |
| Qwen2 | bias on q, k, v |
| Qwen3 | RMSNorm over each head of q and k, ``head_dim`` of its own |
| Gemma 3 (text) | embeddings x sqrt(D), (1 + w) RMSNorm, norms before and after attention and MLP, GeGLU
  (tanh), its own query scale, sliding / global layers with their own RoPE bases, final soft-capping when set |
| OLMo 2 | norms after attention and MLP only, q / k RMSNorm over the whole projection |
| Phi-3 | fused ``qkv_proj`` / ``gate_up_proj`` in its files (split on load), partial rotary, longrope |
| Qwen3-MoE | Qwen3 with a mixture of experts in every layer |
| Mixtral | Mistral with a mixture of experts in every layer |
"""

from __future__ import annotations

import math
from typing import Any

from dpo_jax.models.config import ARCHITECTURES, FAMILIES, ROPE_TYPES, ModelConfig

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _rope(params: dict[str, Any], where: str, hf: dict[str, Any]) -> dict[str, Any]:
    """One RoPE parameter set (``rope_parameters`` of transformers >= 5, or ``rope_scaling`` + ``rope_theta``)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported yet; supported: {ROPE_TYPES}")
    out = {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position"] = int(params["original_max_position_embeddings"])
    if rope_type == "longrope":
        original = int(params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings")))
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        attention = params.get("attention_factor")
        if attention is None:  # the LongRoPE paper's default, as transformers sets it
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        out.update(
            rope_original_max_position=original, rope_attention_factor=float(attention), rope_factor=float(factor),
            rope_short_factor=tuple(map(float, params["short_factor"])),
            rope_long_factor=tuple(map(float, params["long_factor"])),
        )  # fmt: skip
    return out


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def _gemma3(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=true is not supported (a causal decoder is)")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) else "full_attention" for i in range(n)
    ]
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers >= 5: a set per layer type
        full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    else:
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: scaled RoPE on sliding layers is not supported")
    return dict(
        layer_types=tuple("full" if t == "full_attention" else "sliding" for t in types),
        sliding_window=hf.get("sliding_window"),
        local_rope_theta=float(local.get("rope_theta", 10_000.0)),
        qk_norm="head", norm_layout="sandwich", norm_offset=1.0, norm_scale_f32=True,
        embed_scale=float(hf["hidden_size"]) ** 0.5,
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it: neither do we
        final_softcap=hf.get("final_logit_softcapping"),
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        **_rope(full, where, hf),
    )  # fmt: skip


def _moe(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise ValueError(f"{where}: dense layers among the experts (decoder_sparse_step, mlp_only_layers) are "
                         f"not supported; every layer must be a mixture of experts")  # fmt: skip
    width = hf[FAMILIES[arch].expert_width]
    norm = bool(hf.get("norm_topk_prob", False)) if FAMILIES[arch].reads_norm_topk else True
    return dict(
        num_experts=int(hf.get("num_experts") or hf.get("num_local_experts")),
        experts_per_token=int(hf.get("num_experts_per_tok", 2)), expert_intermediate_size=int(width),
        norm_topk_prob=norm, router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )  # fmt: skip


def _family(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The fields a family sets beyond Llama's."""
    bias = bool(hf.get("attention_bias", False))
    family = FAMILIES[arch]
    if family.qwen_sliding and hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported yet")
    out: dict[str, Any] = {**_rope(_rope_params(hf), where, hf), "qkv_bias": bias}
    if arch == "LlamaForCausalLM":
        out.update(o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    elif arch == "Qwen2ForCausalLM":
        out.update(qkv_bias=True)
    elif arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        out.update(qk_norm="head", o_bias=bias)
    elif arch == "Gemma3ForCausalLM":
        out = _gemma3(hf, where)
    elif arch == "Olmo2ForCausalLM":
        out.update(qk_norm="full", norm_layout="post", norm_scale_f32=True, o_bias=bias)
    elif arch == "Phi3ForCausalLM":
        fraction = _rope_params(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        out.update(qkv_bias=False, rope_fraction=float(fraction))
        out.setdefault("rope_original_max_position", int(hf.get("original_max_position_embeddings", 4096)))
    if family.sliding_window:
        out["sliding_window"] = hf.get("sliding_window")
    if family.mixture:
        out.update(_moe(hf, arch, where))
    return out


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json", **overrides) -> ModelConfig:
    """Build a ``ModelConfig`` from a parsed Hugging Face ``config.json``; ``where`` names it in errors."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{where}: architectures {archs} are not supported; supported: {', '.join(ARCHITECTURES)}")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
    required += [FAMILIES[arch].expert_width if FAMILIES[arch].mixture else "intermediate_size"]
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing required fields {missing}")
    eos = hf.get("eos_token_id")
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size", 0),
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", FAMILIES[arch].tied_by_default)),
        mlp_activation=_ACTIVATIONS[act],
        architecture=arch,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        **_family(hf, arch, where),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    if cfg.rope_type == "longrope":
        rope.update(
            short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor), factor=cfg.rope_factor,
            attention_factor=cfg.rope_attention_factor, original_max_position_embeddings=cfg.rope_original_max_position,
        )  # fmt: skip
    if cfg.rope_fraction != 1.0:
        rope["partial_rotary_factor"] = cfg.rope_fraction
    return rope


def _number(x: float) -> int | float:
    """An int when ``x`` is one (up to rounding): transformers' strict configs type some fields int."""
    return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers`` loads as the same architecture."""
    rope, arch = _rope_to_hf(cfg), cfg.architecture
    family = FAMILIES[arch]
    mixtral_width = family.mixture and family.expert_width == "intermediate_size"
    hf = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_intermediate_size if mixtral_width else cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta / rope_scaling.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_type == "default" else {**rope, "type": cfg.rope_type},
        "attention_bias": cfg.qkv_bias,
    }
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    if family.sliding_window:
        hf["sliding_window"] = cfg.sliding_window
    if family.qwen_sliding:
        hf.update(use_sliding_window=False, sliding_window=None)
    if arch == "Phi3ForCausalLM":
        hf["original_max_position_embeddings"] = cfg.rope_original_max_position
        hf["partial_rotary_factor"] = cfg.rope_fraction
    if arch == "Gemma3ForCausalLM":
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or 10_000.0}
        hf.update(
            hidden_activation=hf["hidden_act"], sliding_window=cfg.sliding_window,
            layer_types=[f"{t}_attention" for t in cfg.layer_types],
            rope_parameters={"full_attention": rope, "sliding_attention": local},
            rope_local_base_freq=local["rope_theta"], query_pre_attn_scalar=_number(cfg.scores_scale**-2),
            final_logit_softcapping=cfg.final_softcap,
        )  # fmt: skip
    if family.mixture:
        hf.update(
            num_experts_per_tok=cfg.experts_per_token, router_aux_loss_coef=cfg.router_aux_loss_coef,
            num_local_experts=cfg.num_experts, num_experts=cfg.num_experts,
        )  # fmt: skip
    if arch == "Qwen3MoeForCausalLM":
        hf.update(moe_intermediate_size=cfg.expert_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
    return hf
