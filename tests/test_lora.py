"""LoRA policies (dpo_jax.models.lora): a new adapter changes nothing; the merged export equals the adapted model in
``transformers``; ``peft`` loads the exported adapter onto the base with the same logits; shardings cover it."""

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import MOE_CASES, padded_batch
from flax import nnx
from helpers import tiny_config
from test_hf import our_logits, torch_logits

from dpo_jax.config import ConfigError, validate
from dpo_jax.core import optim, step
from dpo_jax.core.state import init_state
from dpo_jax.data import synthetic
from dpo_jax.infra import hf, sharding
from dpo_jax.models import ModelConfig, init_decoder, lora
from dpo_jax.models.config import LORA_TARGETS
from dpo_jax.models.llama import Linear
from dpo_jax.models.paths import path_str
from dpo_jax.training import builders, train
from dpo_jax.training.outputs import read_history


def adapted(path, targets=LORA_TARGETS, rank=4, alpha=8.0, seed=1):
    """The checkpoint with adapters whose B is random (as after training), so they change the function."""
    model, _ = hf.load_pretrained(path)
    model = lora.attach(model, rank=rank, alpha=alpha, target_names=targets, seed=seed)
    graphdef, params = nnx.split(model)
    adapters, base = lora.split(params)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), adapters)
    return nnx.merge(graphdef, lora.compose(adapters, base))


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # a mixture of experts' linear layers


@pytest.mark.slow
def test_a_new_adapter_changes_nothing_and_the_merged_export_equals_the_adapted_model(hf_checkpoint, tmp_path):
    name, _, path = hf_checkpoint
    targets = ATTENTION if name in MOE_CASES else LORA_TARGETS
    base, _ = hf.load_pretrained(path)
    new = lora.attach(base, rank=4, alpha=8.0, target_names=targets, seed=1)
    a = [x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(new)) if "lora_a" in jax.tree_util.keystr(p)]
    assert len(a) == len(targets) and all(float(jnp.abs(x).max()) > 0 for x in a)  # A random, B zero
    ids, mask = padded_batch()
    np.testing.assert_array_equal(our_logits(new, ids, mask), our_logits(base, ids, mask))

    model = adapted(path, targets)  # B random, as after training
    ours = our_logits(model, ids, mask)
    assert np.abs(ours - our_logits(base, ids, mask)).max() > 1e-2  # the adapters act
    hf.save_pretrained(lora.detach(model), tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert np.abs(ours - torch_logits(theirs, ids, mask))[mask.astype(bool)].max() <= 1e-4


@pytest.mark.slow
def test_peft_loads_the_adapter_onto_the_base(hf_checkpoint, tmp_path):
    import peft

    name, _, path = hf_checkpoint
    # Phi-3: q and k are two of qkv_proj's three parts, up one of gate_up_proj's two (one adapter each in PEFT)
    targets = (
        ("q_proj", "k_proj", "o_proj") if name in MOE_CASES else ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")
    )
    model = adapted(path, targets, rank=3, alpha=5.0)
    adapters, _ = lora.split(nnx.state(model))
    hf.save_peft(adapters, model.config.replace(lora_dropout=0.05), tmp_path / "adapter", base_model=str(path))
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].r == 3 and theirs.peft_config["default"].lora_dropout == 0.05
    ids, mask = padded_batch()
    ours = our_logits(model, ids, mask)
    assert np.abs(ours - torch_logits(theirs, ids, mask))[mask.astype(bool)].max() <= 1e-4


def test_adapter_shardings_follow_their_projection():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model = lora.attach(init_decoder(cfg), rank=4, alpha=8.0, target_names=LORA_TARGETS)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    tree = sharding.param_shardings(nnx.state(model), mesh)
    spec = {path_str(p): tuple(s.spec) for p, s in jax.tree_util.tree_leaves_with_path(tree)}
    assert spec["layers/self_attn/q_proj/lora/lora_a"] == (None, "fsdp", None)  # [L, D, r]
    assert spec["layers/self_attn/q_proj/lora/lora_b"] == (None, None, "tensor")  # [L, r, H E]
    assert spec["layers/mlp/down_proj/lora/lora_a"] == (None, "tensor", None)  # [L, F, r]
    assert spec["layers/mlp/down_proj/lora/lora_b"] == (None, None, "fsdp")  # [L, r, D]


def _numpy_int8(w, channel_axes):
    """Symmetric int8 by hand: scale = absmax / 127.5 over the non-channel axes (qwix's bound: the top bucket is
    [126.5, 127.5)), values rounded and clipped to [-128, 127]; returns (int8 values, scale, where w / scale is a
    rounding tie: each channel's absmax lands on +-127.5, which float32 rounding may send either way)."""
    w = np.asarray(w, np.float64)
    reduce = tuple(i for i in range(w.ndim) if i not in channel_axes)
    scale = np.abs(w).max(axis=reduce, keepdims=True) / 127.5
    v = w / scale
    ties = np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-3
    return np.clip(np.rint(v), -128, 127).astype(np.int8), scale, ties


# biases, a tied head, a mixture's experts (a scale per layer, expert and output)
@pytest.mark.parametrize("hf_checkpoint", ["llama_bias_tied", "qwen2", "qwen3_moe"], indirect=True)
def test_int8_base_stores_qwix_int8_and_computes_with_its_dequantized_weights(hf_checkpoint):
    """lora.base_dtype="int8": every kernel, the embedding and the head become int8 with a float32 scale per output
    channel (per layer) / embedding row / vocabulary column, equal to a NumPy quantization of the float weights (but
    at rounding ties, one step either way): a byte per weight and a scale per channel; the adapted model's logits
    are those of a float32 model holding the NumPy-dequantized weights; adapters, norms and biases stay float32
    (on the architectures with biases and with a tied head)."""
    import qwix

    name, _, path = hf_checkpoint
    model = adapted(path, ATTENTION if name in MOE_CASES else LORA_TARGETS)
    graphdef, params = nnx.split(model)
    q = lora.cast_base(params, "int8")
    adapters, base = lora.split(q)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))
    by_path = dict(jax.tree_util.tree_leaves_with_path(base, is_leaf=lambda x: isinstance(x, qwix.QArray)))
    float_base = dict(jax.tree_util.tree_leaves_with_path(lora.split(params)[1]))
    pure = nnx.to_pure_dict(params)
    for kp, x in by_path.items():
        name = path_str(kp)
        w = np.asarray(float_base[kp])
        if "norm" in name or name.endswith("bias") or w.ndim < 2:
            assert not isinstance(x, qwix.QArray) and x.dtype == jnp.float32, name
            continue
        assert isinstance(x, qwix.QArray) and x.qvalue.dtype == jnp.int8, name
        axes = (0, w.ndim - 1) if name.startswith("layers") else ((0,) if name == "embed_tokens" else (1,))
        axes = (0, 1, 3) if w.ndim == 4 else axes
        values, scale, ties = _numpy_int8(w, axes)
        np.testing.assert_allclose(np.asarray(x.scale), scale, rtol=1e-6)
        steps = np.abs(np.asarray(x.qvalue, np.int32) - values)
        assert steps.max() <= 1 and (ties | (steps == 0)).all(), name
        assert 4 * x.qvalue.nbytes == w.nbytes and x.scale.size == np.prod([w.shape[i] for i in axes]), name
        node = pure
        for key in name.split("/")[:-1]:
            node = node[key]
        node[name.split("/")[-1]] = jnp.asarray(np.asarray(x.qvalue, np.float64) * scale, jnp.float32)
    oracle_state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(oracle_state, pure)
    oracle = nnx.merge(graphdef, oracle_state)  # the float32 model of the hand-dequantized weights
    ids, mask = padded_batch()
    ours = our_logits(nnx.merge(graphdef, q), ids, mask)
    assert np.abs(ours - our_logits(oracle, ids, mask))[mask.astype(bool)].max() <= 1e-4
    assert np.abs(ours - our_logits(model, ids, mask)).max() > 1e-4  # int8 is not float32


def _data_bytes(path):
    """Bytes of a stage's checkpointed array data (the tensorstore data files under .../d/)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.parent.name == "d")


@pytest.mark.slow
def test_lora_run_trains_the_adapters_alone(tmp_path):
    """A LoRA DPO run (no SFT stage, adapter dropout 0.1): its reference is the initial model (step-0 eval
    log-probs equal a full run's: eval drops nothing), the frozen reference on 8 devices and the cached one on 1
    give the same run (the same masks), the export differs from the initial weights only by a rank-r product in
    the adapted kernels (nothing else moved), and the checkpoints hold the adapters alone."""
    common = ("sft.steps=0", "optim.steps=10", "eval.every=10", "eval.num_prompts=0", "log_every=5")
    lo = ("lora.rank=2", 'lora.targets="q_proj,v_proj,down_proj"', "lora.alpha=8.0", "optim.learning_rate=0.03",
          "lora.dropout=0.1")  # fmt: skip
    runs = {}
    eight = ('reference.mode="frozen"', "mesh.data=4", "mesh.fsdp=2")  # 8 devices: the same dropout masks
    for name, extra in [("full", ()), ("cached", lo), ("frozen", (*lo, *eight))]:
        cfg = tiny_config(*common, *extra, cache_dir=tmp_path / "cache")
        train.train(cfg, tmp_path / name, devices=jax.devices()[: 8 if name == "frozen" else 1])
        runs[name] = read_history(tmp_path / name / "metrics.jsonl")
    first = {k: next(r for r in h if "eval/loss" in r) for k, h in runs.items()}
    for key in ("eval/logps/chosen", "eval/logps/rejected"):
        assert first["cached"][key] == pytest.approx(first["full"][key], rel=1e-6), key
    losses = {k: [r["train/loss"] for r in h if "train/loss" in r] for k, h in runs.items()}
    np.testing.assert_allclose(losses["frozen"], losses["cached"], rtol=1e-5)
    assert losses["cached"][-1] < losses["cached"][0]  # it trains

    # an int8 base (qwix), with an SFT stage whose adapters are folded into it (requantized): trains and exports
    cfg8 = tiny_config(*common, *lo, 'lora.base_dtype="int8"', "sft.steps=3", cache_dir=tmp_path / "cache")
    train.train(cfg8, tmp_path / "int8", devices=jax.devices()[:1])
    int8 = [r["train/loss"] for r in read_history(tmp_path / "int8" / "metrics.jsonl") if "train/loss" in r]
    assert int8[-1] < int8[0] and np.isfinite(int8).all()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "int8" / "hf")
    assert all(p.dtype == torch.float32 for p in exported.parameters())  # the merged model, dequantized

    initial = builders.build_model(cfg, synthetic.build_tokenizer())
    init = nnx.to_pure_dict(nnx.state(initial))
    exported = nnx.to_pure_dict(nnx.state(hf.load_pretrained(tmp_path / "cached" / "hf")[0]))
    flat_init, flat_out = nnx.traversals.flatten_mapping(init), nnx.traversals.flatten_mapping(exported)
    assert flat_init.keys() == flat_out.keys()
    for path, before in flat_init.items():
        after, before = np.asarray(flat_out[path]), np.asarray(before)
        if path[-1] == "kernel" and path[-2] in ("q_proj", "v_proj", "down_proj"):
            diff = (after - before).astype(np.float64)
            assert all(np.linalg.matrix_rank(d, tol=1e-6) == 2 for d in diff), path  # per layer: rank r
        else:
            np.testing.assert_array_equal(after, before, err_msg=str(path))
    adapter = json.loads((tmp_path / "cached" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert adapter["lora_dropout"] == 0.1
    # the checkpoints hold the adapters alone (params and Adam moments), and their array data is a fraction of a
    # full run's (the data files: metadata files of a tiny checkpoint are the same size either way)
    meta = json.loads((tmp_path / "cached" / "dpo" / "checkpoints" / "10" / "state" / "_METADATA").read_text())
    arrays = [k for k in meta["tree_metadata"] if k.endswith("'value')")]  # parameter-shaped leaves
    assert len(arrays) == 3 * 2 * 3 and all("'lora'" in k for k in arrays)  # params, mu, nu of A, B on 3 targets
    assert _data_bytes(tmp_path / "cached" / "dpo") < _data_bytes(tmp_path / "full" / "dpo") / 4


def test_lora_config_errors():
    for field, value, expected in [
        ("rank", -1, "an integer >= 0"),
        ("targets", "q_proj,lm_head", "'all-linear' or comma-separated names"),
        ("base_dtype", "int4", "float32 | bfloat16 | int8"),
        ("dropout", 1.0, "a number in [0, 1)"),
        ("dropout", -0.1, "a number in [0, 1)"),
    ]:
        cfg = tiny_config("lora.rank=4")
        cfg.lora[field] = value
        with pytest.raises(ConfigError, match=f"config.lora.{field}: expected {re.escape(expected)}"):
            validate(cfg)
    with pytest.raises(ConfigError, match=r"config.lora.dropout: expected 0 without adapters"):
        validate(tiny_config("lora.dropout=0.1"))  # rank 0: nothing to drop, so the config is not what trains


def _identity_adapter(name, p):
    """A ``Linear`` whose adapter is the identity (A = B = I, alpha = r: scale 1), so ``y - x W`` is the adapter's
    input as the adapter saw it."""
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                      lora_rank=8, lora_alpha=8.0, lora_targets=LORA_TARGETS, lora_dropout=p)  # fmt: skip
    lin = Linear(8, 8, bias=False, std=0.5, rngs=nnx.Rngs(0), cfg=cfg, name=name)
    lin.lora.lora_a[...] = jnp.eye(8)
    lin.lora.lora_b[...] = jnp.eye(8)
    return lin


def test_lora_dropout_drops_each_adapters_input_as_peft_does():
    """PEFT's ``lora_B(lora_A(dropout(x))) * scaling``: each input entry of the adapter is zeroed with probability
    p and the rest scaled by 1 / (1 - p) (checked entry by entry against x); x W is never dropped; no key = no
    dropout; every projection draws its own mask from the layer's key."""
    p = 0.25
    x = jax.random.normal(jax.random.key(0), (64, 32, 8))
    q = _identity_adapter("q_proj", p)
    base = np.asarray(x @ q.kernel[...])
    np.testing.assert_allclose(np.asarray(q(x)) - base, np.asarray(x), atol=1e-5)  # no key: no dropout
    key = jax.random.split(jax.random.key(1), 64 * 32).reshape(64, 32)  # a key per token
    seen = np.asarray(q(x, key)) - base
    dropped = np.abs(seen) < 1e-6
    n = dropped.size
    assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)  # binomial: 4 s.e.
    np.testing.assert_allclose(seen[~dropped], np.asarray(x)[~dropped] / (1 - p), rtol=1e-4, atol=1e-5)
    again = np.abs(np.asarray(q(x, key)) - base) < 1e-6
    np.testing.assert_array_equal(again, dropped)  # a function of the key
    k_mask = np.abs(np.asarray(_identity_adapter("k_proj", p)(x, key)) - base) < 1e-6
    other = np.abs(np.asarray(q(x, jax.random.split(jax.random.key(2), 64 * 32).reshape(64, 32))) - base) < 1e-6
    for mask in (k_mask, other):  # independent masks agree on p^2 + (1 - p)^2 of the entries, not all
        assert abs((mask == dropped).mean() - (p**2 + (1 - p) ** 2)) < 4 * np.sqrt(0.5 / n)


@pytest.mark.slow
def test_lora_dropout_acts_in_training_steps_only(step_setup):  # noqa: F811 (test_train's fixture)
    """In a model: no key, or adapters off, leave the function unchanged; in the train step the masks are a
    function of (seed, step) (a resumed step draws the same ones) and change from step to step."""
    graphdef, params, batch = step_setup
    tiny = nnx.merge(graphdef, params)
    ids = jnp.asarray(batch.tokens_GxKxT.reshape(-1, batch.tokens_GxKxT.shape[-1]))
    models, losses = {}, {}
    for p in (0.0, 0.5):
        g, state_params = nnx.split(lora.attach(tiny, rank=4, alpha=8.0, target_names=LORA_TARGETS, dropout=p))
        adapters, base = lora.split(state_params)
        keys = list(jax.random.split(jax.random.key(5), len(jax.tree.leaves(adapters))))
        noise = jax.tree.unflatten(jax.tree.structure(adapters), keys)  # B random, as after training: they act
        adapters = jax.tree.map(lambda a, k: a + 0.3 * jax.random.normal(k, a.shape), adapters, noise)
        models[p] = nnx.merge(g, lora.compose(adapters, base))
        off = nnx.merge(g, lora.compose(lora.off(adapters), base))
        tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-3, warmup_steps=0), 10)
        sc = step.StepConfig("dpo", frozen_reference=True, lora=True)
        fn = jax.jit(functools.partial(step.train_step, graphdef=g, tx=tx, sc=sc))
        for seed, at in ((0, 0), (0, 0), (0, 1), (1, 0)) if p else ():
            state = init_state(adapters, tx, builders.default_hparams(), seed).replace(step=jnp.int32(at))
            losses.setdefault((p, seed, at), []).append(float(fn(state, batch, base)[1]["loss"]))

    def run(m, k=None):
        keys = None if k is None else jax.random.split(k, ids.size).reshape(ids.shape)
        return np.asarray(m(ids, dropout_keys_BxT=keys).logits_BxTxV)

    key = jax.random.key(3)
    np.testing.assert_array_equal(run(models[0.5]), run(models[0.0]))  # no key: eval, sampling, the reference
    np.testing.assert_array_equal(run(models[0.0], key), run(models[0.0]))  # p = 0: no dropout
    assert np.abs(run(models[0.5], key) - run(models[0.0])).max() > 1e-3  # a training step's key: dropout acts
    assert np.abs(run(models[0.5], key) - run(models[0.5], jax.random.key(4))).max() > 1e-3
    np.testing.assert_array_equal(run(off, key), run(off))  # the base path is never dropped (adapters off)
    assert losses[0.5, 0, 0][0] == losses[0.5, 0, 0][1]  # the same seed and step: the same masks
    assert len({losses[0.5, 0, 0][0], losses[0.5, 0, 1][0], losses[0.5, 1, 0][0]}) == 3  # new step or seed: new masks
