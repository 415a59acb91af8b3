"""DPO of a local Hugging Face checkpoint on a local preference file.

The model folder holds config.json, *.safetensors, tokenizer.json and tokenizer_config.json; the data is a
.jsonl / .json / .parquet file or a save_to_disk folder with prompt / chosen / rejected (text or messages).
The checkpoint is also the reference; its log-probs are cached once. The result is exported back to
<workdir>/hf for transformers.

    dpo-jax train --config configs/hf_local.py --workdir runs/my_dpo \\
        --config.model.hf_path=/models/Llama-3.2-1B-Instruct \\
        --config.data.train_path=/data/prefs_train.jsonl --config.data.eval_path=/data/prefs_eval.jsonl

``configs/hf_local.py:cpu`` is a first look on a CPU (float32, short sequences, 20 steps of 8 pairs, a small eval):
minutes for a ~100M-parameter checkpoint on a laptop, with the same code path as the full run. ``:lora`` (or
``:cpu,lora``) trains rank-16 adapters on every projection instead, at a LoRA-sized learning rate.
"""

import ml_collections
from dpo_jax.configs.default import get_config as default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default_config()
    c.task = "files"
    c.model.init = "hf"
    c.model.hf_path = ""  # required: a local folder
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.data.update(max_length=1024, max_prompt_length=512, buckets=(256, 512, 1024))
    c.sft.steps = 0  # the checkpoint is the reference
    c.optim.update(
        steps=1000,
        batch_size=32,
        learning_rate=5e-7,
        warmup_steps=50,
        schedule="linear",
        end_lr_fraction=0.0,
        weight_decay=0.0,
    )
    c.dpo.beta = 0.1
    c.eval.update(every=200, batch_size=32, num_prompts=64, max_new_tokens=128)
    c.checkpoint.every = 200
    args = set((arg or "").split(",")) - {""}
    if args - {"cpu", "lora"}:
        raise ValueError(f"configs/hf_local.py: unknown argument {arg!r}; expected cpu, lora, cpu,lora or nothing")
    if "cpu" in args:
        # float32 on a CPU, every layer recomputed in the backward pass: a 262k-vocabulary 270M model's step over 8
        # pairs of ~800 tokens holds 2.1 GB of temporaries at remat=full, 5.1 GB at dots_no_batch (XLA's memory
        # analysis; remat=none does not fit 24 GB), which a laptop's memory matters more than its ~15% of step time
        c.model.remat = "full"
        c.model.dtype = "float32"
        c.data.update(max_length=256, max_prompt_length=128, buckets=(128, 256))
        c.optim.update(steps=20, batch_size=8, warmup_steps=2)
        c.eval.update(every=10, batch_size=8, num_prompts=8, max_new_tokens=32)
        c.checkpoint.every = 10
        c.log_every = 2
    if "lora" in args:
        c.lora.update(rank=16, alpha=32.0)
        # at the same learning rate rank-16 adapters move the margins ~50x less than full fine-tuning (measured on
        # SmolLM2-135M): 50 x 5e-7
        c.optim.learning_rate = 2.5e-5
    return c
