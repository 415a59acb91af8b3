"""Mixtures of experts: the load-balancing loss equals transformers', grouped experts equal dense ones (values and
gradients), the router drift equals a NumPy KL of transformers' router logits, a frozen router does not move."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model, padded_batch

from dpo_jax import hf
from dpo_jax.models import moe


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def pair(request, tmp_path_factory):
    model = make_hf_model(request.param, seed=2, scale=0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def torch_outputs(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions), output_router_logits=True)  # fmt: skip


def test_aux_loss_equals_transformers(pair):
    theirs, path = pair
    ours, _ = hf.load_pretrained(path)
    ids, mask = padded_batch()
    out = ours(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask), return_logits=False)
    expected = float(torch_outputs(theirs, ids, mask).aux_loss)
    np.testing.assert_allclose(float(moe.aux_loss(out.router)), expected, rtol=1e-5)
    assert expected > 1.0  # not the trivial value of a constant router


def test_router_drift_is_the_kl_of_transformers_router_distributions(pair, tmp_path):
    theirs, path = pair
    policy, _ = hf.load_pretrained(path)
    other = make_hf_model(path.name.rstrip("0123456789"), seed=3, scale=0.5)  # another router
    other.save_pretrained(tmp_path)
    reference, _ = hf.load_pretrained(tmp_path)
    ids, mask = padded_batch()
    run = lambda m: m(jnp.asarray(ids), attention_mask_BxT=jnp.asarray(mask), router_logits=True).router  # noqa: E731
    kl_sum, tokens = moe.routing_kl(run(policy)["logits"], run(reference)["logits"], jnp.asarray(mask))
    p = [torch.log_softmax(x.double(), -1).numpy() for x in torch_outputs(theirs, ids, mask).router_logits]
    q = [torch.log_softmax(x.double(), -1).numpy() for x in torch_outputs(other, ids, mask).router_logits]
    per_token = np.mean([np.sum(np.exp(a) * (a - b), -1) for a, b in zip(p, q, strict=True)], axis=0)
    expected = per_token.reshape(ids.shape)[mask.astype(bool)].sum()
    np.testing.assert_allclose(float(kl_sum), expected, rtol=1e-4)
    assert float(tokens) == mask.sum() and expected > 1e-3
    same, _ = moe.routing_kl(run(policy)["logits"], run(policy)["logits"], jnp.asarray(mask))
    assert abs(float(same)) < 1e-6


@pytest.mark.parametrize("impl", ["grouped", "blocked"])
def test_grouped_experts_equal_dense_values_and_gradients(impl):
    k = jax.random.split(jax.random.key(0), 5)
    n, d, f, e, top = 37, 8, 12, 5, 2
    x = jax.random.normal(k[0], (n, d))
    weights = [
        jax.random.normal(k[i], s) * 0.3 for i, s in zip((1, 2, 3), ((e, d, f), (e, d, f), (e, f, d)), strict=True)
    ]
    logits = jax.random.normal(k[4], (n, e))

    def run(experts, x, logits, *w):
        _, top_w, top_i = moe.route(logits, top, True)
        return jnp.sum(experts(x, top_w, top_i, *w) ** 2)

    # blocks of 8 rows: several per expert, padding in most, unused blocks at the end
    sparse = moe.grouped_experts if impl == "grouped" else functools.partial(moe.blocked_experts, block=8)

    for argnum in range(5):
        g = jax.grad(run, argnums=argnum + 1)(sparse, x, logits, *weights)
        r = jax.grad(run, argnums=argnum + 1)(moe.dense_experts, x, logits, *weights)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(sparse, x, logits, *weights),
                               run(moe.dense_experts, x, logits, *weights), rtol=1e-5)  # fmt: skip
    # a population's vmap batches the policy's experts but not the shared inputs (the eval's case)
    stacked = [jnp.stack([w, 2 * w]) for w in weights]
    grouped = jax.vmap(lambda *w: run(sparse, x, logits, *w))(*stacked)
    dense = jax.vmap(lambda *w: run(moe.dense_experts, x, logits, *w))(*stacked)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), rtol=1e-5)


def test_a_frozen_router_keeps_the_references_routing_and_the_aux_loss_trains_it(tmp_path):
    """A DPO step of a new Qwen3-MoE (the configs/moe.py model): with ``moe.freeze_router`` the routers do not move
    (the experts do); without it they do, and the loss includes coef * aux_loss (a higher coef, a higher loss)."""
    from flax import nnx
    from test_train import tiny_config

    from dpo_jax import builders, step
    from dpo_jax.data import Layout, PreferenceLoader, TokenizeConfig, load_examples, synthetic, tokenize_examples
    from dpo_jax.state import HParams, init_state

    paths = synthetic.write_task(tmp_path, synthetic.TaskConfig(n_sft=4, n_train=16, n_eval=4))
    tok = synthetic.build_tokenizer()
    pairs, _ = tokenize_examples(
        load_examples(paths["train"])[0], tok, TokenizeConfig(max_length=16, max_prompt_length=8)
    )
    cfg = tiny_config(
        'model.architecture="Qwen3MoeForCausalLM"', "model.num_experts=4", "model.expert_intermediate_size=16"
    )
    graphdef, params = nnx.split(builders.build_model(cfg, tok))
    batch = jax.tree.map(jnp.asarray, PreferenceLoader(pairs[:8], 8, layout=Layout()).batch(0))
    ref_logps = jnp.zeros(batch.index_GxP.shape + (2,))
    tx = step.make_optimizer(step.optim_section(learning_rate=1e-2, warmup_steps=0), 10)
    state = init_state(params, tx, HParams.create(), 0)
    router = lambda p: np.asarray(p["layers"]["mlp"]["router"][...])  # noqa: E731
    experts = lambda p: np.asarray(p["layers"]["mlp"]["gate_proj"][...])  # noqa: E731

    def run(**kw):
        sc = step.StepConfig("dpo", **kw)
        fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc))
        return fn(state, batch.replace(ref_logps_GxPx2=ref_logps), None)

    frozen, m = run(aux_loss_coef=0.01, freeze_router=True)
    np.testing.assert_array_equal(router(frozen.params), router(params))
    assert np.abs(experts(frozen.params) - experts(params)).max() > 1e-4
    free, m_heavy = run(aux_loss_coef=1.0)  # the same starting parameters: the losses differ by 0.99 aux_loss
    assert np.abs(router(free.params) - router(params)).max() > 1e-4 and m["aux_loss"] > 1.0
    np.testing.assert_allclose(m_heavy["loss"] - m["loss"], 0.99 * m["aux_loss"], rtol=1e-4)


def test_experts_split_over_the_expert_axis_give_the_one_device_forward_and_gradients():
    """A Mixtral-style model on 8 simulated devices, mesh (data 2, expert 2, tensor 2): each device holds half the
    experts (the partition rules), the batch is split over data and expert, and the loss and its gradients equal
    one device's."""
    from flax import nnx

    from dpo_jax import sharding as sh
    from dpo_jax.models import ModelConfig, init_decoder

    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    cfg = ModelConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      architecture="MixtralForCausalLM", num_experts=4, experts_per_token=2,
                      expert_intermediate_size=8, initializer_range=0.3)  # fmt: skip
    graphdef, state = nnx.split(init_decoder(cfg, seed=1))
    mesh = sh.make_mesh(data=2, tensor=2, expert=2)
    sharded = jax.device_put(state, sh.param_shardings(state, mesh))
    gate = sharded["layers"]["mlp"]["gate_proj"][...]
    assert gate.sharding.spec[1] == "expert" and gate.addressable_shards[0].data.shape[1] == 2
    ids, mask = padded_batch(4, 9, vocab=61, seed=4)

    def loss(s, x, m):
        out = nnx.merge(graphdef, s)(x, attention_mask_BxT=m)
        return jnp.mean(out.logits_BxTxV**2) + moe.aux_loss(out.router)

    fn = jax.jit(jax.value_and_grad(loss))
    single, g1 = fn(state, jnp.asarray(ids), jnp.asarray(mask))
    batch = sh.batch_sharding(mesh)
    multi, g8 = fn(sharded, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch))
    np.testing.assert_allclose(float(multi), float(single), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
