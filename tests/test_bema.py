"""BEMA as DPO's reference (reference.bema): the update rule against TRL's own BEMACallback on the same parameter
sequences, the step reading the reference it keeps, and a run that resumes from a checkpoint to the same weights."""

import functools
import json
import shutil
import types

import jax
import numpy as np
import pytest
from helpers import tiny_config
from safetensors.numpy import load_file

from dpo_jax.config import ConfigError, validate
from dpo_jax.core import bema, optim, step
from dpo_jax.core.state import init_state
from dpo_jax.training import builders, train

SETTINGS = [
    dict(update_freq=1, update_after=0, ref_model_update_freq=1, ref_model_update_after=0),  # every step
    dict(update_freq=2, update_after=3, ref_model_update_freq=3, ref_model_update_after=2, ema_power=0.7,
         bias_power=0.4, lag=3.0, multiplier=0.5, min_ema_multiplier=0.3),  # burn-in, unequal cadences, EMA floor
]  # fmt: skip


def _hparams(**bema_args):
    cfg = tiny_config()
    for k, v in bema_args.items():
        cfg.reference[f"bema_{k}"] = v
    return builders.hparams(cfg)


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_update_is_trls_bema_callback_on_the_same_parameter_sequence(settings):
    """TRL's BEMACallback (trl.experimental.bema_for_ref_model, update_ref_model=True) run on a tiny transformers
    model whose parameters we set to a random walk; ours on the same walk: its BEMA weights and the reference."""
    import torch
    import transformers
    from trl.experimental.bema_for_ref_model.callback import BEMACallback

    config = transformers.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    torch.manual_seed(0)
    model, ref_model = transformers.LlamaForCausalLM(config), transformers.LlamaForCausalLM(config)
    ref_model.load_state_dict(model.state_dict())
    callback = BEMACallback(update_ref_model=True, **settings)
    callback.on_train_begin(None, None, None, model=model)

    theta = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    ours, reference, hp = bema.Bema.init(theta), dict(theta), _hparams(**settings)
    update = jax.jit(bema.update)
    rng = np.random.default_rng(1)
    for t in range(1, 13):
        theta = {n: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for n, v in theta.items()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.from_numpy(theta[n]))
        state = types.SimpleNamespace(global_step=t, is_world_process_zero=True)
        callback.on_step_end(None, state, None, model=model, ref_model=ref_model)
        ours, reference = update(ours, reference, theta, np.int32(t), hp)
        theirs = dict(callback.running_model.named_parameters())
        theirs_ref = dict(ref_model.named_parameters())
        for n in theta:
            np.testing.assert_allclose(np.asarray(ours.weights[n]), theirs[n].detach().numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(reference[n]), theirs_ref[n].detach().numpy(), rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(np.asarray(reference[n]), theta[n]) for n in theta]
    assert all(moved)  # the reference is neither the start nor the policy: the rule did something to check


def test_the_step_keeps_the_buffers_and_reads_the_reference_they_make(step_setup):
    graphdef, params, batch = step_setup
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-2, warmup_steps=0), 10)
    hp = _hparams(update_freq=1, ref_model_update_freq=2)
    sc = step.StepConfig("dpo", frozen_reference=True, bema=True)
    fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc))
    state = init_state(params, tx, hp, 0, reference=params, bema=True)
    expect_bema, expect_ref = bema.Bema.init(params), params
    for t in (1, 2):
        state, _ = fn(state, batch, None)
        expect_bema, expect_ref = bema.update(expect_bema, expect_ref, state.params, t, hp)
    for got, want in zip(jax.tree.leaves((state.bema, state.reference)), jax.tree.leaves((expect_bema, expect_ref)),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    _, moving = fn(state, batch, None)  # the next step's loss is that of a frozen reference equal to the BEMA weights
    frozen_fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx,
                                          sc=step.StepConfig("dpo", frozen_reference=True)))  # fmt: skip
    _, frozen = frozen_fn(state.replace(reference=None, bema=None), batch, state.reference)
    assert float(moving["loss"]) == pytest.approx(float(frozen["loss"]), rel=1e-6)
    _, initial = frozen_fn(state.replace(reference=None, bema=None), batch, params)
    assert float(moving["loss"]) != pytest.approx(float(initial["loss"]), rel=1e-6)


@pytest.mark.parametrize(
    "extra",
    [("reference.bema=True",), ('reference.mode="frozen"', "reference.bema=True", "reference.sync=True"),
     ('reference.mode="frozen"', "reference.bema=True", "lora.rank=4")],
)  # fmt: skip
def test_bema_needs_a_frozen_reference_and_no_other_moving_one(extra):
    with pytest.raises(ConfigError, match=r"config\.reference\.bema: expected False with"):
        validate(tiny_config(*extra), num_devices=8)


@pytest.mark.slow
def test_a_bema_run_resumed_from_a_checkpoint_ends_where_it_would_have(tmp_path):
    """reference.bema through the run: 8 steps straight, and the same run stopped after its step-4 checkpoint (what
    survives a kill -9) and rerun: the same exported weights, bit for bit (the buffers are in the checkpoint)."""
    extra = ('reference.mode="frozen"', "reference.bema=True", "reference.bema_update_freq=2",
             "reference.bema_ref_model_update_freq=2", "optim.steps=8", "checkpoint.every=4", "eval.every=8",
             "eval.num_prompts=0", "sft.steps=0")  # fmt: skip
    train.train(tiny_config(*extra), tmp_path / "straight", devices=jax.devices()[:1])
    run = tmp_path / "resumed"
    train.train(tiny_config(*extra), run, devices=jax.devices()[:1])
    for gone in ("summary.json", "hf", "dpo/checkpoints/8"):  # back to the moment after step 4's checkpoint
        shutil.rmtree(run / gone) if (run / gone).is_dir() else (run / gone).unlink()
    summary = train.train(tiny_config(*extra), run, devices=jax.devices()[:1])
    assert json.loads((run / "summary.json").read_text())["eval/loss"] == summary["eval/loss"]
    a, b = load_file(tmp_path / "straight/hf/model.safetensors"), load_file(run / "hf/model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    straight = json.loads((tmp_path / "straight/summary.json").read_text())
    assert straight["eval/loss"] == summary["eval/loss"]
