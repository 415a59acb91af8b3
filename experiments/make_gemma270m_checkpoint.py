"""A random Gemma-3-270M-shaped checkpoint (262,144 vocabulary, tied), a WordLevel tokenizer of 262,144 words and
preference files (64 train / 16 eval pairs of ~300 prompt + 2 x ~250 completion words): the whole-run memory check of
a real vocabulary, nothing downloaded (transformers and torch: `pip install -e ".[bench]"`).

    python experiments/make_gemma270m_checkpoint.py /tmp/g270
    dpo-jax train --config configs/hf_local.py:cpu --workdir /tmp/g270run --config.model.hf_path=/tmp/g270/model \
        --config.data.train_path=/tmp/g270/train.jsonl --config.data.eval_path=/tmp/g270/eval.jsonl \
        --config.data.max_length=1024 --config.data.max_prompt_length=512 --config.data.buckets="(512,1024)" \
        --config.optim.steps=4 --config.eval.every=2 --config.checkpoint.every=2
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from throughput import CASES
from tokenizers import Tokenizer, models, pre_tokenizers

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
CASE = CASES["gemma270m"]  # the throughput benchmark's shape, one declaration
V = CASE["vocab"]
hf_cfg = {k: v for k, v in CASE["hf"].items() if k not in ("architectures", "sliding_window_pattern")}
cfg = transformers.Gemma3TextConfig(
    **hf_cfg, vocab_size=V, hidden_size=CASE["hidden"], num_hidden_layers=CASE["layers"],
    num_attention_heads=CASE["heads"], num_key_value_heads=CASE["kv"], intermediate_size=CASE["ffn"],
    max_position_embeddings=32768, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,  # Gemma 3: 5 local layers to 1 global
)  # fmt: skip
torch.manual_seed(0)
model = transformers.Gemma3ForCausalLM(cfg)
model.save_pretrained(out / "model")
vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, V)}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
tok.save(str(out / "model" / "tokenizer.json"))
(out / "model" / "tokenizer_config.json").write_text(
    json.dumps(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        }
    )
)
rng = np.random.default_rng(0)


def text(lo, hi):
    return " ".join(f"w{i}" for i in rng.integers(4, V, size=int(rng.integers(lo, hi))))


for name, n in (("train", 64), ("eval", 16)):
    with open(out / f"{name}.jsonl", "w") as f:
        for _ in range(n):
            f.write(
                json.dumps({"prompt": text(100, 500), "chosen": " " + text(20, 480), "rejected": " " + text(20, 480)})
                + "\n"
            )
print("ok", sum(p.numel() for p in model.parameters()) / 1e6)
