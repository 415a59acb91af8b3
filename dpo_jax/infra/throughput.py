"""Honest throughput accounting: FLOPs of real tokens only, against a peak with a stated source.

A training step's FLOPs (PaLM appendix B accounting, counted on what the batch really holds):
  trunk       6 N_trunk per real (non-padding) token        (forward 2, backward 4)
  LM head     6 N_head per scored completion token           (prompt and padding slots are not scored)
  attention   12 L H E per (query, key) pair a real token attends to (causal, its segment, shared prefix + branch)
  reference   a frozen reference's forward adds 2 N_trunk + 2 N_head + 4 L H E per the same units
where N_trunk is the per-token matmul parameters below the head and N_head = D V. Padding slots, a head
evaluated on unscored positions, and a prompt computed twice are not counted: the MFU is of useful work.
"""

from __future__ import annotations

import functools
import os
import time

import jax

from dpo_jax.errors import UserError

# Dense peak FLOP/s per device (bf16 without sparsity), from the vendors' data sheets.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}
# A host's float32 matmul FLOP/s measured once (e.g. by the test suite, which starts many runs on one host): a run
# on a CPU then reads it instead of measuring again (~2.5 s of matmuls at start-up).
HOST_PEAK_ENV = "DPO_JAX_HOST_PEAK_FLOPS"


@functools.cache
def measured_matmul_peak(n: int = 2048, repeats: int = 12, dtype: str = "float32") -> float:
    """FLOP/s of the best of ``repeats`` [n, n] @ [n, n] matmuls in ``dtype`` on the first device (all its
    threads), after a warm-up; the best, since a shared host only ever slows a matmul down."""
    device = jax.devices()[0]
    # Its own one-device mesh: a run over a context axis measures this inside its mesh (``jax.set_mesh``).
    with jax.set_mesh(jax.sharding.Mesh([device], ("host",))):
        x = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
        f = jax.jit(lambda a: a @ a)
        for _ in range(3):
            f(x).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def host_peak_from_env() -> float:
    """``$DPO_JAX_HOST_PEAK_FLOPS`` as FLOP/s (0.0 when unset)."""
    value = os.environ.get(HOST_PEAK_ENV, "")
    if not value:
        return 0.0
    try:
        flops = float(value)
    except ValueError:
        flops = -1.0
    if not flops > 0:
        raise UserError(f"{value!r} in the environment variable {HOST_PEAK_ENV}: expected a positive FLOP/s figure")
    return flops


def device_memory_bytes(device=None) -> int | None:
    """The memory one device may allocate (an accelerator's ``bytes_limit``); None on a CPU, whose memory is the
    host's."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def logits_budget_mb(configured: float, device=None) -> float:
    """``logprobs.max_logits_mb``: as configured when >= 0; -1 (the default) is 256 MiB on a CPU (above that the
    host's caches favour the chunked head) and 1/32 of an accelerator's memory (4.4 GiB of an H200's 141 GB)."""
    if configured >= 0:
        return configured
    limit = device_memory_bytes(device)
    return 256.0 if limit is None else limit / 32 / 2**20


def peak_flops(override_per_device: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of all devices of the run, where the figure comes from)."""
    n = jax.device_count()
    if override_per_device:
        return override_per_device * n, "config peak_flops"
    d = jax.devices()[0]
    if d.platform == "cpu":  # simulated devices share the host's cores: the host's matmul peak, per process
        given = host_peak_from_env()
        if given:
            return given * jax.process_count(), f"float32 matmul peak of this host given in {HOST_PEAK_ENV}"
        return measured_matmul_peak() * jax.process_count(), "measured float32 matmul peak of this host"
    per = next((v for k, v in PEAK_FLOPS.items() if k.lower() in d.device_kind.lower()), 0.0)
    return per * n, f"data-sheet bf16 peak of {d.device_kind}" if per else "unknown device"


def model_counts(model_cfg, matmul_params: int) -> dict:
    """Per-token parameter counts for the accounting: trunk, head, and attention's L H E."""
    head = model_cfg.vocab_size * model_cfg.hidden_size
    return {
        "trunk": matmul_params - head,
        "head": head,
        "attn": model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim,
    }


def attention_cost(counts: dict) -> float:
    """A (query, key) slot's forward FLOPs relative to a token's, 4 L H E / (2 N_trunk + N_head) (the head on
    about half the tokens): how much a packed row's length costs beyond its tokens (``Layout.attention_cost``)."""
    return 4 * counts["attn"] / (2 * counts["trunk"] + counts["head"])


def step_flops(counts: dict, stats: dict, *, frozen_reference: bool = False) -> float:
    """Training FLOPs of one step from ``packing.batch_stats`` of the whole (global) batch."""
    fwd = forward_flops(counts, stats)
    return 3 * fwd + (fwd if frozen_reference else 0.0)


def forward_flops(counts: dict, stats: dict) -> float:
    """FLOPs of a forward pass (scoring the batch once)."""
    return (
        2 * counts["trunk"] * stats["real_tokens"]
        + 2 * counts["head"] * stats["scored_tokens"]
        + 4 * counts["attn"] * stats["attended_keys"]
    )
