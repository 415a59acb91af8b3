#!/usr/bin/env bash
# The accelerator check of the scale issue, on one GPU (H100 / H200): about 8 minutes. Writes its log to $OUT (or
# runs/scale_gpu) and prints three tables: the 1B-shaped model at 4k-token pairs and the 8B-shaped model with LoRA,
# each beside TRL's DPOTrainer on the same shapes, and the longest pair each side trains; on several GPUs also the
# context axis's cost (experiments/context_cost.py).
#   pip install -e ".[bench]" && bash experiments/scale_gpu.sh
set -euo pipefail
out=${OUT:-runs/scale_gpu}
mkdir -p "$out"
cd "$(dirname "$0")"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv || true
  timeout 200 python scale.py run --model llama-3.2-1b --row 4096 --pairs 8 --steps 8 --trl
  timeout 180 python scale.py run --model llama-3.1-8b --lora 16 --row 4096 --pairs 4 --steps 6 --trl
  timeout 150 python scale.py longest --model llama-3.2-1b --row 8192 --max-row 131072 --trl
  # on a multi-GPU machine, the context axis (mesh.context): bytes sent against the attention, and step times
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)
  contexts=1
  for n in 2 4 8; do if [ "$gpus" -ge "$n" ]; then contexts="$contexts,$n"; fi; done
  if [ "$gpus" -ge 2 ]; then
    for strategy in ring gather; do  # the ring (balanced order) and all-gathering the keys: which is faster here
      timeout 300 python context_cost.py --model llama-3.2-1b --row 32768 --contexts "$contexts" --time --steps 3 \
        --strategy "$strategy"
    done
  fi
} 2>&1 | tee "$out/scale_gpu.log"
