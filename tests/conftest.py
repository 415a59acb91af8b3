"""Test-wide setup: 8 simulated CPU devices (set before JAX is imported) and tiny Hugging Face checkpoints."""

import os
import shutil
import tempfile

# The tests' programs are tiny: compiling them (LLVM's optimisations) costs far more than running them. They are
# compiled with fewer optimisations: the same computations, only less time spent making them fast. XLA:CPU's older
# elemental emitters instead of its MLIR fusion emitters compile the tiny job's steps in ~55% of the time (a whole
# tiny run: ~13 s -> ~9 s here).
COMPILE_LESS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)


def xla_env(devices: int) -> str:
    """XLA_FLAGS for a process the tests start: ``devices`` simulated CPU devices, compiled as the tests are."""
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_LESS}"


os.environ.setdefault("XLA_FLAGS", xla_env(8))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental (CPO, ORPO: test oracles) warns on import
# One XLA compilation cache for the whole test run, shared by the xdist workers and the CLI processes tests start
# (they inherit this environment): many tests compile the same tiny programs. A fresh directory per run, removed at
# its end, so every run still compiles each program once; what it saves is compiling it again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpo_jax_tests_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

from dpo_jax.infra import xla_flags  # noqa: E402  (imports JAX: after the cache settings above, read at import)

xla_flags.apply()  # the flags the dpo-jax command runs with (read when JAX starts its backend)

from dpo_jax.infra import throughput  # noqa: E402

# The host's matmul peak (the MFU's denominator on a CPU), measured once for the whole run, not in each of the many
# processes and runs the tests start (~2.5 s each).
if throughput.HOST_PEAK_ENV not in os.environ:  # the xdist workers inherit the controller's
    os.environ[throughput.HOST_PEAK_ENV] = repr(throughput.measured_matmul_peak())

import numpy as np  # noqa: E402
import pytest  # noqa: E402

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
# name -> (transformers config class, model class, extra config)
HF_CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama_bias_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, head_dim=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # head_dim of its own; per-head q / k norms
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    # sliding and global layers (their own RoPE bases), a query scale of its own, both soft-caps, (1 + w) norms
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=1000.0, rope_local_base_freq=100.0,
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(rms_norm_eps=1e-6)),
    # fused projections, partial rotary, longrope (rows past 6 positions take the long factors), a window
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        max_position_embeddings=24, original_max_position_embeddings=6, sliding_window=5, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0],
            "partial_rotary_factor": 0.5})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}  # fmt: skip
MOE_CASES = ("qwen3_moe", "mixtral")


def make_hf_model(name: str, seed: int = 0, scale: float = 0.3, **overrides):
    """A tiny random transformers model; weights perturbed so that norms and biases are not trivial."""
    import torch
    import transformers

    config_cls, model_cls, extra = HF_CASES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"  # transformers' reference attention
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture(scope="session", params=list(HF_CASES))
def hf_checkpoint(request, tmp_path_factory):
    """(name, transformers model, local folder) for each supported architecture."""
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def padded_batch(b=3, t=11, vocab=97, seed=0):
    """Token ids and an attention mask with one right-padded and one left-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, t - 3 :] = 0
    mask[2, :3] = 0
    return np.where(mask == 1, ids, 0), mask


# The slowest files first (longest processing time first; measured with --durations, 2026-12-07): xdist hands
# files to its workers in collection order (--no-loadscope-reorder), so the long ones start at once and the short
# ones fill in; the workers then finish together. A stale order costs wall time only, never a check.
SLOW_FILES = (
    "test_sweep.py", "test_packing.py", "test_distributed.py", "test_lora.py", "test_attention.py", "test_moe.py",
    "test_main.py", "test_experiment_runs.py", "test_context.py", "test_online.py", "test_sampling.py",
    "test_train.py", "test_reward_model.py", "test_train_objectives.py", "test_field_reach.py", "test_rounds.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
    for item in items:  # -m quick: the edit loop
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)


def pytest_unconfigure(config):
    if "_CACHE_DIR" in globals():  # the process that made it (the controller)
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def step_setup(tmp_path_factory):
    """A tiny model, its params and a packed batch of 8 pairs in rows holding different numbers of pairs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from helpers import tiny_config  # helpers imports this module: imported when the fixture runs

    from dpo_jax.data import Layout, PreferenceLoader, TokenizeConfig, load_examples, synthetic, tokenize_examples
    from dpo_jax.training import builders

    paths = synthetic.write_task(tmp_path_factory.mktemp("t"), synthetic.TaskConfig(n_sft=4, n_train=32, n_eval=4))
    tok = synthetic.build_tokenizer()
    pairs, _ = tokenize_examples(
        load_examples(paths["train"])[0], tok, TokenizeConfig(max_length=16, max_prompt_length=8)
    )
    cfg = tiny_config()
    model = builders.build_model(cfg, tok)
    graphdef, params = nnx.split(model)
    # packed rows (a multiple of 4, for 4 micro-batches) that hold different numbers of pairs
    row = 3 * max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs[:8])
    batch = PreferenceLoader(pairs[:8], 8, layout=Layout(row_multiple=4, row_length=row)).batch(0)
    assert len(set(batch.valid_GxP.sum(1).tolist())) > 1
    return graphdef, params, jax.tree.map(jnp.asarray, batch)
