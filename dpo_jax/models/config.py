"""Decoder configuration, and its mapping to and from Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = {  # Hugging Face architecture -> model_type
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "einsum", "blockwise", "cudnn", "pallas")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Parameters are float32; ``dtype`` is the compute dtype."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # rope scaling: "linear" uses rope_factor; "llama3" uses all four.
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q, k, v
    o_bias: bool = False  # Llama attention_bias: also on o
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included)
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    scan_layers: bool = True  # lax.scan over layers: compile time independent of depth
    remat: str = "none"  # none | full | dots | dots_no_batch
    # attention (dpo_jax.models.attention): auto | einsum | blockwise | cudnn | pallas; blockwise works in blocks
    # of attention_block queries and keys (memory linear in the row)
    attention: str = "auto"
    attention_block: int = 512
    # LoRA adapters (dpo_jax.lora): rank 0 = none; the targets are projection names (q_proj, ..., down_proj)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0  # on the adapters' input (PEFT's), in training steps only: a call given a dropout key

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not supported; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION or self.attention_block < 8 or self.attention_block % 8:
            raise ValueError(
                f"attention must be one of {ATTENTION} with attention_block a multiple of 8; got {self.attention!r}, "
                f"{self.attention_block}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16; got {self.dtype!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if self.lora_rank < 0 or (self.lora_rank and not set(self.lora_targets) <= set(LORA_TARGETS)):
            raise ValueError(
                f"lora: rank >= 0 and targets among {LORA_TARGETS}; got {self.lora_rank}, {self.lora_targets}"
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; expected one of {list(ARCHITECTURES)}"
            )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)


def _rope_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    # transformers >= 5 writes "rope_parameters"; older checkpoints "rope_theta" and "rope_scaling".
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
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
    return out


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json", **overrides) -> ModelConfig:
    """Build a ``ModelConfig`` from a parsed Hugging Face ``config.json``; ``where`` names it in errors."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{where}: architectures {archs} are not supported; supported: {', '.join(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False):
        raise ValueError(f"{where}: Qwen2 use_sliding_window=true is not supported yet")
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if k not in hf
    ]
    if missing:
        raise ValueError(f"{where}: missing required fields {missing}")
    eos = hf.get("eos_token_id")
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        o_bias=arch == "LlamaForCausalLM" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=hf.get("sliding_window") if arch == "MistralForCausalLM" else None,
        architecture=arch,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        **_rope_from_hf(hf, where),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers`` loads as the same architecture."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    hf = {
        "architectures": [cfg.architecture],
        "model_type": ARCHITECTURES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
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
    }
    if cfg.architecture == "LlamaForCausalLM":
        hf.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    if cfg.architecture == "MistralForCausalLM":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "Qwen2ForCausalLM":
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf
