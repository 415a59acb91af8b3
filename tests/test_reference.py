"""Reference cache: a cache file is used only for the pairs it was computed from; a LoRA run shares a full run's."""

import jax
import numpy as np
from flax import nnx

from dpo_jax.data import TokenizeConfig, load_examples, synthetic, tokenize_examples
from dpo_jax.models import ModelConfig, init_decoder, lora
from dpo_jax.training import reference


def _pairs(tmp_path, n, seed=0):
    paths = synthetic.write_task(tmp_path / "task", synthetic.TaskConfig(n_sft=4, n_train=n, n_eval=4, seed=seed))
    examples, _ = load_examples(paths["train"])
    return tokenize_examples(examples, synthetic.build_tokenizer(), TokenizeConfig(32, 16))[0]


def test_a_cache_of_other_rows_is_recomputed_never_used(tmp_path, capsys):
    pairs = _pairs(tmp_path, 12)
    calls = []

    def compute():  # stands in for the reference pass: row i holds (i, -i)
        calls.append(1)
        return np.stack([np.arange(len(pairs)), -np.arange(len(pairs))], 1).astype(np.float32)

    first, hit = reference.cached_logps(tmp_path / "cache", "k", compute, pairs)
    assert not hit and first.shape == (12, 2)
    again, hit = reference.cached_logps(tmp_path / "cache", "k", compute, pairs)
    assert hit and np.array_equal(again, first) and len(calls) == 1
    # the same file read for data with a row more, a row fewer, or the same count of other pairs
    other = _pairs(tmp_path / "other", 12, seed=1)
    for data in (pairs + pairs[:1], pairs[:-1], other):
        values, hit = reference.cached_logps(tmp_path / "cache", "k", lambda d=data: np.zeros((len(d), 2)), data)
        assert not hit and values.shape == (len(data), 2) and not values.any()
        assert "does not match the data" in capsys.readouterr().out
        reference.cached_logps(tmp_path / "cache", "k", compute, pairs)  # back to the right values
    (tmp_path / "cache" / "k.npz").write_bytes(b"not a numpy file")
    values, hit = reference.cached_logps(tmp_path / "cache", "k", compute, pairs)
    assert not hit and np.array_equal(values, first) and "unreadable" in capsys.readouterr().out


def test_a_lora_reference_shares_the_full_models_cache_key(tmp_path):
    pairs = _pairs(tmp_path, 4)
    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    model = init_decoder(cfg, seed=0)
    full = nnx.state(model)
    adapted = lora.attach(model, rank=4, alpha=8.0, target_names=("q_proj", "v_proj"), seed=1)
    adapters, base = lora.split(nnx.state(adapted))
    off = lora.compose(lora.off(adapters), base)  # the LoRA run's reference: its base, adapters off
    settings = {"head": {"token_chunk": 8}}
    key = reference.cache_key(full, cfg, pairs, settings)
    assert reference.cache_key(off, adapted.config, pairs, settings) == key
    bf16 = lora.cast_base(nnx.state(adapted), "bfloat16")  # other weights: another entry
    assert reference.cache_key(bf16, adapted.config, pairs, settings) != key
    moved = jax.tree.map(lambda x: x + 1e-3, full)
    assert reference.cache_key(moved, cfg, pairs, settings) != key
    assert reference.cache_key(full, cfg, pairs[:-1], settings) != key
