"""MoE step time: grouped experts (tokens sorted by expert, ``jax.lax.ragged_dot``) against dense (every expert on
every token), one jitted forward + backward of a Qwen3-MoE-shaped layer stack, side by side in one invocation.

    python experiments/moe_step.py                    # CPU-sized: 8 layers, D 512, 32 experts of F 256, top 4
    python experiments/moe_step.py --experts 64 --tokens 8192
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import ModelConfig, init_decoder


def step_time(cfg: ModelConfig, tokens: int, repeats: int) -> float:
    graphdef, params = nnx.split(init_decoder(cfg, seed=0))
    ids = jax.random.randint(jax.random.key(1), (1, tokens), 0, cfg.vocab_size)

    def loss(p):
        out = nnx.merge(graphdef, p)(ids, return_logits=False)
        return jnp.mean(out.hidden_BxTxD**2)

    fn = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(fn(params))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(params))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--expert-width", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    base = ModelConfig(
        vocab_size=1024, hidden_size=a.hidden, intermediate_size=a.expert_width, num_layers=a.layers, num_heads=8,
        num_kv_heads=2, architecture="Qwen3MoeForCausalLM", qk_norm="head", num_experts=a.experts,
        experts_per_token=a.top_k, expert_intermediate_size=a.expert_width,
    )  # fmt: skip
    print(f"backend {jax.default_backend()}; {a.layers} layers, D {a.hidden}, {a.experts} experts of F "
          f"{a.expert_width}, top {a.top_k}, {a.tokens} tokens; forward + backward")  # fmt: skip
    impls = ("blocked", "grouped", "dense")
    times = {impl: step_time(base.replace(moe_impl=impl), a.tokens, a.repeats) for impl in impls}
    print("| experts | step ms | × dense |\n|---|---|---|")
    for impl, t in times.items():
        print(f"| {impl} | {t * 1e3:.0f} | {times['dense'] / t:.2f}× |")


if __name__ == "__main__":
    main()
