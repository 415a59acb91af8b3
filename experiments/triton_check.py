"""Compile dpo_jax's FlashMask kernels for NVIDIA GPUs on a machine without one.

JAX lowers each kernel of a FlashMask call (forward, dq, dk/dv; a shared-prompt row with a window and soft-capping,
bfloat16) to Triton's IR for CUDA, printed by ``pallas_call(debug=True)``; Triton's own compiler (the ``triton``
wheel: no GPU needed) takes that IR to PTX and, with its bundled ``ptxas``, to a cubin for each architecture. Printed
per head width and kernel: the block, warps, shared memory against the architecture's limit per block, and the
registers a thread uses and the bytes it spills (``cuobjdump --dump-resource-usage``).

    pip install triton            # the wheel; this check only compiles
    python experiments/triton_check.py --widths 64,128,256

A check of the IR, not of XLA's compile: XLA compiles the same IR with jaxlib's Triton, not the wheel's (close
versions, not the same), and speed needs a GPU (``experiments/attention_gpu.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from dpo_jax.models import flashmask  # noqa: E402
from dpo_jax.models.attention import Ids  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use (A100, H100)


def triton_ir(width: int, block: int) -> dict[str, str]:
    """kernel name -> Triton IR (text, locations dropped) of a FlashMask call's forward and gradient for CUDA."""
    t, kh, g = 300, 2, 2
    seg = np.r_[np.ones(150), np.full(140, 2), np.zeros(10)].astype(np.int32)[None]
    branch = np.r_[np.zeros(60), np.ones(50), np.full(40, 2), np.zeros(50), np.ones(45), np.full(45, 2),
                   np.zeros(10)].astype(np.int32)[None]  # fmt: skip
    ids = Ids(jnp.arange(t)[None], jnp.asarray(seg > 0), jnp.asarray(seg), jnp.asarray(branch), jnp.arange(t)[None])
    q = jnp.zeros((1, t, kh, g, width), jnp.bfloat16)
    k = jnp.zeros((1, t, kh, width), jnp.bfloat16)

    def loss(q, k, v):
        out = flashmask.flashmask_attention(q, k, v, ids, 64, block=block, softcap=30.0, interpret=False)
        return out.astype(jnp.float32).sum()

    original = pl.pallas_call
    pl.pallas_call = lambda *a, **kw: original(*a, **{**kw, "debug": True})  # prints each kernel's Triton IR
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("cuda",))
    finally:
        pl.pallas_call = original
    modules = re.findall(r"The Triton module for pallas_call (\w+) at [^\n]*\n.*?(module @.*?)(?=\nThe |\Z)",
                         printed.getvalue(), re.S)  # fmt: skip
    return {name: _plain(text) for name, text in modules}


def _plain(text: str) -> str:
    """The IR without its pretty-printed locations (which Triton's parser does not read)."""
    text = re.sub(r'\s+"[^"\n]*"\(#loc\d+\)', "", text)
    text = re.sub(r"\s+\[unknown\]", "", text)
    return "\n".join(line for line in text.splitlines() if not line.startswith(("#loc", " at #loc"))) + "\n"


def compile_ir(ir: str, arch: int, warps: int, folder: str, name: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(folder, f"{name}.ttir")
    with open(path, "w") as f:
        f.write(ir)
    kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=2))
    cubin = os.path.join(folder, f"{name}_sm{arch}.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                           text=True).stdout  # fmt: skip
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return dict(shared=kernel.metadata.shared, regs=int(regs.group(1)) if regs else None,
                spill=int(local.group(1)) if local else None)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,128,256", help="head widths")
    parser.add_argument("--block", type=int, default=512, help="model.attention_block (capped per width)")
    parser.add_argument("--archs", default="80,90", help="compute capabilities")
    args = parser.parse_args(argv)
    import triton

    print(f"jax {jax.__version__}, triton {triton.__version__} (the wheel's compiler)")
    print("| head width | block | warps | kernel | arch | shared KB (limit) | registers / thread | spilled bytes |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for width in (int(w) for w in args.widths.split(",")):
            block = flashmask.block_size(args.block, width)
            warps = 4 if width <= 64 else 8  # as flashmask's kernels ask
            for name, ir in triton_ir(width, args.block).items():
                for arch in (int(a) for a in args.archs.split(",")):
                    r = compile_ir(ir, arch, warps, folder, f"{name}_{width}")
                    fits = r["shared"] <= SHARED_LIMIT[arch]
                    rows.append(dict(width=width, block=block, kernel=name, arch=arch, fits=fits, **r))
                    print(f"| {width} | {block} | {warps} | {name} | sm_{arch} | {r['shared'] / 1024:.0f} "
                          f"({SHARED_LIMIT[arch] // 1024}{'' if fits else ', OVER'}) | {r['regs']} | {r['spill']} |",
                          flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
