"""Real model shapes, random weights: DPO steps of Llama-3.2-1B, Qwen2.5-1.5B, Llama-3.1-8B (and 70B) shapes.

Nothing is downloaded: the models are randomly initialised with the exact shapes of the checkpoints (vocabulary,
width, depth, heads, key/value heads, tied embeddings, biases), bfloat16 compute, full remat, the packed
shared-prompt layout (one pair per row: a prompt and two completions), the cached reference.

Two modes:

``plan`` (any machine; this is what runs on a CPU): compile the DPO step for a mesh of simulated devices and read
XLA's memory analysis of the per-device program — arguments (the sharded train state, a LoRA base, the batch),
temporaries, and their sum, the step's peak — without running it. Each plan is tried at growing rows; the
largest that fits the device is reported.

    python experiments/scale.py plan                                  # the README's table (about 20 min here)
    python experiments/scale.py plan --plans 8b-fsdp8 --rows 2048,8192

``run`` (an accelerator): time DPO steps of a model on the devices present and report tokens/s, pairs/s,
real-token MFU (against the data-sheet peak and a measured matmul) and peak device memory; ``--trl`` runs TRL's
DPOTrainer on the same shapes, data and precision in a subprocess for the side-by-side (its best attention,
gradient checkpointing on).

    python experiments/scale.py run --model llama-3.2-1b --row 4096 --pairs 8 --steps 10 --trl
    python experiments/scale.py run --model llama-3.1-8b --lora 16 --row 4096 --pairs 4 --steps 10 --trl
    python experiments/scale.py longest --model llama-3.2-1b --row 4096 --trl   # longest pair each trains

``experiments/scale_gpu.sh`` runs the three of them within about 8 minutes of a GPU (the issue's accelerator check).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
import time

MODELS = {  # the checkpoints' config.json values
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_type="llama3", rope_factor=32.0),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, architecture="Qwen2ForCausalLM"),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 rope_theta=10000.0),  # the tests' smoke runs
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                          num_kv_heads=8, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0),
    # a family of its own: its config.json, read as a checkpoint's is (5 sliding-window layers of 512 to 1 global)
    "gemma-3-1b": dict(hf=dict(
        architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
        sliding_window_pattern=6, query_pre_attn_scalar=256, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0)),
}  # fmt: skip
# plan name -> (model, devices, LoRA rank, device memory in GB[, context]): the devices split as fsdp x context
PLANS = {
    "8b-fsdp8": ("llama-3.1-8b", 8, 0, 80),
    "8b-fsdp64": ("llama-3.1-8b", 64, 0, 80),
    "8b-lora-80gb": ("llama-3.1-8b", 1, 16, 80),
    "8b-lora-141gb": ("llama-3.1-8b", 1, 16, 141),
    "70b-lora-fsdp8": ("llama-3.1-70b", 8, 16, 80),
    # context parallelism (mesh.context): each row's tokens split over the context axis, parameters over all devices
    "8b-context8": ("llama-3.1-8b", 8, 0, 80, 8),
    "8b-context64": ("llama-3.1-8b", 64, 0, 80, 64),
    "70b-lora-context8": ("llama-3.1-70b", 8, 16, 80, 8),
    "gemma3-1b-1gpu": ("gemma-3-1b", 1, 0, 80),  # without the axis: one device
    "gemma3-1b-1gpu-tiled": ("gemma-3-1b", 1, 0, 80),  # ... with the MLP in 8k-token chunks (model.mlp_chunk)
}
PLAN_OPTIONS = {"gemma3-1b-1gpu-tiled": dict(mlp_chunk=8192)}  # model options a plan sets
SMOKE_PLANS = {"tiny-fsdp8": ("tiny", 8, 0, 1), "tiny-lora": ("tiny", 1, 4, 1)}  # the tests'; not in the table
GB = 10**9


def _devices_flag(argv) -> None:
    """Simulated CPU devices for ``plan``, set before JAX starts."""
    if (
        len(argv) > 1
        and argv[1] == "plan"
        and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    ):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64"


_devices_flag(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dpo_jax.core import optim, step  # noqa: E402
from dpo_jax.core.state import init_state  # noqa: E402
from dpo_jax.data import Layout, PreferenceLoader, TokenizedPair  # noqa: E402
from dpo_jax.data.packing import batch_stats  # noqa: E402
from dpo_jax.infra import sharding, throughput  # noqa: E402
from dpo_jax.models import ModelConfig, config_from_hf, init_decoder, lora  # noqa: E402
from dpo_jax.models.config import LORA_TARGETS  # noqa: E402
from dpo_jax.training import builders  # noqa: E402


def model_config(name: str, *, lora_rank: int = 0, remat: str = "full", **options) -> ModelConfig:
    lora_ = dict(lora_rank=lora_rank, lora_alpha=2.0 * lora_rank, lora_targets=LORA_TARGETS if lora_rank else ())
    if "hf" in MODELS[name]:
        return config_from_hf(MODELS[name]["hf"], dtype="bfloat16", remat=remat, **lora_, **options)
    return ModelConfig(**MODELS[name], dtype="bfloat16", remat=remat, **lora_, **options)


def pairs_for(row: int, n: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    """``n`` pairs of ``row`` tokens each: a prompt of half the row and two completions of a quarter."""
    rng = np.random.default_rng(seed)
    p, c = row // 2, row // 4
    ids = lambda k: rng.integers(3, vocab, size=k).astype(np.int32)  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(row - p - c), 1.0, 1.0) for _ in range(n)]


def abstract_params(mc: ModelConfig, base_dtype: str = "bfloat16"):
    """(graphdef, trained params, frozen base or None) as shapes only: nothing is allocated."""

    def make():
        model = init_decoder(mc.replace(lora_rank=0, lora_targets=()), seed=0)
        if mc.lora_rank:
            model = lora.attach(model, rank=mc.lora_rank, alpha=mc.lora_alpha, target_names=mc.lora_targets)
        return nnx.state(model)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_decoder(mc, seed=0)))
    params = jax.eval_shape(make)
    if not mc.lora_rank:
        return graphdef, params, None
    params = jax.eval_shape(lambda p: lora.cast_base(p, base_dtype), params)
    return graphdef, *lora.split(params)


def step_program(mc, mesh, row: int, pairs_per_device: int = 1):
    """The compiled DPO step (train state donated) for one batch of ``pairs_per_device`` pairs of ``row`` tokens on
    every device of ``mesh``, and that batch."""
    graphdef, params, base = abstract_params(mc)
    n = sharding.data_parallel_size(mesh) * pairs_per_device
    layout = Layout(row_length=row, row_multiple=sharding.data_parallel_size(mesh))
    batch = PreferenceLoader(pairs_for(row, n, mc.vocab_size), n, shuffle=False, layout=layout).batch(0)
    batch = batch.replace(ref_logps_GxPx2=np.full((*batch.index_GxP.shape, 2), -float(row), np.float32))
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-5, warmup_steps=0), 1000)
    state = jax.eval_shape(lambda p: init_state(p, tx, builders.default_hparams(), 0), params)
    state_sh = sharding.tree_shardings(state, mesh)
    batch_sh = sharding.batch_shardings(mesh, batch)  # token axes over context
    base_sh = None if base is None else sharding.param_shardings(base, mesh)
    sc = step.StepConfig("dpo", lora=base is not None, max_logits_mb=throughput.logits_budget_mb(-1.0))
    train_fn = jax.jit(
        functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc),
        in_shardings=(state_sh, batch_sh, base_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )  # fmt: skip
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    args = (jax.tree.map(spec, state, state_sh), jax.tree.map(spec, batch, batch_sh),
            None if base is None else jax.tree.map(spec, base, base_sh))  # fmt: skip
    with jax.set_mesh(mesh):  # the decoder's attention finds a context axis here (the ring over it)
        return train_fn.lower(*args).compile(), batch


def cpu_weight_upcasts(compiled) -> int:
    """Bytes of the float32 copies XLA:CPU makes of bfloat16 arguments: it computes bfloat16 matmuls in float32 and
    hoists the converted weights (a frozen LoRA base: all of it) out of the layer loop. An accelerator multiplies
    bfloat16 natively and makes no such copies, so a plan subtracts them (and reports them)."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    params = set(re.findall(r"%([\w.\-]+) = [^\n]*? parameter\(", entry))
    total = 0
    # a convert wrapped in a fusion of its own (XLA:CPU's fusion emitters) or a bare convert (its elemental emitters)
    converts = r"= f32\[([\d,]+)\][^\n]*? (?:fusion\(%([\w.\-]+)\)[^\n]*calls=%wrapped_convert|convert\(%([\w.\-]+)\))"
    for m in re.finditer(converts, entry):
        if (m.group(2) or m.group(3)) in params:
            total += 4 * math.prod(int(d) for d in m.group(1).split(","))
    return total


def plan(name: str, rows: list[int]) -> list[dict]:
    model, devices, rank, memory_gb, *context = {**PLANS, **SMOKE_PLANS}[name]
    context = context[0] if context else 1
    mc = model_config(model, lora_rank=rank, **PLAN_OPTIONS.get(name, {}))
    mesh = sharding.make_mesh(data=1, fsdp=devices // context, context=context, devices=jax.devices()[:devices])
    out = []
    for row in rows:
        t0 = time.perf_counter()
        compiled = step_program(mc, mesh, row)[0]
        m = compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        upcast = cpu_weight_upcasts(compiled) if jax.default_backend() == "cpu" else 0
        result = dict(plan=name, model=model, devices=devices, lora=rank, memory_gb=memory_gb, row=row,
                      args_gb=m.argument_size_in_bytes / GB, temp_gb=m.temp_size_in_bytes / GB, peak_gb=peak / GB,
                      upcast_gb=upcast / GB, device_gb=(peak - upcast) / GB,
                      fits=peak - upcast <= memory_gb * GB * 0.95, compile_s=time.perf_counter() - t0)  # fmt: skip
        print(f"  {name}: row {row:6d}: arguments {result['args_gb']:6.1f} GB + temporaries {result['temp_gb']:6.1f} GB"
              f" (of which XLA:CPU's f32 weight copies {result['upcast_gb']:.1f}) = {result['device_gb']:6.1f} GB per "
              f"device on an accelerator ({'fits' if result['fits'] else 'does not fit'} {memory_gb} GB; compiled in "
              f"{result['compile_s']:.0f} s)", flush=True)  # fmt: skip
        out.append(result)
        if not result["fits"]:
            break
    return out


def init_params(mc: ModelConfig):
    """(trained params, frozen base or None), randomly initialised: float32 parameters, or LoRA adapters on a
    bfloat16 base."""
    model = init_decoder(mc.replace(lora_rank=0, lora_targets=()), seed=0)
    if not mc.lora_rank:
        return nnx.state(model), None
    model = lora.attach(model, rank=mc.lora_rank, alpha=mc.lora_alpha, target_names=mc.lora_targets)
    return lora.split(lora.cast_base(nnx.state(model), "bfloat16"))


def run(args) -> dict:
    """Timed DPO steps on the devices present (FSDP over all of them); figures of the real tokens."""
    mc = model_config(args.model, lora_rank=args.lora, remat=args.remat, attention=args.attention)
    devices = jax.devices()
    mesh = sharding.make_mesh(data=1, fsdp=len(devices), devices=devices)
    compiled, batch = step_program(mc, mesh, args.row, args.pairs)
    init = functools.partial(init_params, mc)
    params_abs, base_abs = jax.eval_shape(init)
    shard = lambda tree: None if tree is None else sharding.param_shardings(tree, mesh)  # noqa: E731
    params, base = jax.jit(init, out_shardings=(shard(params_abs), shard(base_abs)))()  # made in place, sharded
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-5, warmup_steps=0), 1000)
    make_state = lambda p: init_state(p, tx, builders.default_hparams(), 0)  # noqa: E731
    state_sh = sharding.tree_shardings(jax.eval_shape(make_state, params_abs), mesh)
    state = jax.jit(make_state, out_shardings=state_sh)(params)
    del params
    stats = batch_stats(batch)
    batch = jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)), batch)
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, batch, base)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch, base)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / args.steps
    total = sum(x.size for x in jax.tree.leaves(params_abs)) + sum(x.size for x in jax.tree.leaves(base_abs or {}))
    matmul = total if mc.tie_word_embeddings else total - mc.vocab_size * mc.hidden_size  # the lookup is free
    flops = throughput.step_flops(throughput.model_counts(mc, matmul), stats)
    peak, source = throughput.peak_flops()
    on_cpu = jax.default_backend() == "cpu"  # peak_flops already measured the host's matmuls
    measured = peak if on_cpu else throughput.measured_matmul_peak(8192, dtype="bfloat16") * len(devices)
    memory = devices[0].memory_stats() or {}
    return dict(model=args.model, lora=args.lora, row=args.row, pairs=stats["pairs"], step_s=dt,
                pairs_per_s=stats["pairs"] / dt, tokens_per_s=stats["real_tokens"] / dt, mfu=flops / dt / peak,
                mfu_measured=flops / dt / measured, peak_source=source,
                peak_memory_gb=memory.get("peak_bytes_in_use", 0) / GB)  # fmt: skip


def trl_run(args) -> dict | None:
    """TRL's DPOTrainer on the same shapes in a subprocess (experiments/trl_scale.py); None if TRL is missing."""
    cmd = [
        sys.executable,
        os.path.join(os.path.dirname(__file__), "trl_scale.py"),
        "--model",
        args.model,
        "--row",
        str(args.row),
        "--pairs",
        str(args.pairs),
        "--steps",
        str(args.steps),
        "--lora",
        str(args.lora),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        print(f"  TRL run failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(lines[-1])


def longest(args) -> dict:
    """The longest pair (doubling from ``--row``) one DPO step trains without running out of device memory, for
    dpo_jax and, with ``--trl``, for TRL (each row in its own process, so an out-of-memory ends only that try)."""
    found = {"dpo_jax": 0, "TRL": 0}
    for who in ("dpo_jax", "TRL") if args.trl else ("dpo_jax",):
        row = args.row
        while row <= args.max_row:
            if who == "dpo_jax":
                cmd = [sys.executable, __file__, "run", "--model", args.model, "--lora", str(args.lora), "--row",
                       str(row), "--pairs", "1", "--steps", "1"]  # fmt: skip
            else:
                cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "trl_scale.py"), "--model", args.model,
                       "--lora", str(args.lora), "--row", str(row), "--pairs", "1", "--steps", "1"]  # fmt: skip
            ok = subprocess.run(cmd, capture_output=True, text=True).returncode == 0
            print(f"  {who}: a pair of {row:,} tokens {'trains' if ok else 'does not fit'}", flush=True)
            if not ok:
                break
            found[who], row = row, row * 2
    print(f"\nlongest pair: dpo_jax {found['dpo_jax']:,} tokens" + (f", TRL {found['TRL']:,}" if args.trl else ""))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("plan", help="memory plans from XLA's analysis of the compiled step (no run)")
    p.add_argument("--plans", default=",".join(PLANS), help=f"from {list(PLANS)}")
    p.add_argument("--rows", default="2048,4096,8192,16384,32768", help="row lengths tried, until one does not fit")
    r = sub.add_parser("run", help="time DPO steps on the devices present")
    r.add_argument("--model", default="llama-3.2-1b", choices=sorted(MODELS))
    r.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    r.add_argument("--row", type=int, default=4096, help="tokens per pair (prompt half, two completions a quarter)")
    r.add_argument("--pairs", type=int, default=8, help="pairs per device per step")
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--remat", default="full")
    r.add_argument(
        "--attention", default="auto", help="model.attention: auto | blockwise | splash | flashmask | einsum | ..."
    )
    r.add_argument("--trl", action="store_true", help="also run TRL's DPOTrainer on the same shapes")
    g = sub.add_parser("longest", help="the longest pair one step trains (doubling rows), and TRL's with --trl")
    g.add_argument("--model", default="llama-3.2-1b", choices=sorted(MODELS))
    g.add_argument("--lora", type=int, default=0)
    g.add_argument("--row", type=int, default=4096, help="the first row tried")
    g.add_argument("--max-row", type=int, default=262144)
    g.add_argument("--trl", action="store_true")
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices ({jax.devices()[0].device_kind})", flush=True)
    if args.mode == "longest":
        return longest(args)
    if args.mode == "plan":
        rows = [int(x) for x in args.rows.split(",")]
        results = [x for name in args.plans.split(",") for x in plan(name, rows)]
        print(
            "\n| plan | model | devices | LoRA | device memory | row tokens | arguments GB | temporaries GB "
            "(XLA:CPU f32 weight copies) | per device on an accelerator GB | fits |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for x in results:
            print(f"| {x['plan']} | {x['model']} | {x['devices']} | {x['lora'] or '–'} | {x['memory_gb']} GB | "
                  f"{x['row']:,} | {x['args_gb']:.1f} | {x['temp_gb']:.1f} ({x['upcast_gb']:.1f}) | "
                  f"{x['device_gb']:.1f} | {'yes' if x['fits'] else 'no'} |")  # fmt: skip
        return results
    ours = run(args)
    print(json.dumps(ours), flush=True)
    theirs = trl_run(args) if args.trl else None
    if theirs:  # the same useful work per pair: its MFU in the same units as ours
        theirs["mfu"] = ours["mfu"] * theirs["pairs_per_s"] / ours["pairs_per_s"]
        theirs["mfu_measured"] = ours["mfu_measured"] * theirs["pairs_per_s"] / ours["pairs_per_s"]
    print("\n| run | ms/step | pairs/s | tokens/s | MFU (data sheet) | MFU (measured matmul) | peak memory GB |")
    print("|---|---|---|---|---|---|---|")
    for label, x in (("dpo_jax", ours), ("TRL", theirs)):
        if x:
            print(
                f"| {label} | {x['step_s'] * 1e3:.0f} | {x['pairs_per_s']:.2f} | {x['tokens_per_s']:.0f} | "
                f"{x['mfu']:.1%} | {x.get('mfu_measured', float('nan')):.1%} | {x['peak_memory_gb']:.1f} |"
            )
    if theirs:
        print(
            f"\npairs/s vs TRL: {ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}x (TRL's attention: "
            f"{theirs['attention']})"
        )
    return {"ours": ours, "trl": theirs}


if __name__ == "__main__":
    main()
