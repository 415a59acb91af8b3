"""Mixtures of experts: the load-balancing loss equals transformers', grouped experts equal dense ones (values and
gradients), the router drift equals a NumPy KL of transformers' router logits, a frozen router does not move."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model, padded_batch

from dpo_jax.core import optim
from dpo_jax.infra import hf
from dpo_jax.models import moe
from dpo_jax.training import builders


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
    from helpers import tiny_config

    from dpo_jax.core import step
    from dpo_jax.core.state import init_state
    from dpo_jax.data import Layout, PreferenceLoader, TokenizeConfig, load_examples, synthetic, tokenize_examples

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
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-2, warmup_steps=0), 10)
    state = init_state(params, tx, builders.default_hparams(), 0)
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

    from dpo_jax.infra import sharding as sh
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


def _moe_run(tmp_path, name, *overrides):
    """configs/moe.py:runlocal as ``dpo-jax train`` runs it, cut to 2 DPO steps from the initial model (no SFT);
    its metrics by step, and its exported weights."""
    from helpers import ROOT, tiny_config
    from safetensors.numpy import load_file

    from dpo_jax.config import load_config_file
    from dpo_jax.training import train
    from dpo_jax.training.outputs import read_history

    base = load_config_file(str(ROOT / "configs/moe.py:runlocal"))
    cfg = tiny_config(
        "sft.steps=0", "optim.steps=2", "eval.every=2", "log_every=1", "checkpoint.every=2",
        "synthetic.n_sft=32", "synthetic.n_train=32", "synthetic.n_eval=16", "eval.num_prompts=0", *overrides,
    )  # fmt: skip
    for key in ("architecture", "num_experts", "experts_per_token", "expert_intermediate_size"):
        cfg.model[key] = base.model[key]
    for key, value in base.moe.items():
        cfg.moe[key] = cfg.moe[key] if any(o.startswith(f"moe.{key}=") for o in overrides) else value
    train.train(cfg, tmp_path / name, devices=jax.devices()[:1])
    history = {row["step"]: row for row in read_history(tmp_path / name / "metrics.jsonl") if "train/loss" in row}
    return cfg, history, load_file(tmp_path / name / "hf" / "model.safetensors")


@pytest.mark.slow
def test_moe_switches_reach_the_run(tmp_path):
    """Through the run (configs/moe.py, DPO from the initial model, its reference): the first DPO step's objective
    is log 2 + ``moe.aux_loss_coef`` x the logged load-balancing loss, for 0 and 1; with ``moe.freeze_router`` the
    exported routers are the initial ones to the bit and the experts moved (once: every value ran aux 0 and
    trained routers, bit-identical to the default)."""
    from safetensors.numpy import load_file

    from dpo_jax.data import synthetic
    from dpo_jax.infra import hf

    _, none, w_none = _moe_run(tmp_path, "aux0", "moe.aux_loss_coef=0.0")
    cfg, frozen, w_frozen = _moe_run(tmp_path, "frozen", "moe.aux_loss_coef=1.0", "moe.freeze_router=True")
    routers = [k for k in w_none if k.endswith("mlp.gate.weight")]
    assert routers and all(w_none[k].shape[0] == cfg.model.num_experts for k in routers)
    # The first DPO step's objective: log 2 (the policy is its reference) + coef * the load-balancing loss
    for rows, coef in ((none, 0.0), (frozen, 1.0)):
        first = rows[min(rows)]
        assert first["train/aux_loss"] > 0.1
        np.testing.assert_allclose(first["train/loss"] - coef * first["train/aux_loss"], np.log(2), atol=1e-5)
    hf.save_pretrained(builders.build_model(cfg, synthetic.build_tokenizer()), tmp_path / "init")
    w_init = load_file(tmp_path / "init" / "model.safetensors")
    for k in routers:
        np.testing.assert_array_equal(w_frozen[k], w_init[k])
        assert np.abs(w_none[k] - w_init[k]).max() > 1e-6  # a free router moves (a frozen one: not a bit)
    experts = [k for k in w_init if ".experts." in k or "expert" in k and k not in routers]
    assert experts and max(np.abs(w_frozen[k] - w_init[k]).max() for k in experts) > 1e-6


def test_moe_fields_on_a_dense_checkpoint_are_refused(tmp_path):
    """A dense checkpoint reads no ``moe.*`` field: setting one is a one-line error before anything compiles."""
    from helpers import tiny_config

    from dpo_jax.config import ConfigError
    from dpo_jax.errors import Notes
    from dpo_jax.infra import sharding

    make_hf_model("llama3").save_pretrained(tmp_path)
    cfg = tiny_config('task="files"', 'model.init="hf"', f'model.hf_path="{tmp_path}"', "moe.freeze_router=True")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"moe\.freeze_router: set \(True\) but the model is dense \(the checkp"):
        builders.build_policy(cfg, None, mesh, Notes())
    cfg.moe.freeze_router = False  # nothing set: the checkpoint loads
    assert builders.build_policy(cfg, None, mesh, Notes()).config.num_experts == 0
