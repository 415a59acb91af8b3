"""Trainer: end-to-end run, config errors, resume after SIGKILL, SIGTERM, NaN stop, devices and processes."""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import COMMON
from flax import nnx
from helpers import ROOT, cli, tiny_config

from dpo_jax.config import load_config_file
from dpo_jax.core import optim, step
from dpo_jax.core.state import init_state
from dpo_jax.data import (
    TokenizeConfig,
    load_examples,
    synthetic,
    tokenize_examples,
)
from dpo_jax.errors import NonFiniteLoss, Notes
from dpo_jax.infra import sharding
from dpo_jax.infra.hf import load_pretrained
from dpo_jax.training import builders, evaluate, inputs, outputs, train
from dpo_jax.training.outputs import read_history


@pytest.mark.slow
def test_end_to_end_outputs(tmp_path):
    cfg = tiny_config("wandb.enabled=True", cache_dir=tmp_path / "cache")
    summary = train.train(cfg, tmp_path / "run", devices=jax.devices()[:1])
    run = tmp_path / "run"
    history = read_history(run / "metrics.jsonl")
    keys = set().union(*history)
    for key in (
        "train/loss",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/grad_norm",
        "train/learning_rate",
        "train/tokens_per_s",
        "train/pairs_per_s",
        "dpo/mfu",
        "eval/kl_token",
        "eval/kl_sampled",
        "eval/kl_sampled_se",
        "eval/reward",
        "sft/loss",
    ):
        assert key in keys, key
    assert all(np.isfinite(r["train/loss"]) for r in history if "train/loss" in r)
    assert (run / "plots.png").stat().st_size > 10_000 and (run / "summary.md").exists()
    assert summary["reference/cache_hit"] is False and summary["reference/mode"] == "cached"
    assert 0 <= summary["reference/reward"] <= 1 and np.isfinite(summary["eval/kl_sampled"])
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(offline[0].rglob("*.wandb"))
    assert sorted(p.name for p in (run / "dpo/checkpoints").iterdir() if p.name.isdigit())[-1] == "20"
    model, tok = load_pretrained(run / "hf")  # the export loads back (transformers parity is tested in test_hf)
    assert tok is not None and model.config.vocab_size == tok.vocab_size
    import transformers

    gen = transformers.GenerationConfig.from_pretrained(run / "hf")
    assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.bos_token_id, 0)
    # Step 0 is the reference itself: eval loss log 2 (DPO's loss at h = 0) and an exact token KL of 0.
    first = next(r for r in history if "eval/loss" in r)
    assert first["step"] == cfg.sft.steps and first["eval/loss"] == pytest.approx(np.log(2), rel=1e-5)
    assert first["eval/kl_token"] == pytest.approx(0.0, abs=1e-6)
    # every pair ties there (accuracy counts chosen strictly above rejected); DPO steps count from 0 there
    assert first["eval/rewards/ties"] == 1.0 and first["eval/rewards/accuracies"] == 0.0 and first["dpo/step"] == 0
    assert [r["dpo/step"] for r in history if "eval/loss" in r] == [0, 10, 20]
    assert summary["dpo/programs"] >= 1 and summary["dpo/compile_s"] > 0 and summary["sft/steps"] == cfg.sft.steps
    import matplotlib.image

    height, width = matplotlib.image.imread(run / "plots.png").shape[:2]
    assert width < 3 * height  # panels in a grid, three to a row (a row of six was 7.4 times wider than high)
    titles = [t for t, _ in outputs.plot_panels(history)]
    missing = {t for t, _ in outputs.PLOTS} - set(titles)  # a dense model, no PBT: every panel but those
    assert "true reward of samples" in titles and missing == {t for t, _ in outputs.PLOTS if "load" in t or "PBT" in t}
    no_reward = [{k: v for k, v in r.items() if not k.startswith("eval/reward")} for r in history]
    assert "true reward of samples" not in [t for t, _ in outputs.plot_panels(no_reward)]  # a files task
    # Healthy at this learning rate: the chosen completions gain likelihood, the diagnostic stays silent.
    assert history[-1]["eval/logratio/chosen_per_token"] > 0
    assert not any(evaluate.FALLING_CHOSEN in r for r in history) and "warnings" not in summary
    # (Reuse of the reference cache by a sibling run is checked in test_sweep.)


@pytest.mark.slow
def test_cli_rejects_bad_override_before_compiling(tmp_path):
    out = cli(tmp_path / "bad", "dpo.beta=-0.5")
    assert out.returncode == 2 and "config.dpo.beta: expected a number > 0, got -0.5" in out.stderr


# --- The step itself ------------------------------------------------------------------------------------------


def _step(setup, sc, hparams=None, reference=None, ref_logps=None):
    graphdef, params, batch = setup
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-3, warmup_steps=0), 10)
    state = init_state(params, tx, builders.default_hparams(**(hparams or {})), 0)
    if ref_logps is not None:
        batch = batch.replace(ref_logps_GxPx2=ref_logps)
    fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc))
    return fn, state, batch, reference


@pytest.mark.slow
def test_frozen_and_cached_reference_agree(step_setup):
    graphdef, params, batch = step_setup
    from dpo_jax.core import scoring

    ref = jax.tree.map(lambda x: x * 1.01, params)  # a reference that differs from the policy
    ref_logps = scoring.pair_logps(graphdef, ref, batch)[0].reshape(*batch.index_GxP.shape, 2)
    fn, state, b, _ = _step(step_setup, step.StepConfig("dpo", frozen_reference=True))
    frozen_state, frozen_m = fn(state, b, ref)
    fn, state, b, _ = _step(step_setup, step.StepConfig("dpo"), ref_logps=ref_logps)
    cached_state, cached_m = fn(state, b, None)
    np.testing.assert_allclose(frozen_m["loss"], cached_m["loss"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(frozen_state.params), jax.tree.leaves(cached_state.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(step_setup):
    graphdef, params, batch = step_setup
    ref_logps = jnp.asarray(np.random.default_rng(0).normal(-20, 1, size=(*batch.index_GxP.shape, 2)), jnp.float32)
    results = []
    for accum in (1, 2, 4):
        fn, state, b, _ = _step(step_setup, step.StepConfig("dpo", grad_accum=accum), ref_logps=ref_logps)
        results.append(fn(state, b, None))

    def first_moments(state):  # AdamW's mu after one step: (1 - b1) x the (clipped) gradient, leaf by leaf
        found = jax.tree_util.tree_leaves_with_path(state.opt_state)
        return [x for path, x in found if "mu" in jax.tree_util.keystr(path)]

    for new_state, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], results[0][1]["grad_norm"], rtol=1e-4)
        # the gradients themselves (the parameters after one step encode little more than their signs: Adam's first
        # update is lr * g / (|g| + eps), which float rounding swings for an entry whose gradient is near eps)
        mus, expected = first_moments(new_state), first_moments(results[0][0])
        assert len(mus) == len(jax.tree.leaves(new_state.params)) > 0
        for x, y in zip(mus, expected, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()))


@pytest.mark.slow
def test_beta_and_smoothing_are_traced_one_compile(step_setup):
    ref_logps = jnp.full((*step_setup[2].index_GxP.shape, 2), -20.0)
    fn, state, b, _ = _step(step_setup, step.StepConfig("dpo"), ref_logps=ref_logps)
    losses = []
    for beta, eps in ((0.1, 0.0), (0.5, 0.2), (2.0, 0.1)):
        s = state.replace(hparams=state.hparams.replace(beta=jnp.float32(beta), label_smoothing=jnp.float32(eps)))
        losses.append(float(fn(s, b, None)[1]["loss"]))
    assert fn._cache_size() == 1 and len(set(losses)) == 3


def test_state_shardings_cover_optimizer_moments():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, params = nnx.split(builders.build_model(tiny_config(), synthetic.build_tokenizer()))
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-3, warmup_steps=2), 10)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, builders.default_hparams(), 0), params)
    sh = sharding.tree_shardings(abstract, mesh)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}
    mu_q = [v for k, v in specs.items() if "mu" in k and "q_proj" in k and "kernel" in k]
    assert mu_q and all(s == jax.sharding.PartitionSpec(None, "fsdp", "tensor") for s in mu_q)


@pytest.mark.parametrize("scale", [0.01, 10.0])  # under the clip norm (1.0) and over it
def test_optimizer_is_optax_clip_then_adamw(scale):
    """Our clip (one scalar factor) + optax AdamW equals optax.clip_by_global_norm + optax.adamw, state tree and
    values, over steps with and without clipping (so checkpoints of either restore into the other)."""
    import optax

    o = builders.optim_section(learning_rate=1e-2, warmup_steps=2, clip_norm=1.0, weight_decay=0.1)
    tx = optim.make_optimizer(o, 10)
    schedule = optim.lr_schedule(o["learning_rate"], 10, o["warmup_steps"], o["schedule"], o["end_lr_fraction"])
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=o["b1"], b2=o["b2"], weight_decay=o["weight_decay"], mask=optim.decay_mask
    )
    oracle = optax.chain(optax.clip_by_global_norm(1.0), adamw)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "norm": jnp.ones(4, jnp.float32)}
    runs = {"ours": (tx, params, tx.init(params)), "optax": (oracle, params, oracle.init(params))}
    assert jax.tree.structure(runs["ours"][2]) == jax.tree.structure(runs["optax"][2])
    for _ in range(4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32), params)
        for name, (t, p, s) in runs.items():
            u, s = jax.jit(t.update)(g, s, p)
            runs[name] = (t, optax.apply_updates(p, u), s)
    for a, b in zip(jax.tree.leaves(runs["ours"][1:]), jax.tree.leaves(runs["optax"][1:]), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_hf_local_config_trains_a_local_checkpoint_on_local_files(tmp_path):
    """configs/hf_local.py end to end: a transformers checkpoint + tokenizer folder + JSONL files, no SFT."""
    import transformers

    task = synthetic.write_task(tmp_path / "task", synthetic.TaskConfig(n_sft=4, n_train=64, n_eval=16))
    tok = synthetic.build_tokenizer()
    hf_cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": tok.vocab_size, "intermediate_size": 64})
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    cfg = load_config_file(str(ROOT / "configs/hf_local.py"))
    cfg.model.update(hf_path=str(tmp_path / "model"), dtype="float32")
    cfg.data.update(
        train_path=str(task["train"]), eval_path=str(task["eval"]), max_length=32, max_prompt_length=16, buckets=(32,)
    )
    cfg.optim.update(steps=4, batch_size=16, learning_rate=1e-3, warmup_steps=1)
    cfg.eval.update(every=4, batch_size=16, num_prompts=8, max_new_tokens=8)
    cfg.checkpoint.every = 2
    cfg.wandb.enabled = False
    cfg.reference.cache_dir = str(tmp_path / "cache")
    summary = train.train(cfg, tmp_path / "run", devices=jax.devices()[:1])
    assert summary["reference/mode"] == "cached" and np.isfinite(summary["eval/loss"])
    assert not (tmp_path / "run/sft").exists()  # the checkpoint is the reference: no SFT stage
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run/hf")
    assert exported.config.vocab_size == tok.vocab_size


@pytest.mark.slow
def test_a_gemma3_checkpoint_trains_on_rows_many_attention_blocks_long(tmp_path, capsys):
    """configs/hf_local.py on a Gemma 3 checkpoint (sliding and global layers: per-layer windows, traced in the layer
    scan) with 8-token attention blocks and 24-token prompts: the reference pass, the steps, eval and its sampling
    all run through the blockwise kernel, and the trained model is finite and moved (once an UnexpectedTracerError
    on any row past one block)."""
    from conftest import make_hf_model

    task = synthetic.write_task(tmp_path / "task", synthetic.TaskConfig(n_sft=4, n_train=32, n_eval=8))
    tok = synthetic.build_tokenizer()
    make_hf_model("gemma3", scale=0.1, vocab_size=tok.vocab_size).save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    cfg = load_config_file(str(ROOT / "configs/hf_local.py"))
    cfg.model.update(hf_path=str(tmp_path / "model"), dtype="float32", attention_block=8)
    cfg.data.update(train_path=str(task["train"]), eval_path=str(task["eval"]), max_length=48, max_prompt_length=24,
                    buckets=(48,))  # fmt: skip
    cfg.optim.update(steps=2, batch_size=8, learning_rate=1e-3, warmup_steps=1)
    cfg.eval.update(every=2, batch_size=8, num_prompts=4, max_new_tokens=12)
    cfg.checkpoint.every = 2
    cfg.wandb.enabled = False
    cfg.reference.cache_dir = str(tmp_path / "cache")
    summary = train.train(cfg, tmp_path / "run", devices=jax.devices()[:1])
    assert summary["reference/mode"] == "cached" and summary["eval/sample_length"] > 0
    assert np.isfinite(summary["eval/loss"]) and summary["eval/kl_token"] > 0  # the policy moved off the reference
    out = capsys.readouterr()
    assert "(attention: blockwise of 8-token blocks)" in out.out + out.err


def test_the_export_keeps_the_sources_generation_config_as_it_was(tmp_path):
    from dpo_jax.models import ModelConfig

    source = {"bos_token_id": 1, "eos_token_id": [2, 7], "max_new_tokens": 512}  # no do_sample: greedy
    (tmp_path / "generation_config.json").write_text(json.dumps(source))
    mc = ModelConfig(vocab_size=9, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    tok = synthetic.build_tokenizer()
    cfg = tiny_config('model.init="hf"', f'model.hf_path="{tmp_path}"')
    assert outputs.generation_config(mc, tok, cfg) == source
    scratch = outputs.generation_config(mc, tok, tiny_config())  # no source: the special tokens only
    assert scratch == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_nonfinite_parameters_are_never_exported(tmp_path, step_setup):
    graphdef, params, _ = step_setup
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf) if x.ndim else x, params)
    with pytest.raises(NonFiniteLoss, match="contain NaN/Inf: not exported"):
        outputs.write_outputs(tiny_config(), tmp_path, graphdef, bad, synthetic.build_tokenizer(), {})
    assert not list(tmp_path.iterdir())


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_input_that_is_probably_wrong_is_warned_once(tmp_path):
    tok = synthetic.build_tokenizer()
    rows = [{"prompt": "ab:", "chosen": "abc", "rejected": "mno", "weight": 0.0, "chosen_prob": 0.7}] * 20
    rows += [{"prompt": None, "chosen": "ab:cd", "rejected": "ab:zz", "weight": 0.0}]  # null prompt; z is unknown
    cfg = tiny_config('task="files"', "data.max_prompt_length=2", "dpo.loss_weights=[-1.0]")
    paths = {"train": _rows(tmp_path / "t.jsonl", rows), "eval": _rows(tmp_path / "e.jsonl", rows[:2])}
    loaded = {k: load_examples(p) for k, p in paths.items()}
    tok_cfg = TokenizeConfig(max_length=cfg.data.max_length, max_prompt_length=2)
    tokenized = {k: tokenize_examples(ex, tok, tok_cfg) for k, (ex, _) in loaded.items()}
    notes = Notes()
    for _ in range(2):  # a second pass (e.g. the eval split) does not repeat them
        inputs.check_data(
            cfg, paths, {k: r for k, (_, r) in loaded.items()}, {k: p for k, (p, _) in tokenized.items()},
            {k: s for k, (_, s) in tokenized.items()}, notes,
        )  # fmt: skip
    text = "\n".join(notes.items)
    assert "every pair in" in text and "has weight 0" in text
    assert "1 rows of" in text and "null 'prompt'" in text
    assert "1 pairs of" in text and "unknown/pad token" in text
    assert "21 of 21 prompts truncated to data.max_prompt_length=2" in text
    assert "'chosen_prob' column (20 rows) but dpo.use_soft_targets=False" in text
    assert len(notes.items) == len(set(notes.items)) == 6  # train: 5 warnings; eval: truncation only


def test_a_damaged_or_stale_builtin_data_folder_is_rewritten(tmp_path):
    cfg = tiny_config()
    _, paths = inputs.task_files(cfg, tmp_path)
    good = paths["train"].read_text()
    paths["train"].write_text(good[: len(good) // 2])  # what a kill mid-write used to leave
    (tmp_path / "data" / "task.json").unlink()
    _, paths = inputs.task_files(cfg, tmp_path)
    assert paths["train"].read_text() == good
    cfg.synthetic.n_train = 64  # other settings: other data, not the stale folder
    _, paths = inputs.task_files(cfg, tmp_path)
    assert len(paths["train"].read_text().splitlines()) == 64


@pytest.mark.slow
def test_bco_running_moments_live_in_the_state_and_follow_the_batch_means(step_setup):
    """dpo.bco_delta="running": the state carries the moments; after n steps their mean is the mean of the n
    logged batch rewards (NumPy), and the loss of each step used the mean including its own batch."""
    graphdef, params, batch = step_setup
    sc = step.StepConfig("dpo", ("bco_pair",), bco_delta="running")
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-2, warmup_steps=0), 10)
    state = init_state(params, tx, builders.default_hparams(loss_type="bco_pair"), 0, running_moments=True)
    ref = jnp.asarray(np.random.default_rng(0).normal(-20, 1, size=(*batch.index_GxP.shape, 2)), jnp.float32)
    fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc))
    means = []
    for _ in range(3):
        state, m = fn(state, batch.replace(ref_logps_GxPx2=ref), None)
        means.append(float(m["bco/batch_reward"]))
        assert float(m["bco/delta"]) == pytest.approx(np.mean(means), rel=1e-4, abs=1e-6)
    assert len(set(means)) == 3  # the policy moved: each batch mean differs
    assert float(state.moments.mean) == pytest.approx(np.mean(means), rel=1e-4, abs=1e-6)
    assert float(state.moments.count) == pytest.approx(3.0)


@pytest.mark.slow
def test_tr_dpo_reference_is_the_exact_mix_after_each_sync_and_the_step_reads_it(step_setup):
    """TR-DPO (reference.sync): untouched between syncs; after step k it is alpha * policy + (1 - alpha) * old
    (NumPy, float32, to its last bits); the next step's loss is that of a frozen reference equal to the mix."""
    graphdef, params, batch = step_setup
    tx = optim.make_optimizer(builders.optim_section(learning_rate=1e-2, warmup_steps=0), 10)
    hp = builders.default_hparams(beta=0.5).replace(ref_mixup_alpha=np.float32(0.3), ref_sync_steps=np.int32(2))
    sc = step.StepConfig("dpo", frozen_reference=True, sync_reference=True)
    fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx, sc=sc))
    state = init_state(params, tx, hp, 0, reference=params)
    initial = jax.tree.map(np.asarray, params)
    state, _ = fn(state, batch, None)  # step 1: no sync
    for r, p0 in zip(jax.tree.leaves(state.reference), jax.tree.leaves(initial), strict=True):
        np.testing.assert_array_equal(np.asarray(r), p0)
    state, _ = fn(state, batch, None)  # step 2: sync
    a = np.float32(0.3)
    for r, p, p0 in zip(*(jax.tree.leaves(t) for t in (state.reference, state.params, initial)), strict=True):
        # equal up to float32 rounding of the two products (XLA may fuse them into one multiply-add)
        ap, bp = a * np.asarray(p), (np.float32(1) - a) * p0
        ulp = np.spacing(np.maximum(np.abs(ap), np.abs(bp)))
        np.testing.assert_array_less(np.abs(np.asarray(r) - (ap + bp)), 3 * ulp + 1e-30)  # products + sum
    _, synced = fn(state, batch, None)
    frozen_fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, tx=tx,
                                          sc=step.StepConfig("dpo", frozen_reference=True)))  # fmt: skip
    _, frozen = frozen_fn(state.replace(reference=None), batch, state.reference)
    assert float(synced["loss"]) == pytest.approx(float(frozen["loss"]), rel=1e-6)
    assert float(synced["loss"]) != pytest.approx(float(fn(state.replace(reference=params), batch, None)[1]["loss"]))


def test_xla_flags_are_added_and_a_users_own_setting_kept():
    from dpo_jax.infra import xla_flags

    flag = xla_flags.CPU_FLAGS[0].split("=")[0]
    assert xla_flags.apply({}) == f"{flag}=true"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply(env).split() == ["--xla_force_host_platform_device_count=8", f"{flag}=true"]
    assert xla_flags.apply({"XLA_FLAGS": f"{flag}=false"}) == f"{flag}=false"
    assert flag in os.environ["XLA_FLAGS"]  # the tests run with them, as the command does


def test_malloc_settings_are_added_and_a_users_own_kept():
    from dpo_jax.infra import xla_flags

    mine = xla_flags.keep_memory({}).split(":")
    never = "18446744073709551615"  # SIZE_MAX: GLIBC_TUNABLES' size_t for mallopt's -1 (no trimming)
    assert mine == ["glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={never}"]
    theirs = xla_flags.keep_memory({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}).split(":")
    assert theirs[0] == "glibc.malloc.arena_max=4" and "glibc.malloc.arena_max=1" not in theirs and len(theirs) == 3
    assert xla_flags.keep_memory({"DPO_JAX_KEEP_MEMORY": "0"}) == ""  # glibc's defaults, if the user asks
    if os.environ.get("DPO_JAX_KEEP_MEMORY") != "0":
        assert "glibc.malloc.mmap_max=0" in os.environ["GLIBC_TUNABLES"]  # the tests run with them, as the command does


@pytest.mark.skipif(sys.platform != "linux" or os.environ.get("DPO_JAX_KEEP_MEMORY") == "0", reason="glibc malloc")
def test_a_large_block_freed_by_a_worker_thread_stays_in_the_process_for_reuse():
    """What ``xla_flags.MALLOC`` is for: XLA:CPU allocates a program's temporaries (~350 MB for the 32k step) from
    its worker threads on every call. glibc's defaults map such a block afresh and unmap it on free, so every call
    faults in fresh pages; with the settings it comes from the heap and stays there when freed."""
    import ctypes
    import threading

    class Info(ctypes.Structure):  # <malloc.h> struct mallinfo2
        names = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks"]
        _fields_ = [(n, ctypes.c_size_t) for n in [*names, "keepcost"]]

    libc = ctypes.CDLL(None)
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.mallinfo2.restype = [ctypes.c_void_p], Info
    size, seen = 64 << 20, {}

    def worker():
        before = libc.mallinfo2()
        block = libc.malloc(size)
        during = libc.mallinfo2()
        libc.free(block)
        seen["mapped"] = during.hblkhd - before.hblkhd  # bytes mmapped for the block
        seen["kept"] = libc.mallinfo2().fordblks - during.fordblks  # bytes the heap holds free once it is freed

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["mapped"] == 0 and seen["kept"] >= size, seen


@pytest.mark.skipif(sys.platform != "linux" or os.environ.get("DPO_JAX_KEEP_MEMORY") == "0", reason="glibc malloc")
def test_released_memory_leaves_the_process_and_small_free_lists_are_left_alone():
    """``xla_flags.release_memory``: the kept free blocks' pages go back to the system (the process's resident size
    falls by about the block), but only past its threshold."""
    import ctypes

    from dpo_jax.infra import xla_flags

    libc = ctypes.CDLL(None)
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * page

    size = 512 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touched: resident
    guard = libc.malloc(4096)  # keeps the freed block off the heap's top, where glibc could shrink the heap itself
    libc.free(block)
    kept = resident()
    assert xla_flags.release_memory(min_free=1 << 62) >= size  # below its threshold: nothing done
    assert xla_flags.release_memory(min_free=0, of_used=1e6) >= size  # less free than a million times what is used
    assert resident() > kept - size // 2
    assert xla_flags.release_memory() >= size
    assert resident() < kept - size // 2
    libc.free(guard)


def test_the_initial_policy_is_the_reference_without_a_second_copy_of_its_weights():
    """A full fine-tune's reference is the initial policy: its arrays themselves (the run's state is made from them
    by its own program and no program donates them), not a copy: a 270M model's 1.07 GB less."""
    from dpo_jax.training import builders

    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    policy = builders.Policy(graphdef=None, config=None, params=params, base=None, n_params=9, matmul_params=6)
    ref = builders.reference_params(tiny_config(), policy, mesh=None)
    assert jax.tree.structure(ref) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params), strict=True):
        assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
