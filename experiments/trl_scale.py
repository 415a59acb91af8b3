"""TRL's DPOTrainer on the shapes of ``experiments/scale.py`` (called by ``scale.py run --trl``, in its own process).

The same model shape (a transformers model built from the config, random weights, bfloat16), the same pair
lengths (prompt half the row, two completions a quarter), TRL's best attention available (flash_attention_2 when
installed, else sdpa), gradient checkpointing on, precomputed reference log-probs off (TRL's default: a reference
forward every step), LoRA through PEFT when ``--lora`` is set. Prints one JSON line with the median step time.

    python experiments/trl_scale.py --model llama-3.2-1b --row 4096 --pairs 8 --steps 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
from scale import MODELS  # experiments/, the script's folder

GB = 10**9


def hf_config(name: str):
    import transformers

    m = MODELS[name]
    common = dict(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                  num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                  num_key_value_heads=m["num_kv_heads"], tie_word_embeddings=m.get("tie_word_embeddings", False),
                  rope_theta=m["rope_theta"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  max_position_embeddings=131072)  # fmt: skip
    if m.get("architecture") == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common, head_dim=m.get("head_dim", m["hidden_size"] // m["num_heads"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.2-1b", choices=sorted(MODELS))
    parser.add_argument("--row", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lora", type=int, default=0)
    args = parser.parse_args(argv)

    import datasets
    import torch
    import transformers
    import trl
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = hf_config(args.model)
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        attn = "sdpa"
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    peft_config, ref_model = None, None
    if args.lora:  # PEFT's reference: the model with its adapters disabled
        import peft

        peft_config = peft.LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear")
    else:  # a second copy, as TRL loads one from a checkpoint's path
        with torch.device(model.device):
            ref_model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                                      attn_implementation=attn)  # fmt: skip
        ref_model.load_state_dict(model.state_dict())
    vocab = {f"t{i}": i for i in range(3, cfg.vocab_size)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>", unk_token="<pad>")  # fmt: skip
    rng = np.random.default_rng(0)
    p, c = args.row // 2, args.row // 4 - 1  # TRL appends EOS to each completion
    text = lambda n: " ".join(f"t{i}" for i in rng.integers(3, cfg.vocab_size, size=n))  # noqa: E731
    n = args.pairs * (args.steps + 3)
    data = datasets.Dataset.from_dict({"prompt": [text(p) for _ in range(n)],
                                       "chosen": [" " + text(c) for _ in range(n)],
                                       "rejected": [" " + text(c) for _ in range(n)]})  # fmt: skip
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs, max_steps=args.steps + 3, learning_rate=1e-5,
            report_to="none", logging_steps=1000, save_strategy="no", bf16=True, gradient_checkpointing=True,
            use_cpu=not torch.cuda.is_available(),
            max_length=args.row + 8, dataloader_num_workers=0, beta=0.1, seed=0,
        )  # fmt: skip
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=data,
                                 processing_class=tok, peft_config=peft_config, callbacks=[Clock()])  # fmt: skip
        trainer.train()
    dt = float(np.median(np.diff(times)[2:]))
    peak = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else 0.0
    pairs = args.pairs * max(torch.cuda.device_count(), 1)
    print(json.dumps(dict(step_s=dt, pairs_per_s=pairs / dt, tokens_per_s=pairs * args.row / dt, mfu=float("nan"),
                          peak_memory_gb=peak, attention=attn)))  # fmt: skip


if __name__ == "__main__":
    main()
