"""What the context axis costs: bytes each DPO step sends, against the attention FLOPs they overlap, and step times.

For each context size N (``mesh.context``, one pair of ``--row`` tokens split over N devices), the DPO step of
``experiments/scale.py`` (the packed shared-prompt layout, bfloat16, full remat, the cached reference) is compiled
and its program read:

- **ring bytes**: the key/value chunks (and, in the backward, their gradients) the ring attention passes to the next
  device: every ``collective-permute`` of the compiled per-device program, times how often it runs (the trip
  counts of the loops around it: the ring's two-way rounds — (N - 1) // 2, all of them, as the causal pair needs —
  inside the layer scan; a conditional's costliest branch);
- **the load balance**: the ring's critical path (each ring round's busiest device, in block pairs of one pair's row,
  summed over the steps) for contiguous chunks against the balanced order the decoder runs (``ring_blocks``); the
  ring bytes include the order's exchange (half a chunk of the hidden state, each way, once a pass);
- with ``--strategy gather`` (``model.context_attention="gather"``) the keys and values are all-gathered instead
  and their gradients reduce-scattered: those bytes join the other collectives' (compare the totals);
- **parameter bytes**: the result bytes of FSDP's collectives (the parameters are split over the context axis too:
  all-gathers before use, reduce-scatters of the gradients, all-reduces of sums), with their trip counts;
- **attention FLOPs** of one device: its queries against the keys they see, 4·T_q·T_k·H·E per layer forward (x3
  with the backward and x1 more with full remat), counted for the causal mask;
- what those would take on an accelerator: transfers at ``--link-gbs`` (H100 NVLink: 450 GB/s a direction)
  against the attention at ``--peak-tflops`` (H100 bf16 dense: 989) — the ring hides its sends when the
  attention of a chunk takes longer than passing the next one.

With ``--time`` the steps also run (small shapes: simulated CPU devices share this host's cores, so the times show
the program's overhead, not an overlap a CPU cannot have).

    python experiments/context_cost.py --model llama-3.1-8b --row 131072 --contexts 2,4,8          # bytes, FLOPs
    python experiments/context_cost.py --model tiny --row 4096 --contexts 1,2,4,8 --time --steps 3  # step times
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax.core import optim  # noqa: E402
from dpo_jax.core.state import init_state  # noqa: E402
from dpo_jax.infra import sharding  # noqa: E402
from dpo_jax.models import attention, context  # noqa: E402
from dpo_jax.training import builders  # noqa: E402
from experiments.scale import MODELS, init_params, model_config, step_program  # noqa: E402

COLLECTIVES = ("collective-permute", "all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape (``bf16[4,128,8]``) in an HLO result type."""
    return sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text))  # fmt: skip


def collective_bytes(hlo: str, unknown_trips: float = 1.0) -> dict[str, float]:
    """Bytes each device sends per run of the program, by collective kind: each collective's result size times how
    often it runs — the ``known_trip_count`` of the ``while`` loops around it (``unknown_trips`` for a loop of traced
    length: the ring's rounds), through calls; a conditional counts its costliest branch (an upper bound: the
    ring's other-way send is counted in the round where both ways bring one chunk too)."""
    comps: dict[str, list[str]] = {}
    name = entry = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    pattern = re.compile(r"\s*(?:ROOT )?%[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")

    @functools.cache
    def total(comp: str) -> tuple[tuple[str, float], ...]:
        sent: dict[str, float] = defaultdict(float)

        def add(part, times=1.0):
            for kind, b in part:
                sent[kind] += b * times

        for line in comps.get(comp, []):
            if m := pattern.match(line):  # a -start's result holds the operand and the output
                sent[m.group(2)] += _shape_bytes(m.group(1).split(" ")[0] if m.group(3) is None else m.group(1)) / (
                    2 if m.group(3) else 1
                )
            trip = 1.0
            if " while(" in line:
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trip = float(m.group(1)) if m else unknown_trips
            for callee in re.findall(r"(?:body|to_apply|calls)=%([\w.\-]+)", line):
                if callee in comps and " fusion(" not in line:
                    add(total(callee), trip)
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
                parts = [total(c) for c in re.findall(r"%([\w.\-]+)", branches)]
                add(max(parts, key=lambda p: sum(b for _, b in p)))
        return tuple(sent.items())

    return dict(total(entry))


def attention_flops(mc, row: int, context: int) -> float:
    """One device's attention FLOPs in a DPO step of one pair of ``row`` tokens (prompt half, completions a quarter
    each, the prompt shared): the causal pairs of (query, key) it scores, 4·H·E each (scores and values), times 3
    (forward, backward's two) + 1 (full remat's recomputed forward); sliding-window layers see at most the window."""
    p, c = row // 2, row // 4
    e = mc.head_dim or mc.hidden_size // mc.num_heads
    total = 0.0
    for w in mc.windows:
        see = lambda n, w=w: n * (n + 1) / 2 if w is None else sum(min(i + 1, w) for i in range(n))  # noqa: E731
        pairs = see(p) + 2 * (see(p + c) - see(p))  # the prompt's, and each completion's (the prompt and itself)
        total += pairs * 4 * mc.num_heads * e
    return total * 4 / context  # the ring splits the causal work evenly (its balanced order)


def ring_balance(row: int, n: int, block: int) -> tuple[float, float]:
    """The ring's critical path in (query block, key block) pairs of one pair's row (the layout above): each round's
    busiest device, summed over the rounds, for contiguous chunks and for the balanced order the decoder runs."""
    p, c = row // 2, row // 4
    _, tp = context.ring_layout(row, n, block)
    branch = np.concatenate([np.zeros(p), np.ones(c), np.full(row - p - c, 2), np.zeros(tp - row)]).astype(np.int32)
    valid = np.arange(tp) < row
    paths = []
    for order in (np.arange(tp), context.balanced_order(tp, n)):
        ids = attention.Ids(*(jnp.asarray(x) for x in (order, valid[order], valid[order].astype(np.int32),
                                                         branch[order])))  # fmt: skip
        paths.append(float(context.ring_blocks(ids, n, block).max(axis=0).sum()))
    return paths[0], paths[1]


def time_steps(mc, mesh, compiled, batch, steps: int) -> float:
    init = lambda: init_params(mc)[0]  # noqa: E731
    params = jax.jit(init, out_shardings=sharding.param_shardings(jax.eval_shape(init), mesh))()
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-5, warmup_steps=0), 1000)
    make_state = lambda p: init_state(p, tx, builders.default_hparams(), 0)  # noqa: E731
    state = jax.jit(make_state, out_shardings=sharding.tree_shardings(jax.eval_shape(make_state, params), mesh))(params)
    batch = jax.device_put(batch, sharding.batch_shardings(mesh, batch))
    state, metrics = compiled(state, batch, None)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, None)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
    parser.add_argument("--row", type=int, default=4096, help="tokens of the pair (prompt half, completions a quarter)")
    parser.add_argument("--contexts", default="1,2,4,8")
    parser.add_argument(
        "--strategy",
        default="ring",
        choices=("ring", "gather"),
        help="model.context_attention: the ring, or all-gathering the keys and values",
    )
    parser.add_argument("--time", action="store_true", help="also run the steps (small shapes only)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--link-gbs", type=float, default=450.0, help="accelerator link, GB/s a direction")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 dense peak")
    args = parser.parse_args(argv)
    mc = model_config(args.model, context_attention=args.strategy)
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices; {args.model}, one pair of {args.row:,} "
          f"tokens a step, bfloat16, full remat, model.context_attention={args.strategy}", flush=True)  # fmt: skip
    rows = []
    for n in (int(x) for x in args.contexts.split(",")):
        mesh = sharding.make_mesh(data=1, fsdp=1, context=n, devices=jax.devices()[:n])
        t0 = time.perf_counter()
        compiled, batch = step_program(mc, mesh, args.row)
        sent = collective_bytes(compiled.as_text(), unknown_trips=(n - 1) // 2)  # causal: every two-way round
        ring = sent.get("collective-permute", 0.0)
        params = sum(v for k, v in sent.items() if k != "collective-permute")
        flops = attention_flops(mc, args.row, n)
        row = dict(context=n, ring_mb=ring / 1e6, param_mb=params / 1e6, total_mb=(ring + params) / 1e6,
                   attn_gflop=flops / 1e9,
                   flop_per_byte=flops / ring if ring else float("inf"), send_ms=ring / (args.link_gbs * 1e9) * 1e3,
                   attn_ms=flops / (args.peak_tflops * 1e12) * 1e3, compile_s=time.perf_counter() - t0)  # fmt: skip
        row["contiguous_path"], row["balanced_path"] = ring_balance(args.row, n, mc.attention_block)
        if args.time:
            row["step_ms"] = time_steps(mc, mesh, compiled, batch, args.steps) * 1e3
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    print(f"\n| context | ring sends MB / device / step | other collectives (results) MB | all MB | "
          f"attention GFLOP / device | "
          f"FLOP per ring byte | sends at {args.link_gbs:.0f} GB/s ms | attention at {args.peak_tflops:.0f} TFLOP/s ms"
          " | ring's critical path, contiguous / balanced order"
          + (" | step ms (simulated devices, this CPU) |" if args.time else " |"))  # fmt: skip
    print("|---" * (9 + args.time) + "|")
    for r in rows:
        print(f"| {r['context']} | {r['ring_mb']:.1f} | {r['param_mb']:.1f} | {r['total_mb']:.1f} | "
              f"{r['attn_gflop']:.1f} | "
              f"{r['flop_per_byte']:.0f} | {r['send_ms']:.2f} | {r['attn_ms']:.2f} | "
              f"{r['contiguous_path'] / r['balanced_path']:.2f}x |"
              + (f" {r['step_ms']:.0f} |" if args.time else ""))  # fmt: skip
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
