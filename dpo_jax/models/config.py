"""Decoder configuration: one dataclass for every family (``dpo_jax.models.families`` maps ``config.json`` to it)."""

from __future__ import annotations

import dataclasses

from dpo_jax.models import context, kernels


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family's facts, read by loading and export (``dpo_jax.models.families``, ``dpo_jax.infra.hf``),
    LoRA's PEFT export, building a new model and the config's validation: nothing else asks for an architecture.

    ``mixture``: every MLP is a mixture of experts; ``experts_module`` / ``expert_names``: where its router
    ("gate") and experts live in ``config.json``'s weights and their projections' names (ours -> theirs);
    ``expert_width``: the ``config.json`` field of an expert's width; ``fused``: q/k/v live in one ``qkv_proj``
    and gate/up in one ``gate_up_proj`` (``fused_projections``); ``sliding_window``: ``config.json``'s
    ``sliding_window`` applies to every layer; ``tied_by_default``: embeddings tied when ``config.json`` is
    silent; ``qwen_sliding``: a ``use_sliding_window`` switch we refuse when on."""

    model_type: str
    mixture: bool = False
    experts_module: str = "mlp"
    expert_names: tuple[tuple[str, str], ...] = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"),
                                                 ("down_proj", "down_proj"))  # fmt: skip
    expert_width: str = "moe_intermediate_size"
    fused: bool = False
    sliding_window: bool = False
    tied_by_default: bool = False
    qwen_sliding: bool = False
    reads_norm_topk: bool = False  # config.json's norm_topk_prob (default False) decides; otherwise always normalised
    classifier: str = ""  # its *ForSequenceClassification architecture (a reward model), when not the causal name's


FAMILIES = {  # Hugging Face architecture -> its facts
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("mistral", sliding_window=True),
    "Qwen2ForCausalLM": Family("qwen2", qwen_sliding=True),
    "Qwen3ForCausalLM": Family("qwen3", qwen_sliding=True),
    "Gemma3ForCausalLM": Family("gemma3_text", tied_by_default=True, classifier="Gemma3TextForSequenceClassification"),
    "Olmo2ForCausalLM": Family("olmo2"),
    "Phi3ForCausalLM": Family("phi3", fused=True, sliding_window=True),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", mixture=True, qwen_sliding=True, reads_norm_topk=True),
    "MixtralForCausalLM": Family(
        "mixtral", mixture=True, experts_module="block_sparse_moe", sliding_window=True,
        expert_names=(("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")), expert_width="intermediate_size",
    ),
}  # fmt: skip
ARCHITECTURES = {arch: f.model_type for arch, f in FAMILIES.items()}  # Hugging Face architecture -> model_type
MIXTURES = tuple(arch for arch, f in FAMILIES.items() if f.mixture)  # the families whose MLP is a mixture of experts
CLASSIFIERS = {  # a reward model's *ForSequenceClassification architecture -> its family's causal one
    f.classifier or arch.replace("ForCausalLM", "ForSequenceClassification"): arch for arch, f in FAMILIES.items()
}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
QK_NORMS = ("none", "head", "full")
NORM_LAYOUTS = ("pre", "post", "sandwich")
ACTIVATIONS = ("silu", "gelu_tanh")
MOE_IMPLS = ("blocked", "grouped", "dense")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = kernels.IMPLEMENTATIONS
CONTEXT_ATTENTION = tuple(context.CONTEXT_STRATEGIES)  # over a mesh's context axis


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder of the Llama lineage. Parameters are float32; ``dtype`` is the compute dtype. The family fields
    below default to Llama's; ``dpo_jax.models.families`` sets them from a checkpoint's ``config.json``."""

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
    # per layer "sliding" | "full" (Gemma 3 alternates); empty: every layer sliding when sliding_window is set
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # the sliding layers' own RoPE base (Gemma 3), unscaled
    rope_fraction: float = 1.0  # partial rotary: the first fraction of each head's width is rotated (Phi-3 family)
    rope_short_factor: tuple[float, ...] = ()  # longrope (Phi-3): per-frequency factors for rows up to
    rope_long_factor: tuple[float, ...] = ()  # rope_original_max_position, and past it
    rope_attention_factor: float = 1.0  # longrope: cos and sin scaled by it
    qk_norm: str = "none"  # none | head (Qwen3, Gemma 3: RMSNorm over each head) | full (OLMo 2: whole projection)
    norm_layout: str = "pre"  # pre (Llama) | post (OLMo 2: after attention / MLP) | sandwich (Gemma 3: both)
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (offset + w)
    norm_scale_f32: bool = False  # (x * w) in float32, then cast (Gemma, OLMo 2); Llama casts, then scales
    mlp_activation: str = "silu"  # silu | gelu_tanh (Gemma's GeGLU)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    query_scale: float | None = None  # attention scores' scale; default head_dim ** -0.5 (Gemma 3: its own)
    attn_softcap: float | None = None  # soft-capping of attention scores: cap * tanh(s / cap)
    final_softcap: float | None = None  # ... and of the final logits (Gemma 3 when its config sets it)
    # mixture of experts (Qwen3-MoE, Mixtral): experts > 0 replaces every layer's MLP
    num_experts: int = 0
    experts_per_token: int = 2
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    router_aux_loss_coef: float = 0.001  # the checkpoint's (config.json); moe.aux_loss_coef may override it
    moe_impl: str = "blocked"  # blocked (sorted, padded to blocks, scanned) | grouped (ragged_dot) | dense
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    scan_layers: bool = True  # lax.scan over layers: compile time independent of depth
    remat: str = "none"  # none | full | dots | dots_no_batch
    # attention (dpo_jax.models.kernels): auto | einsum | blockwise | splash | cudnn | pallas; blockwise and splash
    # work in blocks of attention_block queries and keys (memory linear in the row)
    attention: str = "auto"
    attention_block: int = 512
    # rows split over a mesh's context axis: ring (key/value chunks passed round) | gather (every device gathers the
    # row's keys and values)
    context_attention: str = "ring"
    # the MLP over the row in chunks of this many tokens, each recomputed in the backward (0: the whole row at once):
    # its [T, intermediate] activations bounded by a chunk's (long rows; a tiled MLP)
    mlp_chunk: int = 0
    # LoRA adapters (dpo_jax.models.lora): rank 0 = none; the targets are projection names (q_proj, ..., down_proj)
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
        if self.context_attention not in CONTEXT_ATTENTION:
            raise ValueError(f"context_attention must be one of {CONTEXT_ATTENTION}; got {self.context_attention!r}")
        if self.mlp_chunk < 0:
            raise ValueError(f"mlp_chunk must be >= 0 (0: the whole row); got {self.mlp_chunk}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16; got {self.dtype!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if self.lora_rank < 0 or (self.lora_rank and not set(self.lora_targets) <= set(LORA_TARGETS)):
            raise ValueError(
                f"lora: rank >= 0 and targets among {LORA_TARGETS}; got {self.lora_rank}, {self.lora_targets}"
            )
        for name, value, allowed in (("qk_norm", self.qk_norm, QK_NORMS), ("norm_layout", self.norm_layout,
                                     NORM_LAYOUTS), ("mlp_activation", self.mlp_activation, ACTIVATIONS),
                                     ("moe_impl", self.moe_impl, MOE_IMPLS)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not supported; expected one of {allowed}")
        if self.layer_types and (
            len(self.layer_types) != self.num_layers or set(self.layer_types) - {"sliding", "full"}
        ):
            raise ValueError(f"layer_types: expected one of sliding / full per layer; got {self.layer_types}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token must be in [1, {self.num_experts}]; got {self.experts_per_token}")
        if self.num_experts and self.lora_rank and set(self.lora_targets) & {"gate_proj", "up_proj", "down_proj"}:
            raise ValueError(
                f"lora targets {self.lora_targets}: a mixture-of-experts model's experts take no adapters; choose "
                f"among q_proj, k_proj, v_proj, o_proj"
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; expected one of {list(ARCHITECTURES)}"
            )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        if not self.layer_types:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == "sliding" else None for t in self.layer_types)

    @property
    def scores_scale(self) -> float:
        return self.head_dim**-0.5 if self.query_scale is None else self.query_scale

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)


def fused_projections(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """A fused family's projections (Phi-3): ours -> (its fused module under ``self_attn.`` / ``mlp.``, first row,
    last row + 1); empty for the others."""
    if not FAMILIES[cfg.architecture].fused:
        return {}
    h, k, e, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return {"q_proj": ("self_attn.qkv_proj", 0, h * e), "k_proj": ("self_attn.qkv_proj", h * e, (h + k) * e),
            "v_proj": ("self_attn.qkv_proj", (h + k) * e, (h + 2 * k) * e),
            "gate_proj": ("mlp.gate_up_proj", 0, f), "up_proj": ("mlp.gate_up_proj", f, 2 * f)}  # fmt: skip
