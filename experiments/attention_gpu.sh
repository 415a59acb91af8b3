#!/usr/bin/env bash
# The accelerator check of the fused-attention issue on one GPU (H100 / H200): about 6 minutes. The 1B-shaped model's
# DPO step on the default layout (packed pairs, the prompt shared) at 4k- and 16k-token pairs by FlashMask (dpo_jax's
# Pallas/Triton kernel, dpo_jax/models/flashmask.py: what model.attention=auto runs on a GPU) beside dpo_jax's
# blockwise kernel, and TRL's DPOTrainer on the same shapes: ms/step, real-token MFU and peak memory, as
# `scale.py run` prints them. Writes its log to $OUT (or runs/attention_gpu).
#   pip install -e ".[bench]" && bash experiments/attention_gpu.sh
set -euo pipefail
out=${OUT:-runs/attention_gpu}
mkdir -p "$out"
cd "$(dirname "$0")"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv || true
  for row in 4096 16384; do
    timeout 150 python scale.py run --model llama-3.2-1b --row "$row" --pairs 1 --steps 6 --attention flashmask \
      --trl || true
    timeout 90 python scale.py run --model llama-3.2-1b --row "$row" --pairs 1 --steps 6 --attention blockwise || true
  done
} 2>&1 | tee "$out/attention_gpu.log"
