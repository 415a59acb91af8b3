"""DPO train-step throughput by batch layout, and TRL's ``DPOTrainer`` on the same model and data.

Layouts (``dpo_jax.data.packing``), each timed on the same pairs with the jitted DPO step (cached reference):
  padded            the old layout: a row per sequence padded to a bucket, the LM head on every slot (chunked)
  scored head       the same rows, the LM head on the scored completion tokens only
  packed            whole pairs packed into rows (padding-free), prompt per completion
  packed + shared   packed, and the prompt once per pair (prompt | chosen | rejected) — the default
then, when ``trl`` is installed (``pip install -e ".[bench]"``), TRL's DPOTrainer on the same Llama weights and
token ids (a reference forward every step, dynamic padding: its defaults), float32, in the same invocation, twice,
each in a process of its own: with glibc malloc as installed (what a TRL user runs: the ratio's baseline), and with
the malloc settings dpo_jax runs with (``dpo_jax.infra.xla_flags.MALLOC``: freed memory kept for reuse, not faulted in
afresh every step), which speed TRL up as well.

Cases: ``32k`` (the issue's 19M Llama: vocab 32,000, hidden 256, 4 layers, GQA 4/2, untied; 8 pairs of ~30 prompt
+ ~40 completion tokens), ``128k`` (vocab 128,256, hidden 512), ``long`` (the 32k model, ~512 prompt / ~64
completion tokens). Steady-state figures: every batch shape is compiled before the timed pass, and every figure
(ours and TRL's) is the median of the timed steps. MFU counts real tokens only (``dpo_jax.infra.throughput``): on CPU
against this host's measured float32 matmul peak; on an accelerator against its data-sheet dense bf16 peak (the
measured matmul peak in the run's dtype is printed beside it).
On a GPU, ``--dtype bfloat16`` computes in bf16 (float32 parameters and optimizer; TRL: ``bf16=True`` autocast),
and larger batches (``--batch 64``) are what such a device needs.

    python experiments/throughput.py                      # all cases
    python experiments/throughput.py --cases 32k --steps 10
    python experiments/throughput.py --cases gemma270m --steps 4 --layouts "packed + shared"
                                                          # peak RSS: one layout per process, as TRL's
    python experiments/throughput.py --cases 32k,long --batch 64 --dtype bfloat16     # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from dpo_jax.core import optim, step
from dpo_jax.core.state import init_state
from dpo_jax.data import Layout, PreferenceLoader, TokenizedPair
from dpo_jax.data.packing import batch_stats
from dpo_jax.infra import throughput, xla_flags
from dpo_jax.models import ModelConfig, config_from_hf, init_decoder
from dpo_jax.training import builders

OLD_BUCKETS = (256, 512, 1024)  # configs/hf_local.py's buckets before packing
CASES = {
    "32k": dict(vocab=32000, hidden=256, layers=4, heads=4, kv=2, ffn=688, prompt=(20, 40), completion=(30, 50)),
    "128k": dict(vocab=128256, hidden=512, layers=4, heads=8, kv=4, ffn=1376, prompt=(20, 40), completion=(30, 50)),
    "long": dict(vocab=32000, hidden=256, layers=4, heads=4, kv=2, ffn=688, prompt=(448, 576), completion=(48, 80)),
    # Gemma-3-270M's shape (random weights): a 262,144-token vocabulary, tied embeddings, 18 layers (5 sliding-window
    # layers of 512 to 1 global), 4 query heads of 256 over 1 key/value head; pairs of up to ~450 tokens a side.
    # Activations recomputed in the backward pass on both sides (TRL's default gradient checkpointing; our
    # model.remat=dots_no_batch, configs/hf_local.py's default); TRL warms up for one step (its steps take minutes).
    "gemma270m": dict(
        vocab=262144,
        hidden=640,
        layers=18,
        heads=4,
        kv=1,
        ffn=2048,
        prompt=(50, 250),
        completion=(20, 200),
        remat="dots_no_batch",
        trl_warmup=1,
        hf=dict(
            architectures=["Gemma3ForCausalLM"],
            head_dim=256,
            sliding_window=512,
            sliding_window_pattern=6,
            query_pre_attn_scalar=256,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
        ),
    ),
}
LAYOUTS = {
    "padded (old)": (Layout("padded", share_prompt=False, buckets=OLD_BUCKETS, scored_only=False), 0.0),
    "scored head": (Layout("padded", share_prompt=False, buckets=OLD_BUCKETS), 256.0),
    "packed": (Layout(share_prompt=False), 256.0),
    "packed + shared": (Layout(share_prompt=True), 256.0),
}
TRL_ROWS = {"TRL DPOTrainer": False, "TRL + dpo_jax malloc": True}  # label: glibc malloc as dpo_jax runs it
EOS = 2
USER_TUNABLES = os.environ.get("GLIBC_TUNABLES", "")  # before xla_flags.apply() adds dpo_jax's


def make_pairs(case: dict, n: int, seed: int = 0) -> list[TokenizedPair]:
    """Random token ids (3 .. vocab); completions end with EOS, as TRL appends it."""
    rng = np.random.default_rng(seed)

    def ids(lo_hi, eos=False):
        x = rng.integers(3, case["vocab"], size=int(rng.integers(lo_hi[0], lo_hi[1] + 1))).astype(np.int32)
        return np.append(x, EOS).astype(np.int32) if eos else x

    return [
        TokenizedPair(ids(case["prompt"]), ids(case["completion"], True), ids(case["completion"], True), 1.0, 1.0)
        for _ in range(n)
    ]


def model_config(case: dict) -> ModelConfig:
    if "hf" in case:  # a family of its own, as its config.json would give it
        return config_from_hf(
            {**case["hf"], "vocab_size": case["vocab"], "hidden_size": case["hidden"], "num_hidden_layers":
             case["layers"], "num_attention_heads": case["heads"], "num_key_value_heads": case["kv"],
             "intermediate_size": case["ffn"], "max_position_embeddings": 32768, "bos_token_id": 1,
             "eos_token_id": EOS, "pad_token_id": 0},
            dtype=case.get("dtype", "float32"), scan_layers=case.get("scan_layers", True),
            remat=case.get("remat", "none"),
        )  # fmt: skip
    return ModelConfig(
        dtype=case.get("dtype", "float32"),
        scan_layers=case.get("scan_layers", True),
        remat=case.get("remat", "none"),
        vocab_size=case["vocab"], hidden_size=case["hidden"], intermediate_size=case["ffn"],
        num_layers=case["layers"], num_heads=case["heads"], num_kv_heads=case["kv"], rms_norm_eps=1e-5,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    )  # fmt: skip


def time_layout(graphdef, params, pairs, batch, steps, layout, max_logits_mb, counts, peak, last=False) -> dict:
    """One layout's steady-state figures; ``last``: the initial parameters are given to the state (donated), so
    the peak memory holds one copy of the model, as a run does."""
    layout = dataclasses.replace(layout, attention_cost=throughput.attention_cost(counts))  # as inputs.make_layout
    loader = PreferenceLoader(pairs, batch, seed=0, layout=layout)
    batches = []
    for _, b in loader.iterate(0, steps):
        b = b.replace(ref_logps_GxPx2=np.full((*b.index_GxP.shape, 2), -60.0, np.float32))
        batches.append(b)
    stats = [batch_stats(b) for b in batches]
    flops = sum(throughput.step_flops(counts, s) for s in stats)
    sc = step.StepConfig("dpo", max_logits_mb=max_logits_mb)
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-5, warmup_steps=0), 1000)

    def init(p):
        return init_state(p, tx, builders.default_hparams(), 0)

    state = jax.jit(init, donate_argnums=0 if last else ())(params)
    train_fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc), donate_argnums=0)
    device_batches = [jax.device_put(b) for b in batches]
    t0 = time.perf_counter()
    for b in device_batches:  # compile every shape once
        state, m = train_fn(state, b, None)
    jax.block_until_ready(m)
    compile_and_first = time.perf_counter() - t0
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for b in device_batches:  # each step on its own clock; the median, as for TRL below
        t0 = time.perf_counter()
        state, m = train_fn(state, b, None)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    dt = float(np.median(times))
    real = sum(s["real_tokens"] for s in stats) / steps
    return {
        "s_per_step": dt,
        "pairs_per_s": batch / dt,
        "tokens_per_s": real / dt,
        "mfu": flops / steps / dt / peak,
        "padding": 1 - sum(s["real_tokens"] for s in stats) / sum(s["slots"] for s in stats),
        "programs": len({tuple(x.shape for x in jax.tree.leaves(b)) for b in batches}),
        "first_pass_s": compile_and_first,
        "page_faults": faults / steps,
        "peak_rss_gb": peak_rss_gb(),
    }


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (``ru_maxrss``), GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def peer_versions() -> str:
    """The peers' versions, printed beside every ratio to them."""
    try:
        import torch
        import transformers
        import trl
    except ImportError:
        return "TRL not installed"
    return f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"


def trl_run(graphdef, params, mc: ModelConfig, pairs, batch, steps, counts, peak, warmup=3) -> dict | None:
    """TRL's DPOTrainer on the same weights (exported to a transformers folder) and the same token ids, timed
    after ``warmup`` steps."""
    try:
        import datasets
        import torch
        import transformers
        import trl
    except ImportError:
        return None
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dpo_jax.infra import hf

    folder = tempfile.TemporaryDirectory()  # TRL loads its reference model from here too
    hf.save_pretrained(nnx.merge(graphdef, params), folder.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder.name, dtype=torch.float32)
    vocab = {f"t{i}": i for i in range(3, mc.vocab_size)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": EOS})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )

    def text(ids):
        return " ".join(f"t{i}" for i in ids if i != EOS)

    n = batch * (steps + warmup)
    rows = [pairs[i % len(pairs)] for i in range(n)]
    data = datasets.Dataset.from_dict(
        {
            "prompt": [text(p.prompt) for p in rows],
            "chosen": [" " + text(p.chosen) for p in rows],  # TRL tokenizes prompt + chosen as one string
            "rejected": [" " + text(p.rejected) for p in rows],
        }
    )
    times: list[float] = []
    faults: list[int] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps + warmup, learning_rate=1e-5,
            report_to="none", logging_steps=1000, save_strategy="no", use_cpu=jax.default_backend() == "cpu",
            bf16=mc.dtype == "bfloat16", fp16=False,
            max_length=None, dataloader_num_workers=0, beta=0.1, seed=0,
        )  # fmt: skip
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
        device = trainer.model.device
    gaps = np.diff(times)[warmup - 1 :]  # the first steps warm up
    print(f"  TRL on {device}: step times {', '.join(f'{g * 1e3:.0f}' for g in gaps)} ms", flush=True)
    folder.cleanup()
    # The median step: TRL's dynamic padding meets new shapes now and then (a slow step on a GPU, as a new shape
    # is a compile for us; ours are all compiled before timing), so the median is the fair steady state.
    dt = float(np.median(gaps))
    # TRL runs the policy on prompt + chosen and prompt + rejected and a reference forward on both: the unshared
    # layout's real tokens, plus the reference's forward.
    lay = Layout(share_prompt=False, row_length=4096)
    stats = batch_stats(PreferenceLoader(rows, batch, shuffle=False, layout=lay).batch(0))
    flops = throughput.step_flops(counts, stats, frozen_reference=True)
    return {
        "s_per_step": dt,
        "pairs_per_s": batch / dt,
        "tokens_per_s": stats["real_tokens"] / dt,
        "mfu": flops / dt / peak,
        "padding": float("nan"),
        "programs": 0,
        "first_pass_s": 0.0,
        "page_faults": float(np.median(np.diff(faults)[warmup - 1 :])),
        "peak_rss_gb": peak_rss_gb(),
    }


def case_setup(name: str):
    """The case, its model config, model (seed 0), parameter count and FLOP counts."""
    case = CASES[name]
    mc = model_config(case)
    graphdef, params = nnx.split(init_decoder(mc, seed=0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    # the embedding lookup is free; the head is not (tied: the same matrix, counted once, as the head)
    matmul = n_params - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size)
    return case, mc, graphdef, params, n_params, throughput.model_counts(mc, matmul)


def trl_subprocess(name: str, steps: int, batch: int, peak: float, keep_memory: bool) -> dict | None:
    """``trl_run`` in a fresh process: with glibc malloc as installed (``keep_memory=False``: what a TRL user runs)
    or with the settings dpo_jax runs with (``dpo_jax.infra.xla_flags.MALLOC``), which must be in place from the
    start."""
    env = dict(os.environ, GLIBC_TUNABLES=USER_TUNABLES, DPO_JAX_KEEP_MEMORY="1" if keep_memory else "0")
    if not USER_TUNABLES:
        env.pop("GLIBC_TUNABLES")
    case = CASES[name]
    argv = [sys.executable, __file__, "--trl-only", "--cases", name, "--steps", str(steps), "--batch", str(batch),
            "--peak", repr(peak), "--dtype", case["dtype"], "--remat", case.get("remat", "none")]  # fmt: skip
    out = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    print("\n".join(line for line in out.splitlines() if line.startswith("  TRL on")), flush=True)
    result = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(result[-1]) if result else None


def run_case(name: str, steps: int, batch: int, with_trl: bool) -> list[tuple[str, dict]]:
    case, mc, graphdef, params, n_params, counts = case_setup(name)
    if jax.default_backend() == "cpu":
        peak = throughput.measured_matmul_peak()
        peak_note = "measured float32 matmul"
    else:
        peak, source = throughput.peak_flops()
        measured = throughput.measured_matmul_peak(8192, dtype=mc.dtype)
        peak_note = f"{source}; measured {mc.dtype} 8192^3 matmul: {measured / 1e12:.0f} TFLOP/s"
    pairs = make_pairs(case, batch * steps * 2)
    mean = np.mean([len(p.prompt) for p in pairs]), np.mean([len(p.chosen) + len(p.rejected) for p in pairs]) / 2
    print(
        f"\n## {name}: {n_params / 1e6:.1f}M params (vocab {mc.vocab_size}, hidden {mc.hidden_size}, "
        f"{mc.num_layers} layers), {batch} pairs/step of ~{mean[0]:.0f} prompt + ~{mean[1]:.0f} completion tokens, "
        f"{steps} timed steps, {mc.dtype}, remat {mc.remat}; peak {peak / 1e9:.0f} GFLOP/s ({peak_note})",
        flush=True,
    )
    rows = []
    for i, (label, (layout, mb)) in enumerate(LAYOUTS.items()):
        last = i == len(LAYOUTS) - 1
        rows.append((label, time_layout(graphdef, params, pairs, batch, steps, layout, mb, counts, peak, last)))
        print_row(label, rows[-1][1], None)
    for label, keep in TRL_ROWS.items() if with_trl else ():
        r = trl_subprocess(name, steps, batch, peak, keep)
        if r is None:
            print("TRL: not installed (pip install -e '.[bench]')")
            break
        rows.append((label, r))
        print_row(label, r, None)
    trl_pps = [dict(rows).get(label, {}).get("pairs_per_s") for label in TRL_ROWS]
    print(f"\n| {name} | ms/step | pairs/s | real tokens/s | MFU | padding | peak RSS GB | × TRL | × TRL + malloc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        print_row(label, r, trl_pps, markdown=True)
    return rows


def trl_only(name: str, steps: int, batch: int, peak: float) -> None:
    """The subprocess of ``trl_subprocess``: prints TRL's figures as one JSON line."""
    case, mc, graphdef, params, _, counts = case_setup(name)
    pairs = make_pairs(case, batch * steps * 2)
    r = trl_run(graphdef, params, mc, pairs, batch, steps, counts, peak, case.get("trl_warmup", 3))
    print(json.dumps(r))


def print_row(label, r, trl_pps, markdown=False):
    ratios = [f"{r['pairs_per_s'] / pps:.2f}" if pps else "-" for pps in trl_pps or [None, None]]
    pad = "-" if np.isnan(r["padding"]) else f"{r['padding']:.0%}"
    cells = [label, f"{r['s_per_step'] * 1e3:.0f}", f"{r['pairs_per_s']:.3g}", f"{r['tokens_per_s']:,.0f}",
             f"{r['mfu']:.1%}", pad, f"{r['peak_rss_gb']:.1f}", *ratios]  # fmt: skip
    if markdown:
        print("| " + " | ".join(cells) + " |", flush=True)
    else:
        extra = f"({r['programs']} programs, first pass {r['first_pass_s']:.1f} s, {r['page_faults']:,.0f} page faults"
        print(
            f"  {label:<16} {cells[1]:>7} ms/step {cells[2]:>8} pairs/s {cells[3]:>9} tok/s  MFU {cells[4]:>6}  "
            f"padding {pad:>4}  peak RSS {cells[6]} GB  {extra}/step)",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="32k,128k,long")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of the layouts")
    parser.add_argument("--unrolled", action="store_true", help="layers unrolled instead of lax.scan")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--remat", default="", help="model.remat for every case (default: the case's; none)")
    parser.add_argument("--trl-only", action="store_true", help=argparse.SUPPRESS)  # trl_subprocess's child
    parser.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    xla_flags.apply()  # as the dpo-jax command runs (read when JAX starts its backend, below)
    for k in set(LAYOUTS) - set(args.layouts.split(",")):
        LAYOUTS.pop(k)
    for c in CASES.values():
        c["scan_layers"] = not args.unrolled
        c["dtype"] = args.dtype
        if args.remat:
            c["remat"] = args.remat
    if args.trl_only:
        return trl_only(args.cases, args.steps, args.batch, args.peak)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s): {jax.devices()[0].device_kind}; "
          f"peers: {peer_versions()}")  # fmt: skip
    for name in args.cases.split(","):
        run_case(name, args.steps, args.batch, not args.no_trl)


if __name__ == "__main__":
    main()
