"""No config field is dead: for every field of the config tree, changing it (in one of the presets, where it is
active) changes what the run builds from the config — the step configs, the hyper-parameters, the mesh, the batch
layout, the tokenization, the optimizer's updates, the model, the data, eval's sampling, PBT's settings — through
the functions the run itself calls; or the run refuses the new value; or the field is in ``NO_NUMERIC_EFFECT``
below, with the reason. A field nothing reads fails here (``moe.aux_loss_coef`` once reached no step)."""

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_hf_model

from dpo_jax.config import ConfigError, dpo_seed, load_config_file, loss_types, online, validate
from dpo_jax.core import optim
from dpo_jax.data import synthetic
from dpo_jax.errors import Notes
from dpo_jax.infra.workdir import flatten
from dpo_jax.research import pbt
from dpo_jax.training import builders, evaluate, inputs, train
from dpo_jax.training.online import Sampling

ROOT = Path(__file__).resolve().parents[1]
# (preset, overrides): the presets, and contexts where a field is active that no preset sets
PRESETS = [("default.py", {}), ("default.py:runlocal", {}), ("moe.py:runlocal", {}), ("pbt.py", {}),
           ("hf_local.py:cpu,lora", {}), ("rounds.py:runlocal", {}), ("loss_ablation.py", {}),
           ("label_softness_sweep.py", {}), ("sweep_benchmark.py", {}), ("rounds.py:online,runlocal", {}),
           ("default.py:runlocal", {"reference.mode": "frozen"})]  # fmt: skip

# Fields with no numeric effect on what a run computes, and why (each is exercised by the test named).
NO_NUMERIC_EFFECT = {
    "checkpoint.every": "when checkpoints are written; a resume is exact from any of them (test_train resumes)",
    "checkpoint.keep": "how many checkpoints are kept on disk (test_checkpoint)",
    "checkpoint.reserve_mb": "disk space kept free before a save (test_main: a full disk)",
    "log_every": "how often metrics are logged (test_logging)",
    "export_hf": "whether the result is exported for transformers (test_train)",
    "peak_flops": "the MFU's denominator: a logged figure only (test_logging)",
    "resume.allow_changes": "which config changes a resume accepts (test_main)",
    "reward_timeout_s": "how long a reward call may take before the run stops (test_rewards)",
    "wandb.enabled": "logging (test_logging)",
    "wandb.entity": "logging",
    "wandb.group": "logging",
    "wandb.mode": "logging",
    "wandb.name": "logging",
    "wandb.project": "logging",
    "wandb.tags": "logging",
    "sft.dir": "a path: where a finished SFT stage is shared between runs (test_sweep)",
    "reference.cache_dir": "a path: where reference log-probs are cached (test_reference)",
    "data.on_bad_row": "error or skip a malformed row: the same rows train when the data is clean (test_data)",
    # paths of local files: the presets hold none; the files-task runs of test_train / test_hf read them
    "data.train_path": "a path (test_train's files runs)",
    "data.eval_path": "a path (test_train's files runs)",
    "data.sft_path": "a path (test_train's files runs)",
    "data.tokenizer_path": "a path (test_train's files runs)",
    "data.split": "a split of a save_to_disk folder (test_data)",
    "model.hf_path": "a path (test_train's and test_hf's checkpoint runs)",
    "reference.hf_path": "a path (test_reference)",
    "reward": "the function eval's samples are scored with (test_rewards)",
    "eval.every": "when eval runs (PBT ranks at its steps: pbt.every must be a multiple, checked)",
    # read by `dpo-jax rounds` only (every one through the command in test_rounds); the sampling fields are read by
    # an online run too (the "online" component below)
    **{f"rounds.{k}": "read by dpo-jax rounds (test_rounds)" for k in ("num", "prompts", "reference")},
}  # fmt: skip

# Fields the presets hold at the only value that runs there (any other needs files this test does not make)
REFUSED_ELSEWHERE = {
    "task": "'files' needs data files (the files presets run them)",
    "model.init": "'hf' needs a checkpoint folder, 'scratch' with files a tokenizer folder",
    "mesh.data": "-1 takes the devices left; a value that fits the 8 devices gives the same mesh, others are refused",
}

# Other values to try for string fields (the first the run accepts is used)
CHOICES = {
    "dpo.loss_type": ["ipo", "hinge"], "dpo.bco_delta": ["batch"], "dpo.f_divergence_type": ["js_divergence"],
    "model.architecture": ["Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3MoeForCausalLM"],
    "model.attention": ["blockwise", "einsum"], "model.dtype": ["bfloat16", "float32"],
    "model.context_attention": ["gather"],
    "model.remat": ["full", "none"], "model.init": ["hf"], "moe.impl": ["grouped", "blocked"],
    "optim.schedule": ["linear", "cosine"], "sft.schedule": ["linear", "cosine"],
    "reference.mode": ["frozen", "cached"], "lora.base_dtype": ["int8", "bfloat16"], "lora.targets": ["q_proj,v_proj"],
    "data.truncation_mode": ["keep_start"], "synthetic.reward": ["copy_prompt"], "pbt.metric": ["loss"],
    "pbt.hparams": ["beta", "beta,label_smoothing"], "task": ["files"],
    "data.prompt_column": ["question"], "data.chosen_column": ["good"], "data.rejected_column": ["bad"],
    "data.prob_column": ["p"], "data.weight_column": ["w"], "rounds.cut_samples": ["drop", "score"],
}  # fmt: skip


def candidates(field, value):
    """Values to try in place of ``value``."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, 2, 1, 0, 4, value + 8, 16]
    if isinstance(value, float):
        return [value * 0.5 + 0.05, value * 2 + 0.1, 0.25, 0.1, 1.0, 0.0, -1.0]
    if isinstance(value, str):
        return CHOICES.get(field, ["other"])
    if isinstance(value, list | tuple):
        if not value:
            return [[0.5], [2.0], ["x"]]
        return [[v * 2 + 1 for v in value], [*value, value[-1] * 2], list(value[:1]), [v * 0.5 for v in value]]
    raise AssertionError(f"{field}: no candidates for {value!r}")


def set_field(cfg, field, value):
    cfg = cfg.copy_and_resolve_references()
    *path, leaf = field.split(".")
    node = cfg
    for p in path:
        node = node[p]
    with node.ignore_type():
        node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], list | tuple) else value
    return cfg


def digest(tree) -> str:
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return hashlib.sha256(b"".join(x.tobytes() + str(x.shape).encode() for x in leaves)).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny checkpoint for the checkpoint presets and a tokenizer; a scratch folder."""
    root = tmp_path_factory.mktemp("reach")
    tok = synthetic.build_tokenizer()
    make_hf_model("llama3", vocab_size=tok.vocab_size).save_pretrained(root / "model")
    tok.save(root / "model")
    synthetic.write_task(root / "files", synthetic.TaskConfig(n_sft=4, n_train=32, n_eval=8))
    return root, tok


def components(cfg, root, tok):
    """Lazily: (name, fingerprint) of each thing the run builds from ``cfg``, cheapest first."""
    devices = jax.devices()
    model_cfg = builders.scratch_config(cfg, tok) if cfg.model.init == "scratch" else None
    if model_cfg is None:
        from dpo_jax.infra import hf

        model_cfg = hf.load_config(cfg.model.hf_path, **builders.model_options(cfg))
    lora = cfg.lora.rank > 0
    yield "model config", repr(model_cfg), repr(builders.model_options(cfg))
    yield "dpo step", repr(train.dpo_step_config([cfg], model_cfg, lora=lora))
    yield "sft step", repr(train.sft_step_config(cfg, model_cfg, lora=lora))
    yield "hparams", repr(builders.hparams(cfg, loss_types(cfg)))
    mesh = builders.make_mesh(cfg, devices, 2)
    yield "mesh", repr(dict(mesh.shape))
    yield (
        "layout",
        repr(inputs.make_layout(cfg, mesh, accum=cfg.optim.grad_accum)),
        repr(inputs.make_layout(cfg, mesh, sides=1)),
    )
    yield "tokenization", repr(inputs.tokenize_config(cfg)), repr(inputs.columns(cfg)), inputs.max_row_chars(cfg)
    yield "batches", cfg.optim.batch_size, cfg.sft.batch_size, cfg.eval.batch_size, cfg.optim.steps, cfg.sft.steps
    yield "seeds", dpo_seed(cfg)
    yield (
        "optimizers",
        optimizer_updates(dict(cfg.optim), cfg.optim.steps),
        optimizer_updates(dict(cfg.sft), cfg.sft.steps),
    )
    if cfg.pbt.enabled:
        yield "pbt", repr(pbt.settings(cfg))
    if online(cfg):  # how each step samples its pairs (dpo_jax.training.online)
        yield "online", repr(Sampling.of(cfg, tok))
    if cfg.task == "synthetic":
        _, paths = inputs.task_files(cfg, root / "task")
        yield "data", hashlib.sha256(b"".join(Path(p).read_bytes() for p in paths.values())).hexdigest()
    yield "eval prompts", eval_prompts(cfg)
    policy = builders.build_policy(cfg, tok, builders.make_mesh(cfg, devices[:1]), Notes())
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), (policy.params, policy.base))
    yield "policy", repr(policy.config), digest((policy.params, policy.base)), repr(shapes)
    yield "eval samples", eval_samples(cfg, tok)


def optimizer_updates(section: dict, steps: int):
    """The updates ``optim.make_optimizer`` makes from fixed gradients at steps spread over the schedule (memoized on
    everything it is given: the section and the step count)."""
    return _optimizer_updates(json.dumps(section, sort_keys=True), steps)


@functools.cache
def _optimizer_updates(section_json: str, steps: int):
    tx = optim.make_optimizer(json.loads(section_json), steps)
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "norm": jnp.ones(2)}
    grads = {"w": jnp.linspace(2.0, -3.0, 6).reshape(3, 2), "norm": jnp.full(2, 0.5)}
    state, out = tx.init(params), []
    for at in (0, 1, 3, 10, 19, 25, 100, 150, 299, 399):
        updates, _ = tx.update(grads, _with_count(state, at), params)
        out.append(np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)]))
    return digest(out)


def _with_count(state, at):
    """``state`` with every step counter in it (the schedules' and Adam's) at ``at``."""
    if isinstance(state, dict):
        return {k: _with_count(v, at) for k, v in state.items()}
    if hasattr(state, "_fields"):  # a named tuple: its count, and the states inside it
        fields = {k: _with_count(v, at) for k, v in state._asdict().items()}
        if isinstance(fields.get("count"), jax.Array):
            fields["count"] = jnp.asarray(at, state.count.dtype)
        return type(state)(**fields)
    if isinstance(state, tuple):
        return tuple(_with_count(v, at) for v in state)
    return state


@functools.cache
def _eval_model(vocab):
    from dpo_jax.models import ModelConfig, init_decoder

    mc = ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return init_decoder(mc, seed=0)


def eval_prompts(cfg, n_pairs=300):
    """The shape of the prompts eval samples from (``evaluate.sample_prompts``) among 300 distinct ones."""
    from dpo_jax.data import PreferenceExample, TokenizedPair

    pairs = [TokenizedPair(np.asarray([3, 4 + i % 50, 5 + i // 50], np.int32), np.asarray([6], np.int32),
                           np.asarray([7], np.int32), 1.0, 1.0) for i in range(n_pairs)]  # fmt: skip
    examples = [PreferenceExample(f"p{i}", "c", "r") for i in range(n_pairs)]
    out = evaluate.sample_prompts(pairs, examples, cfg.eval.num_prompts, 0)
    return None if out is None else out[0].shape


def eval_samples(cfg, tok):
    """What eval's sampling measures (``evaluate.sampled_metrics``) with the config's eval section, on 2 prompts
    (memoized on that section: all the function is given)."""
    key = json.dumps(cfg.eval.to_dict(), sort_keys=True)
    if key not in _EVAL_SAMPLES:
        _EVAL_SAMPLES[key] = _eval_samples(ml_collections.ConfigDict(json.loads(key)), tok)
    return _EVAL_SAMPLES[key]


_EVAL_SAMPLES: dict[str, str] = {}


def _eval_samples(ev, tok):
    prompt = np.asarray([[3, 4, 5], [0, 6, 7]], np.int32)
    prompts = (prompt, (prompt > 0).astype(np.int32), ["a", "b"])
    ref = lambda p, m, tokens, mask: jnp.zeros(tokens.shape)  # noqa: E731
    m = evaluate.sampled_metrics(_eval_model(tok.vocab_size), ref, prompts, tok, ev, jax.random.PRNGKey(0))
    return json.dumps(m, sort_keys=True)


def fingerprint_differs(base, cfg, root, tok) -> str | None:
    """The first component of ``cfg`` that differs from ``base``'s (a list, filled lazily), or None."""
    for i, comp in enumerate(components(cfg, root, tok)):
        while len(base["items"]) <= i:
            base["items"].append(next(base["gen"]))
        if comp != base["items"][i]:
            return comp[0]
    return None


def preset(spec, root):
    cfg = load_config_file(str(ROOT / "configs" / spec))
    if cfg.model.init == "hf":
        cfg.model.hf_path = str(root / "model")
    if cfg.task == "files":
        cfg.data.update(train_path=str(root / "files/train.jsonl"), eval_path=str(root / "files/eval.jsonl"))
    cfg.wandb.enabled = False
    return cfg


@pytest.mark.slow
def test_every_config_field_reaches_what_the_run_builds(env):
    root, tok = env
    fields = sorted({f for spec, _ in PRESETS for f in flatten(preset(spec, root).to_dict())})
    stale = set(NO_NUMERIC_EFFECT) - set(fields)
    assert not stale, f"NO_NUMERIC_EFFECT names fields the config no longer has: {sorted(stale)}"
    todo = [f for f in fields if f not in NO_NUMERIC_EFFECT]
    reached: dict[str, str] = {}
    refused: set[str] = set()  # fields whose every other value tried, in some preset, the run refuses
    for spec, overrides in PRESETS:
        cfg = preset(spec, root)
        for field, value in overrides.items():
            cfg = set_field(cfg, field, value)
        validate(cfg, num_devices=8)
        base = {"items": [], "gen": components(cfg, root, tok)}
        values = flatten(cfg.to_dict())
        for field in [f for f in todo if f not in reached]:
            tried = 0
            for value in candidates(field, values[field]):
                if value == values[field] or tried == 2:  # two values the run accepts, per preset
                    continue
                new = set_field(cfg, field, value)
                try:
                    validate(new, num_devices=8)
                    what = fingerprint_differs(base, new, root, tok)
                except ConfigError:
                    refused.add(field)
                    continue
                tried += 1
                if what is not None:
                    reached[field] = f"{spec}: {what}"
                    break
    dead = [f for f in todo if f not in reached and f not in refused]
    assert not dead, f"fields whose change no run builder sees (in any preset): {dead}"
    only_refused = sorted(f for f in todo if f not in reached)
    assert only_refused == sorted(REFUSED_ELSEWHERE), only_refused
