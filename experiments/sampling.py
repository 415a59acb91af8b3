"""Batched generation throughput: dpo_jax's KV-cache sampler (``dpo_jax.core.sampling.generate``: one jitted
prefill + decode loop) beside transformers' ``generate`` on the same random model, prompts and settings.

Cases (random weights, float32, Llama architecture): ``smollm135m`` (SmolLM2-135M's shape: 30 layers, hidden 576,
GQA 9/3, vocabulary 49,152, tied) and ``1b`` (Llama-3.2-1B's: 16 layers, hidden 2048, GQA 32/8, vocabulary
128,256, tied). The same left-padded prompts of mixed lengths for both; greedy and sampled (temperature 1, top-k
50). No EOS (every row makes ``--new`` tokens), so both do the same work: tokens/s = rows x new tokens / seconds,
the median of ``--repeats`` timed calls after a warm-up call (ours: compiled once, its compile time printed).
Rows that finish early: our loop runs until every row of the call has ended, so an ended row keeps its slot (it
costs what a live row costs) until the call ends; transformers' ``generate`` does the same.

    python experiments/sampling.py                         # both cases
    python experiments/sampling.py --cases smollm135m --rows 8 --new 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from dpo_jax.core import sampling
from dpo_jax.infra import hf, xla_flags

CASES = {
    "smollm135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
}  # fmt: skip


def prompts(rows: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of 16 to 48 tokens (pad 0): ids [B, 48] and mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 49, rows)
    ids, mask = np.zeros((rows, 48), np.int64), np.zeros((rows, 48), np.int64)
    for i, n in enumerate(lengths):
        ids[i, 48 - n :] = rng.integers(3, vocab, n)
        mask[i, 48 - n :] = 1
    return ids, mask


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name: str, rows: int, new: int, repeats: int) -> None:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    shape = CASES[name]
    config = transformers.LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours, _ = hf.load_pretrained(folder)
    ids, mask = prompts(rows, shape["vocab_size"])
    print(f"\n{name}: {sum(p.numel() for p in theirs.parameters()) / 1e6:.0f}M parameters, {rows} rows of 16-48 "
          f"prompt tokens, {new} new tokens each, float32, CPU ({os.cpu_count()} cores)")  # fmt: skip
    for label, kw in (("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=1.0, top_k=50))):
        call = lambda kw=kw: jax.block_until_ready(  # noqa: E731
            sampling.generate(ours, ids, mask, key=0, max_new_tokens=new, eos_ids=(), **kw).tokens_BxN
        )
        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        ours_s = timed(call, repeats)
        hf_kw = dict(do_sample=False) if not kw["temperature"] else dict(do_sample=True, temperature=1.0, top_k=50)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

        def their_call(hf_kw=hf_kw, ids_t=ids_t, mask_t=mask_t):
            with torch.no_grad():
                theirs.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=new, min_new_tokens=new,
                                pad_token_id=0, eos_token_id=None, top_p=1.0, **hf_kw)  # fmt: skip

        their_call()
        their_s = timed(their_call, repeats)
        tokens = rows * new
        print(f"  {label:8s} ours {tokens / ours_s:9.1f} tokens/s ({ours_s:6.2f} s a call; compile {compile_s:.1f} s)"
              f"   transformers {tokens / their_s:9.1f} tokens/s ({their_s:6.2f} s)   ratio {their_s / ours_s:.2f}x",
              flush=True)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, jax {jax.__version__}")
    for name in args.cases.split(","):
        run_case(name, args.rows, args.new, args.repeats)


if __name__ == "__main__":
    xla_flags.apply()
    main()
