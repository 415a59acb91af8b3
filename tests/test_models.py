"""Decoder against transformers (independent oracle), and its own options against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import padded_batch
from flax import nnx

from dpo_jax.core import logprobs as lp
from dpo_jax.infra import hf
from dpo_jax.infra import sharding as sh
from dpo_jax.models import ModelConfig, init_decoder


def hf_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


def test_logits_match_transformers_on_padded_batches(hf_checkpoint):
    name, model, path = hf_checkpoint
    ours, _ = hf.load_pretrained(path)
    assert ours.config.architecture == type(model).__name__
    ids, mask = padded_batch()
    got = np.asarray(ours(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)).logits_BxTxV)
    expected = hf_logits(model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(got - expected)[valid].max() <= 1e-4, name


TINY = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=2)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots")])
def test_layer_options_do_not_change_the_function(options):
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 9)))
    base = init_decoder(TINY)
    other = init_decoder(TINY.replace(**options))
    np.testing.assert_allclose(other(ids).logits_BxTxV, base(ids).logits_BxTxV, atol=1e-5)

    def loss(state, graphdef):
        return jnp.sum(nnx.merge(graphdef, state)(ids).logits_BxTxV ** 2)

    g_base = jax.grad(loss)(nnx.state(base), nnx.graphdef(base))
    g_other = jax.grad(loss)(nnx.state(other), nnx.graphdef(other))
    for a, b in zip(jax.tree.leaves(g_base), jax.tree.leaves(g_other), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_each_remat_policy_keeps_what_it_says():
    """XLA's compiled temporaries of a gradient: ``none`` keeps every activation, ``dots`` / ``dots_no_batch`` the
    matmul outputs (the projections' too, though their matmul sits inside a custom VJP), ``full`` only each layer's
    input; so none > dots > full (before the fix, the dots policies saved what ``full`` saves)."""
    toks = jnp.zeros((2, 256), jnp.int32)
    temp = {}
    for remat in ("none", "dots", "dots_no_batch", "full"):
        graphdef, params = nnx.split(init_decoder(TINY.replace(hidden_size=64, intermediate_size=256, remat=remat)))

        def f(p, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, p)(toks, return_logits=False).hidden_BxTxD ** 2)

        temp[remat] = jax.jit(jax.grad(f)).lower(params).compile().memory_analysis().temp_size_in_bytes
    mlp_outputs = 2 * 256 * 256 * 4 * TINY.num_layers  # one [B, T, F] float32 activation per layer
    assert temp["none"] > temp["dots"] + mlp_outputs, temp
    assert temp["dots"] > temp["full"] + 2 * mlp_outputs, temp  # gate and up at least
    assert temp["dots_no_batch"] > temp["full"] + 2 * mlp_outputs, temp


def test_packed_segments_equal_separate_sequences():
    model = init_decoder(TINY)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 61, 5), rng.integers(0, 61, 4)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    segments = jnp.asarray([[1] * 5 + [2] * 4])
    out = model(packed, segment_ids_BxT=segments).logits_BxTxV[0]
    np.testing.assert_allclose(out[:5], model(jnp.asarray(a[None])).logits_BxTxV[0], atol=1e-5)
    np.testing.assert_allclose(out[5:], model(jnp.asarray(b[None])).logits_BxTxV[0], atol=1e-5)


def test_hidden_states_with_chunked_logprobs_equal_logits_path():
    model = init_decoder(TINY)
    ids, mask = padded_batch(3, 10, vocab=61, seed=3)
    targets, tmask = lp.next_token_targets(jnp.asarray(ids), jnp.asarray(mask))
    out = model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask))
    hidden_only = model(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask), return_logits=False)
    assert hidden_only.logits_BxTxV is None
    naive, _ = lp.sequence_logprobs(out.logits_BxTxV, targets, tmask)
    chunked, _ = lp.chunked_sequence_logprobs(
        hidden_only.hidden_BxTxD, model.lm_head_weight(), targets, tmask, token_chunk=8, vocab_chunk=16
    )
    np.testing.assert_allclose(chunked, naive, rtol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(hf_checkpoint):
    name, model, path = hf_checkpoint
    ours32, _ = hf.load_pretrained(path)
    ours16, _ = hf.load_pretrained(path, dtype="bfloat16")
    ids, mask = padded_batch()
    out32 = ours32(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)).logits_BxTxV
    out16 = ours16(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask)).logits_BxTxV
    assert out16.dtype == jnp.bfloat16
    assert jax.tree.leaves(nnx.state(ours16))[0].dtype == jnp.float32  # parameters stay float32
    valid = mask.astype(bool)
    scale = float(jnp.abs(out32).max())
    assert float(jnp.abs(out16.astype(jnp.float32) - out32)[valid].max()) < 0.05 * scale


def test_sharded_forward_on_8_devices_equals_one_device():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    cfg = TINY.replace(qkv_bias=True, num_heads=4, num_kv_heads=2)
    model = init_decoder(cfg)
    graphdef, state = nnx.split(model)
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    state_sharded = jax.device_put(state, sh.param_shardings(state, mesh))
    # Something is really split: the q kernel is sharded over both fsdp and tensor.
    q_kernel = state_sharded["layers"]["self_attn"]["q_proj"]["kernel"][...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q_kernel.addressable_shards[0].data.shape == (3, 16, 16)
    ids, mask = padded_batch(4, 9, vocab=61, seed=4)
    forward = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, attention_mask_BxT=m).logits_BxTxV)
    single = forward(state, jnp.asarray(ids), jnp.asarray(mask))
    batch = sh.batch_sharding(mesh)
    multi = forward(state_sharded, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch))
    assert len(multi.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(multi), np.asarray(single), atol=1e-5)


def test_pure_forward_vmaps_over_several_policies():
    graphdef, state = nnx.split(init_decoder(TINY))
    states = jax.tree.map(lambda *xs: jnp.stack(xs), state, nnx.state(init_decoder(TINY, seed=7)))
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 6)))
    stacked = jax.vmap(lambda s: nnx.merge(graphdef, s)(ids).logits_BxTxV)(states)
    np.testing.assert_allclose(stacked[0], nnx.merge(graphdef, state)(ids).logits_BxTxV, atol=1e-6)
    assert not np.allclose(stacked[0], stacked[1])


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        TINY.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        TINY.replace(remat="everything")


def test_dense_and_swiglu_gradients_equal_torch():
    """The hand-written backwards of the projections (x @ w) and the MLP activation (silu(gate) * up) against
    torch's autograd (float64)."""
    from dpo_jax.models.llama import dense, swiglu

    rng = np.random.default_rng(0)
    x, w, g = rng.normal(size=(3, 5, 4)), rng.normal(size=(4, 6)), rng.normal(size=(3, 5, 6))
    with jax.enable_x64(True):
        y, vjp = jax.vjp(dense, jnp.asarray(x), jnp.asarray(w))
        dx, dw = vjp(jnp.asarray(g))
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    (tx @ tw).backward(torch.tensor(g))
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dw), tw.grad.numpy(), rtol=1e-10, atol=1e-12)

    gate, up, g = (rng.normal(size=(3, 5, 7)) * 4 for _ in range(3))
    with jax.enable_x64(True):
        y, vjp = jax.vjp(swiglu, jnp.asarray(gate), jnp.asarray(up))
        d_gate, d_up = vjp(jnp.asarray(g))
    tg, tu = (torch.tensor(x, requires_grad=True) for x in (gate, up))
    ty = torch.nn.functional.silu(tg) * tu
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(d_gate), tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(d_up), tu.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_a_tiled_mlp_computes_the_same_values_and_gradients_in_less_memory(activation):
    """``model.mlp_chunk``: the MLP over the row in chunks (the last one padded), each recomputed in the backward.
    Hidden states and the gradients of every parameter (LoRA adapters with dropout, whose per-token masks must
    follow their tokens into the chunks) equal the whole-row MLP's; XLA's compiled temporaries of a long row's
    gradient (full remat) are smaller by at least the [B, T, F] activations the chunks no longer hold."""
    from dpo_jax.models import lora
    from dpo_jax.models.config import LORA_TARGETS

    def model(chunk, dropout=0.3):
        cfg = TINY.replace(mlp_activation=activation, mlp_chunk=chunk)
        return lora.attach(init_decoder(cfg, seed=2), rank=4, alpha=8.0, target_names=LORA_TARGETS, dropout=dropout)

    toks = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 23)), jnp.int32)
    keys = jax.random.split(jax.random.key(1), 46).reshape(2, 23)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 23, TINY.hidden_size)), jnp.float32)
    graphdef, params = nnx.split(model(0))
    adapters, base = lora.split(params)
    params = lora.compose(jax.tree.map(lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), adapters),
                          base)  # fmt: skip

    def f(p, graphdef):
        out = nnx.merge(graphdef, p)(toks, dropout_keys_BxT=keys, return_logits=False).hidden_BxTxD
        return jnp.sum(out * weights), out

    (_, want), want_grads = jax.value_and_grad(f, has_aux=True)(params, graphdef)
    for chunk in (5, 8):  # 23 tokens: 5 chunks with 2 padded, 3 with 1
        (_, got), grads = jax.value_and_grad(f, has_aux=True)(params, nnx.graphdef(model(chunk)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):  # float32 sums over
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))  # tokens, reordered
    no_dropout = f(params, nnx.graphdef(model(0, dropout=0.0)))[1]
    assert np.abs(no_dropout - want).max() > 1e-3  # the masks act, so the chunks had to carry them

    if activation != "silu":
        return  # the memory below is the same for either activation: compiled once
    b, t, width = 2, 1024, 4096  # the MLP's activations outweigh the rest (attention is blockwise here)
    long_toks = jnp.zeros((b, t), jnp.int32)
    temp = {}
    for chunk in (0, 128):
        g, p = nnx.split(init_decoder(TINY.replace(intermediate_size=width, remat="full", mlp_chunk=chunk)))

        def h(p, g=g):
            return jnp.sum(nnx.merge(g, p)(long_toks, return_logits=False).hidden_BxTxD ** 2)

        temp[chunk] = jax.jit(jax.grad(h)).lower(p).compile().memory_analysis().temp_size_in_bytes
    assert temp[128] + 2 * b * t * width * 4 * 7 // 8 <= temp[0], temp  # gate and up, at least, a chunk at a time
