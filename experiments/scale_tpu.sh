#!/usr/bin/env bash
# The accelerator check of the fused-attention issue on a TPU (one host: v4 / v5e / v5p / v6e): the 1B-shaped model's
# DPO step on the default layout (packed pairs, the prompt shared) at 4k- and 16k-token pairs, by splash attention
# (the two passes of dpo_jax/models/splash.py: what model.attention=auto runs on a TPU) beside dpo_jax's blockwise
# kernel: ms/step, real-token MFU and peak memory, as `scale.py run` prints them. (TRL has no TPU path to compare.)
#   pip install -e . "jax[tpu]" && bash experiments/scale_tpu.sh
set -euo pipefail
out=${OUT:-runs/scale_tpu}
mkdir -p "$out"
cd "$(dirname "$0")"
{
  python -c "import jax; print(jax.devices())"
  for row in 4096 16384; do
    for attention in splash blockwise; do
      timeout 600 python scale.py run --model llama-3.2-1b --row "$row" --pairs 1 --steps 8 --attention "$attention"
    done
  done
} 2>&1 | tee "$out/scale_tpu.log"
