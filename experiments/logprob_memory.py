"""Compiled memory of completion log-probs: naive [B, T, V] logits vs the chunked LM-head path.

Compiles (never runs) the forward and forward+backward of both paths with ``jax.jit(...).lower(...).compile()``
and prints XLA's ``memory_analysis()``: temporaries, arguments and outputs. Defaults are a Llama-3-8B LM head.

    python experiments/logprob_memory.py
    python experiments/logprob_memory.py --batch 8 --seq 1024 --vocab 128256 --width 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from dpo_jax.core import logprobs as lp

MiB = 2**20


def naive(hidden_BxTxD, lm_head_DxV, targets_BxT, mask_BxT):
    logits_BxTxV = jnp.einsum("btd,dv->btv", hidden_BxTxD, lm_head_DxV)
    return lp.sequence_logprobs(logits_BxTxV, targets_BxT, mask_BxT)[0].sum()


def make_chunked(token_chunk, vocab_chunk):
    def chunked(hidden_BxTxD, lm_head_DxV, targets_BxT, mask_BxT):
        sums_B, _ = lp.chunked_sequence_logprobs(
            hidden_BxTxD, lm_head_DxV, targets_BxT, mask_BxT, token_chunk=token_chunk, vocab_chunk=vocab_chunk
        )
        return sums_B.sum()

    return chunked


def analyse(fn, args, grad):
    f = jax.value_and_grad(fn, argnums=(0, 1)) if grad else fn
    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    ma = compiled.memory_analysis()
    return ma.temp_size_in_bytes, ma.argument_size_in_bytes, ma.output_size_in_bytes, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--token-chunk", type=int, default=1024)
    parser.add_argument("--vocab-chunk", type=int, default=8192)
    args = parser.parse_args(argv)

    b, t, v, d = args.batch, args.seq, args.vocab, args.width
    dt = jnp.dtype(args.dtype)
    spec = jax.ShapeDtypeStruct
    shapes = (spec((b, t, d), dt), spec((d, v), dt), spec((b, t), jnp.int32), spec((b, t), jnp.bool_))
    print(
        f"backend {jax.default_backend()}; B={b} T={t} V={v} D={d} dtype={args.dtype}; "
        f"chunks: {args.token_chunk} tokens x {args.vocab_chunk} vocab"
    )
    print(
        f"one [B,T,V] logits buffer in {args.dtype}: {b * t * v * dt.itemsize / MiB:,.0f} MiB "
        f"(float32: {b * t * v * 4 / MiB:,.0f} MiB)"
    )
    print(f"{'path':<10}{'pass':<16}{'temp MiB':>12}{'args MiB':>12}{'out MiB':>12}{'compile s':>11}")
    chunked = make_chunked(args.token_chunk, args.vocab_chunk)
    rows = {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        for grad in (False, True):
            temp, arg, out, secs = analyse(fn, shapes, grad)
            rows[name, grad] = temp
            label = "value+grad" if grad else "value"
            print(f"{name:<10}{label:<16}{temp / MiB:>12,.1f}{arg / MiB:>12,.1f}{out / MiB:>12,.1f}{secs:>11.1f}")
    for grad in (False, True):
        ratio = rows["naive", grad] / max(rows["chunked", grad], 1)
        print(f"temp memory saved ({'value+grad' if grad else 'value'}): {ratio:,.1f}x")


if __name__ == "__main__":
    main()
