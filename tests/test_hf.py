"""Hugging Face folders: import, export (checked by transformers itself), sharding, errors, tokenizer."""

import json
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import padded_batch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from dpo_jax.infra import hf
from dpo_jax.models import ModelConfig, init_decoder

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}[USER] {{ m['content'] }}\n{% else %}[BOT] {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}[BOT] {% endif %}"
)


def our_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)).logits_BxTxV)


def torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("LlamaForCausalLM", dict(rope_type="llama3", rope_factor=8.0, rope_original_max_position=8)),
        ("LlamaForCausalLM", dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True)),
        ("MistralForCausalLM", dict(sliding_window=3)),
        ("Qwen2ForCausalLM", dict(qkv_bias=True)),
    ],
)
def test_export_loads_in_transformers_with_same_logits(tmp_path, arch, extra):
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        architecture=arch,
        initializer_range=0.3,
        eos_token_id=2,
        **extra,
    )
    ours = init_decoder(cfg, seed=3)
    hf.save_pretrained(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == arch
    ids, mask = padded_batch()
    valid = mask.astype(bool)
    assert np.abs(our_logits(ours, ids, mask) - torch_logits(theirs, ids, mask))[valid].max() <= 1e-4


def test_import_then_export_round_trips(hf_checkpoint, tmp_path):
    name, model, path = hf_checkpoint
    ours, _ = hf.load_pretrained(path)
    hf.save_pretrained(ours, tmp_path)
    original = load_file(next(path.glob("*.safetensors")))
    exported = load_file(tmp_path / "model.safetensors")
    assert set(exported) <= set(original)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_sharded_checkpoint_with_index(hf_checkpoint, tmp_path):
    name, model, path = hf_checkpoint
    ours, _ = hf.load_pretrained(path)
    hf.save_pretrained(ours, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / hf.SINGLE_FILE).exists()
    reloaded, _ = hf.load_pretrained(tmp_path)
    ids, mask = padded_batch()
    np.testing.assert_array_equal(our_logits(reloaded, ids, mask), our_logits(ours, ids, mask))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    valid = mask.astype(bool)
    assert np.abs(torch_logits(theirs, ids, mask) - torch_logits(model, ids, mask))[valid].max() <= 1e-5


def test_export_streams_a_tensor_at_a_time(tmp_path):
    """The export never holds the whole model's float32 copies (a 262k-vocabulary checkpoint's export added
    2.6 GB): numpy's allocations (traced by tracemalloc) peak near the largest tensor, far below the total; the
    file is what safetensors itself reads back, torch metadata included."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4, num_kv_heads=2)
    ours = init_decoder(cfg, seed=1)
    expected = {k: np.array(v) for k, v in hf.export_tensors(ours).items()}
    total = sum(v.nbytes for v in expected.values())
    largest = max(v.nbytes for v in expected.values())
    assert total > 20 * largest
    tracemalloc.start()
    try:
        hf.save_pretrained(ours, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 4, (peak, total, largest)
    with safe_open(tmp_path / hf.SINGLE_FILE, "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(f.get_tensor(key), expected[key], err_msg=key)
    with open(tmp_path / hf.SINGLE_FILE, "rb") as f:
        assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0  # the data starts aligned


@pytest.fixture
def llama_folder(tmp_path):
    from conftest import make_hf_model

    make_hf_model("llama3").save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_folder):
    _edit_weights(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_pretrained(llama_folder)


def test_unexpected_tensor_is_named(llama_folder):
    _edit_weights(llama_folder, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.0\.extra\.weight"):
        hf.load_pretrained(llama_folder)


def test_misshaped_tensor_names_file_and_shapes(llama_folder):
    _edit_weights(llama_folder, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor model\.norm\.weight has shape \(31,\); "
        r"config\.json implies \(32,\)",
    ):
        hf.load_pretrained(llama_folder)


def test_bad_config_json_names_file_and_line(llama_folder):
    (llama_folder / "config.json").write_text('{\n  "architectures": ["LlamaForCausalLM"],\n  "vocab_size": ,\n}')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON \(line 3\)"):
        hf.load_pretrained(llama_folder)


def test_unsupported_architecture_is_named(llama_folder):
    cfg = json.loads((llama_folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        hf.load_pretrained(llama_folder)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tmp_path / "nowhere")


def make_tokenizer_folder(path):
    words = ["hello", "world", "the", "cat", "sat", "on", "mat", "[SYS]", "[USER]", "[BOT]", "be", "brief", "hi"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_tokenizer_matches_transformers(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "tok")
    ours = hf.HFTokenizer.from_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = "hello world the cat sat on the mat"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text, add_special_tokens=False))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "the cat"},
    ]
    for gen in (False, True):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen
        )


def test_load_pretrained_returns_tokenizer_and_export_keeps_it(tmp_path):
    from conftest import make_hf_model

    make_hf_model("qwen2").save_pretrained(tmp_path / "model")
    make_tokenizer_folder(tmp_path / "model")
    model, tok = hf.load_pretrained(tmp_path / "model")
    assert tok is not None and tok.chat_template == CHAT_TEMPLATE
    hf.save_pretrained(model, tmp_path / "out", tok)
    # The class the exported tokenizer_config.json declares. (AutoTokenizer would pick Qwen2Tokenizer from the
    # model_type, which expects a BPE vocabulary, not this test's word-level one.)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    assert theirs.encode("the cat", add_special_tokens=False) == tok.encode("the cat")
    assert theirs.chat_template == CHAT_TEMPLATE
