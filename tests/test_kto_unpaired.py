"""Unpaired KTO files (TRL's ``prompt`` / ``completion`` / ``label`` format, standard and conversational) with
unequal numbers of desirable and undesirable rows: the tokens, the mismatched KL completions and the loss equal
TRL 1.16's ``KTOTrainer`` on the same file, models and reference (TRL runs its own tokenization and torch forward)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_data import bpe_chat_tokenizer

from dpo_jax.core import scoring, step
from dpo_jax.data import Layout, PreferenceLoader, TokenizeConfig, kto, load_examples, tokenize_examples
from dpo_jax.infra import hf
from dpo_jax.models import ModelConfig, init_decoder
from dpo_jax.training import builders

TEXTS = [
    ("How are you?", " I am fine, thank you.", True),
    ("Say it again.", " Hello there!", True),
    ("Why?", " No.", False),
    ("Be brief.", " Hello!", True),
    ("Hello there!", " Why? No.", False),
    ("How are you? Why?", " I am fine.", True),
    ("Say it.", " No. No.", False),
    ("Hello!", " Thank you.", True),
]
BETA, DESIRABLE, UNDESIRABLE = 0.3, 1.0, 1.4  # 5 desirable, 3 undesirable rows


def rows(kind):
    if kind == "standard":
        return [{"prompt": p, "completion": c, "label": d} for p, c, d in TEXTS]
    return [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c.strip()}],
             "label": d} for p, c, d in TEXTS]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tokenizer, a policy and a reference (another model) as Hugging Face folders."""
    root = tmp_path_factory.mktemp("kto")
    tok_dir = bpe_chat_tokenizer(root / "tok", "chatml")
    tok = hf.HFTokenizer.from_folder(tok_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, initializer_range=0.2, eos_token_id=tok.eos_token_id)  # fmt: skip
    for name, seed in (("policy", 1), ("reference", 2)):
        hf.save_pretrained(init_decoder(cfg, seed=seed), root / name, tok)
    return root, tok


def trl_loss(root, data, tmp_path):
    """TRL's KTOTrainer on the file: its tokenized examples (dataset order) and its loss on them as one batch."""
    import datasets
    import transformers
    from trl import KTOConfig, KTOTrainer

    load = lambda name: transformers.AutoModelForCausalLM.from_pretrained(root / name).eval()  # noqa: E731
    args = KTOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(data), beta=BETA,
        desirable_weight=DESIRABLE, undesirable_weight=UNDESIRABLE, report_to="none", use_cpu=True,
        max_length=None, bf16=False,  # float32 as ours (TRL's default would run the prepared reference in bfloat16)
    )  # fmt: skip
    trainer = KTOTrainer(
        model=load("policy"), ref_model=load("reference"), args=args,
        train_dataset=datasets.Dataset.from_list(data), processing_class=transformers.AutoTokenizer.from_pretrained(
            root / "tok"),
    )  # fmt: skip
    examples = [trainer.train_dataset[i] for i in range(len(data))]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    return examples, loss


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_unpaired_kto_file_equals_trl(folders, tmp_path, kind):
    root, tok = folders
    data = rows(kind)
    file = tmp_path / "unpaired.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in data))
    examples, report = load_examples(file)
    assert report.rows == len(data) and all(e.unpaired for e in examples)
    pairs, _ = tokenize_examples(examples, tok, TokenizeConfig(max_length=128, max_prompt_length=64))
    kto_pairs = kto.from_pairs(pairs)
    assert kto.counts(kto_pairs) == (5, 3)

    theirs, want = trl_loss(root, data, tmp_path)
    for ours, t in zip(kto_pairs, theirs, strict=True):  # TRL's tokens, label and KL completion, row by row
        assert ours.prompt.tolist() == t["prompt_ids"] and ours.chosen.tolist() == t["completion_ids"]
        assert ours.rejected.tolist() == t["KL_completion_ids"] and ours.prob == float(t["label"])

    policy, _ = hf.load_pretrained(root / "policy")
    reference, _ = hf.load_pretrained(root / "reference")
    graphdef, params = nnx.split(policy)
    ref_params = nnx.split(reference)[1]
    loader = PreferenceLoader(kto_pairs, len(kto_pairs), shuffle=False, drop_last=False, layout=Layout())
    batch = jax.tree.map(jnp.asarray, loader.batch(0))
    sc = step.StepConfig("dpo", ("kto",))
    hp = builders.default_hparams(beta=BETA, desirable_weight=DESIRABLE, undesirable_weight=UNDESIRABLE)
    stats = scoring.pair_stats(graphdef, params, batch)
    ref = step.reference_logps(graphdef, batch, ref_params, hp, sc, cached=False)
    losses, _ = step.pair_losses(stats, ref, batch, hp, sc)
    valid = np.asarray(batch.valid_GxP).reshape(-1) > 0
    np.testing.assert_allclose(float(np.asarray(losses)[valid].mean()), want, rtol=1e-5)
