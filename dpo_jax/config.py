"""Load config files and validate every field before anything compiles.

The shipped configs (the repository's ``configs/`` folder) are the package ``dpo_jax.configs``: a config that
extends another imports it normally (``from dpo_jax.configs.default import get_config``). A config file given by
path is loaded under its package name when it is one of those, else as a standalone module; no folder is ever
put on ``sys.path``, so a config's neighbours cannot shadow installed packages.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

import jax
import ml_collections

from dpo_jax.configs.default import get_config as default_config
from dpo_jax.core import hparams
from dpo_jax.core.losses import BATCH_LOSSES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, LOSS_TYPES, POLICY_ONLY
from dpo_jax.data import rewards
from dpo_jax.data.formats import local_paths
from dpo_jax.errors import ConfigError
from dpo_jax.infra.hub import resolve_config
from dpo_jax.infra.workdir import allowed_changes
from dpo_jax.models.config import ARCHITECTURES, ATTENTION, CONTEXT_ATTENTION, MIXTURES, MOE_IMPLS, REMAT_POLICIES
from dpo_jax.models.lora import targets as lora_targets

# What the SFT reference depends on; runs (and sweep members) equal on these share one SFT stage. (The built-in
# task draws its SFT demonstrations first, so label noise, tau, the reward and the pair counts do not change them.)
SFT_FIELDS = (
    "seed", "task", "model", "sft.steps", "sft.batch_size", "sft.learning_rate", "sft.warmup_steps", "sft.schedule",
    "sft.end_lr_fraction", "sft.weight_decay", "sft.b1", "sft.b2", "sft.clip_norm",
    "data.sft_path", "data.tokenizer_path", "data.max_length", "data.max_prompt_length", "data.truncation_mode",
    "data.max_row_chars",
    "synthetic.seed", "synthetic.prompt_length", "synthetic.completion_length", "synthetic.n_sft",
)  # fmt: skip


def _package_module_name(file: Path) -> str | None:
    """``dpo_jax.configs.<stem>`` when ``file`` is one of the shipped configs."""
    spec = importlib.util.find_spec("dpo_jax.configs")
    folders = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    return f"dpo_jax.configs.{file.stem}" if file.resolve().parent in folders else None


def load_config_module(spec: str):
    """``path/to/config.py[:arg]`` -> (the loaded module, arg or None)."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found in --config: {file} (expected path/to/config.py[:arg])")
    name = _package_module_name(file)
    if name is not None:
        module = importlib.import_module(name)
    else:
        module_spec = importlib.util.spec_from_file_location(f"_dpo_jax_config_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"no get_config in --config {file}: expected def get_config(arg=None)")
    return module, arg or None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> ``get_config(arg)``."""
    module, arg = load_config_module(spec)
    return module.get_config(arg)


def dpo_seed(cfg) -> int:
    """The DPO stage's seed (data order, train rng): ``dpo.seed``, or the run's ``seed`` when it is -1."""
    seed = cfg.dpo.get("seed", -1)
    return cfg.seed if seed == -1 else seed


# Fields whose change on resume is meaningful (continue with a new beta, a longer schedule, ...): allowed only when
# named in ``resume.allow_changes``; the resumed run then trains with the new values. The hyper-parameters' are
# declared with them (``dpo_jax.core.hparams``).
CHANGEABLE_ON_RESUME = hparams.resume_fields() + (
    "dpo.use_soft_targets", "optim.steps", "optim.warmup_steps", "optim.schedule", "optim.end_lr_fraction",
    "optim.clip_norm", "optim.weight_decay", "optim.b1", "optim.b2", "optim.grad_accum", "reference.mode",
    "data.train_path", "data.eval_path",
)  # fmt: skip


def config_value(cfg, field: str):
    """The value of dotted ``field`` ("dpo.beta") in ``cfg``."""
    node = cfg
    for key in field.split("."):
        node = node[key]
    return node


def loss_types(cfg) -> tuple[str, ...]:
    return tuple(t.strip() for t in cfg.dpo.loss_type.split("+"))


def online(cfg) -> bool:
    """Whether ``dpo-jax train`` samples every step's pairs from the current policy (``rounds.online``)."""
    return bool("rounds" in cfg and cfg.rounds.get("online", False))


def needs_reference(cfg) -> bool:
    """Whether DPO reads a reference at all: not with ``dpo.reference_free`` nor for a mix of policy-only types
    (cpo, simpo, orpo, sft): then no reference pass runs, cached or frozen."""
    return not cfg.dpo.reference_free and not set(loss_types(cfg)) <= POLICY_ONLY


MAX_STEPS = 2**31 - 1  # the step counter is an int32 on device
# Fields that name local files of a task="files" run: the built-in task (task="synthetic") makes its own data,
# tokenizer and model, so a value here would be silently ignored.
FILE_FIELDS = ("data.train_path", "data.eval_path", "data.sft_path", "data.tokenizer_path", "data.split",
               "model.hf_path")  # fmt: skip


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict | ml_collections.ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


MAX_SHAPES = 64  # data.max_shapes: programs compiled per stage (the shape search's table grows with it)


def check_numbers(cfg) -> None:
    """Every number in the config is finite (an ``inf`` learning rate would pass a ``> 0`` check)."""
    for field, v in _leaves(cfg):
        values = v if isinstance(v, tuple | list) else (v,)
        for x in values:
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"config.{field}: expected a finite number, got {v!r}")


def check_unused_fields(cfg) -> None:
    """Refuse fields the run would ignore: file paths with the built-in task, a model folder without
    ``model.init='hf'``."""
    values = dict(_leaves(cfg))
    if cfg.task == "synthetic":
        named = [f for f in FILE_FIELDS if values.get(f)]
        if named or cfg.model.init == "hf":
            fields = ", ".join(named + (["model.init='hf'"] if cfg.model.init == "hf" else []))
            raise ConfigError(
                f"config.task: 'synthetic' (the built-in task: its own data, tokenizer and scratch model) would "
                f"ignore {fields}: set --config.task=files to train on them, or clear them"
            )
    elif cfg.model.init == "scratch" and cfg.model.hf_path:
        raise ConfigError(
            f"config.model.hf_path: set ({cfg.model.hf_path!r}) but model.init='scratch' would ignore it: add "
            "--config.model.init=hf to train that checkpoint, or clear it"
        )
    if cfg.model.init == "scratch":
        check_moe_fields(cfg, cfg.model.architecture in MIXTURES)
    if cfg.model.init == "hf":  # a checkpoint brings its own family and experts
        default = default_config().model
        for key in ("architecture", "num_experts", "experts_per_token", "expert_intermediate_size"):
            if cfg.model.get(key, default[key]) != default[key]:
                raise ConfigError(
                    f"config.model.{key}: set ({cfg.model[key]!r}) but model.init='hf' takes the checkpoint's "
                    f"(its config.json): clear it, or use model.init='scratch' for a new model"
                )


def check_moe_fields(cfg, mixture: bool) -> None:
    """Refuse ``moe.*`` set (away from its default) for a dense model: nothing would read it."""
    if mixture:
        return
    default = default_config().moe
    for key, value in cfg.moe.items():
        if value != default[key]:
            model = (
                f"model.architecture={cfg.model.architecture!r}"
                if cfg.model.init == "scratch"
                else f"the checkpoint {cfg.model.hf_path!r}"
            )
            raise ConfigError(
                f"config.moe.{key}: set ({value!r}) but the model is dense ({model}, no experts): nothing reads it; "
                "clear it, or train a mixture of experts (configs/moe.py)"
            )


def _check(cond: bool, field: str, expected: str, value) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: expected {expected}, got {value!r}")


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None, members: int = 1) -> None:
    """Raise ``ConfigError`` naming the first invalid field; ``members``: the size of the mesh's member axis
    (each member group has num_devices / members devices)."""
    num_devices = num_devices or jax.device_count()
    member_axis = cfg.mesh.member
    _check(
        member_axis == 0 or (member_axis >= 1 and num_devices % member_axis == 0),
        "mesh.member",
        f"0 (auto) or a divisor of the {num_devices} devices",
        member_axis,
    )
    num_devices //= members
    _check(cfg.task in ("synthetic", "files"), "task", "'synthetic' or 'files'", cfg.task)
    check_unused_fields(cfg)
    for note in resolve_config(cfg):  # hub ids -> their local snapshots (never downloaded)
        if jax.process_index() == 0:
            print(f"resolved {note}", flush=True)
    check_numbers(cfg)
    _check_data(cfg)
    _check_model(cfg)
    _check_objective(cfg)
    data_parallel = _check_mesh(cfg, num_devices, members)
    _check_schedules(cfg, data_parallel)


def _check_data(cfg) -> None:
    """``task``'s files and the ``data.*`` and ``logprobs.*`` fields."""
    check_unused_fields(cfg)
    if cfg.task == "files":
        for key in ("train_path", "eval_path"):
            p = cfg.data[key]
            _check(bool(p) and all(f.exists() for f in local_paths(p)), f"data.{key}",
                   "an existing local file or folder, or a dataset in the Hugging Face cache", p)  # fmt: skip
    for key in ("sft_path", "tokenizer_path"):
        p = cfg.data[key]
        _check(not p or all(f.exists() for f in local_paths(p)), f"data.{key}", "an existing path or ''", p)
    _check(cfg.data.on_bad_row in ("error", "skip"), "data.on_bad_row", "'error' or 'skip'", cfg.data.on_bad_row)
    _check(
        cfg.data.truncation_mode in ("keep_end", "keep_start"),
        "data.truncation_mode",
        "keep_end | keep_start",
        cfg.data.truncation_mode,
    )
    _check(
        0 < cfg.data.max_prompt_length < cfg.data.max_length,
        "data.max_prompt_length",
        f"0 < max_prompt_length < max_length ({cfg.data.max_length})",
        cfg.data.max_prompt_length,
    )
    _check(isinstance(cfg.data.max_row_chars, int) and cfg.data.max_row_chars >= 0, "data.max_row_chars",
           "an integer >= 0 (0: 100 x data.max_length)", cfg.data.max_row_chars)  # fmt: skip
    _check(isinstance(cfg.data.max_shapes, int) and 0 <= cfg.data.max_shapes <= MAX_SHAPES, "data.max_shapes",
           f"an integer in [0, {MAX_SHAPES}] (0: grid-rounded shapes; each shape is a program compiled)",
           cfg.data.max_shapes)  # fmt: skip
    _check(cfg.data.pack_length >= 0, "data.pack_length", "0 (from the data) or a row length > 0", cfg.data.pack_length)
    _check(cfg.logprobs.max_logits_mb >= 0 or cfg.logprobs.max_logits_mb == -1, "logprobs.max_logits_mb",
           ">= 0, or -1 (sized from the device's memory)", cfg.logprobs.max_logits_mb)  # fmt: skip
    _check(
        len(cfg.data.buckets) > 0 and all(b > 0 for b in cfg.data.buckets),
        "data.buckets",
        "positive lengths",
        cfg.data.buckets,
    )


def _check_model(cfg) -> None:
    """``model.*``: a local checkpoint, or the sizes of a new model; the attention implementation."""
    _check(cfg.model.init in ("scratch", "hf"), "model.init", "'scratch' or 'hf'", cfg.model.init)
    if cfg.model.init == "hf":
        p = cfg.model.hf_path
        _check(
            bool(p) and (Path(p) / "config.json").exists(),
            "model.hf_path",
            "a local Hugging Face folder with config.json, or a model id in the Hugging Face cache",
            p,
        )
    else:
        _check(
            cfg.task == "synthetic" or bool(cfg.data.tokenizer_path),
            "data.tokenizer_path",
            "a tokenizer folder when model.init='scratch' and task='files'",
            cfg.data.tokenizer_path,
        )
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(cfg.model[key] > 0, f"model.{key}", "> 0", cfg.model[key])
        _check(cfg.model.architecture in ARCHITECTURES, "model.architecture", " | ".join(ARCHITECTURES),
               cfg.model.architecture)  # fmt: skip
        arch, moe = cfg.model.architecture, cfg.model.architecture in MIXTURES
        kind = "> 0 for a mixture of experts" if moe else "0 for a dense model"
        _check(cfg.model.num_experts > 0 if moe else cfg.model.num_experts == 0, "model.num_experts",
               f"{kind} (model.architecture={arch!r})", cfg.model.num_experts)  # fmt: skip
        if moe:
            _check(0 < cfg.model.experts_per_token <= cfg.model.num_experts, "model.experts_per_token",
                   f"in [1, num_experts={cfg.model.num_experts}]", cfg.model.experts_per_token)  # fmt: skip
        _check(
            cfg.model.num_heads % cfg.model.num_kv_heads == 0,
            "model.num_kv_heads",
            f"a divisor of num_heads ({cfg.model.num_heads})",
            cfg.model.num_kv_heads,
        )
    _check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "float32 | bfloat16", cfg.model.dtype)
    _check(cfg.moe.impl in MOE_IMPLS, "moe.impl", " | ".join(MOE_IMPLS), cfg.moe.impl)
    _check(isinstance(cfg.moe.freeze_router, bool), "moe.freeze_router", "true or false", cfg.moe.freeze_router)
    coef = cfg.moe.aux_loss_coef
    _check(coef == -1 or coef >= 0, "moe.aux_loss_coef", ">= 0, or -1 (the checkpoint's)", coef)
    impl, block = cfg.model.attention, cfg.model.attention_block
    _check(impl in ATTENTION, "model.attention", " | ".join(ATTENTION), impl)
    strategy = cfg.model.get("context_attention", "ring")
    _check(strategy in CONTEXT_ATTENTION, "model.context_attention", " | ".join(CONTEXT_ATTENTION), strategy)
    _check(isinstance(block, int) and block >= 8 and block % 8 == 0, "model.attention_block",
           "a multiple of 8 tokens", block)  # fmt: skip
    chunk = cfg.model.get("mlp_chunk", 0)
    _check(isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0, "model.mlp_chunk",
           "0 (the whole row) or a number of tokens >= 1", chunk)  # fmt: skip
    platform = jax.default_backend()
    _check(impl not in ("cudnn", "pallas") or platform == "gpu", "model.attention", f"{impl!r} on a GPU (a GPU "
           f"kernel; this run's platform is {platform}: use auto, einsum or blockwise)", impl)  # fmt: skip
    _check(
        impl != "cudnn" or not (cfg.data.packing or cfg.data.share_prompt),
        "model.attention",
        "'cudnn' with data.packing=False and data.share_prompt=False (cuDNN takes one sequence a row)",
        impl,
    )
    _check(
        impl != "pallas" or not cfg.data.share_prompt,
        "model.attention",
        "'pallas' with data.share_prompt=False (its flash kernel takes segments, not a shared prompt's branches)",
        impl,
    )
    _check(cfg.model.remat in REMAT_POLICIES, "model.remat", " | ".join(REMAT_POLICIES), cfg.model.remat)


def _check_objective(cfg) -> None:
    """``dpo.*`` (loss types and their coefficients), ``lora.*`` and ``reference.*``."""
    types = loss_types(cfg)
    for t in types:
        _check(t in LOSS_TYPES, "dpo.loss_type", f"types from {LOSS_TYPES} joined by '+'", cfg.dpo.loss_type)
    weights = tuple(cfg.dpo.loss_weights)
    _check(not weights or len(weights) == len(types), "dpo.loss_weights", f"() or {len(types)} weights", weights)
    for field, domain in hparams.direct_domains().items():  # one declaration each (PBT's bounds check reads it too)
        value = config_value(cfg, field)
        _check(value in domain, field, domain.describe(), value)
    lo = cfg.lora
    _check(isinstance(lo.rank, int) and lo.rank >= 0, "lora.rank", "an integer >= 0 (0: no adapters)", lo.rank)
    if lo.rank:
        _check(math.isfinite(lo.alpha) and lo.alpha > 0, "lora.alpha", "a number > 0", lo.alpha)
        try:
            lora_targets(lo.targets)
        except ValueError as e:
            _check(False, "lora.targets", str(e), lo.targets)
        _check(lo.base_dtype in ("float32", "bfloat16", "int8"), "lora.base_dtype", "float32 | bfloat16 | int8",
               lo.base_dtype)  # fmt: skip
    p = lo.dropout
    _check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1, "lora.dropout",
           "a number in [0, 1)", p)  # fmt: skip
    _check(not p or lo.rank, "lora.dropout", "0 without adapters (lora.rank = 0: there is no adapter to drop)", p)
    r = cfg.reference
    if r.get("hf_path", ""):
        _check((Path(r.hf_path) / "config.json").exists(), "reference.hf_path",
               "'' or a local Hugging Face folder with config.json", r.hf_path)  # fmt: skip
        _check(not r.sync, "reference.sync", "False with reference.hf_path (TR-DPO's reference starts as the policy)",
               r.sync)  # fmt: skip
        _check(not (lo.rank and r.mode == "frozen"), "reference.mode", "'cached' with reference.hf_path and "
               "lora.rank > 0 (a frozen LoRA reference is the base with the adapters off)", r.mode)  # fmt: skip
    if r.get("bema", False):
        _check(r.mode == "frozen", "reference.bema", "False with reference.mode='cached' (a cached reference cannot "
               "move): set --config.reference.mode=frozen", r.bema)  # fmt: skip
        _check(not r.sync, "reference.bema", "False with reference.sync (one moving reference: TR-DPO's or BEMA's)",
               r.bema)  # fmt: skip
        _check(not lo.rank, "reference.bema", "False with lora.rank > 0 (BEMA averages the full policy)", r.bema)
        _check(not r.get("hf_path", ""), "reference.bema", "False with reference.hf_path (BEMA's reference starts as "
               "the policy)", r.bema)  # fmt: skip
    if r.sync:
        _check(r.mode == "frozen", "reference.sync", "False with reference.mode='cached' (a cached reference cannot "
               "move): set --config.reference.mode=frozen", r.sync)  # fmt: skip
    d = cfg.dpo
    f = d.f_divergence_type
    _check(f in F_DIVERGENCES, "dpo.f_divergence_type", " | ".join(F_DIVERGENCES), f)
    if d.f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        _check(not bad, "dpo.loss_type", f"types from {sorted(F_DIVERGENCE_LOSS_TYPES)} with "
               f"dpo.f_divergence_type={d.f_divergence_type!r} (as in TRL)", d.loss_type)  # fmt: skip
    _check(isinstance(d.use_weighting, bool), "dpo.use_weighting", "True or False", d.use_weighting)
    _check(d.bco_delta in ("zero", "batch", "running"), "dpo.bco_delta", "zero | batch | running", d.bco_delta)
    _check("kto" not in types or types == ("kto",), "dpo.loss_type", "'kto' alone (unpaired data)", d.loss_type)
    if "kto" in types:
        _check(not d.use_soft_targets, "dpo.use_soft_targets", "False with kto (the labels are its targets)",
               d.use_soft_targets)  # fmt: skip
    sorted_types = [t for t in types if t in BATCH_LOSSES]
    _check(not (sorted_types and d.use_soft_targets), "dpo.use_soft_targets",
           f"False with loss type {sorted_types[0] if sorted_types else ''} (it sorts the batch: no per-pair "
           "targets)", d.use_soft_targets)  # fmt: skip
    seed = cfg.dpo.get("seed", -1)
    _check(isinstance(seed, int) and seed >= -1, "dpo.seed", "an integer >= 0, or -1 for the run's seed", seed)


def _check_online(cfg) -> None:
    """Online DPO samples new pairs every step: they need a reward, a reference computed in the step, and pairs."""
    if not rewards.spec(cfg):
        raise ConfigError("config.reward: rounds.online scores each step's samples: expected a reward function or "
                          "a reward model folder (the built-in task has its own)")  # fmt: skip
    if "kto" in loss_types(cfg):
        raise ConfigError("config.dpo.loss_type: rounds.online trains on best-vs-worst pairs: expected a pairwise "
                          "loss, not 'kto'")  # fmt: skip
    if needs_reference(cfg) and cfg.reference.mode != "frozen":
        raise ConfigError(f"config.reference.mode: rounds.online samples new pairs every step, whose reference "
                          f"log-probs cannot be cached: expected 'frozen', got {cfg.reference.mode!r}")  # fmt: skip
    if cfg.pbt.enabled:
        raise ConfigError("config.pbt.enabled: rounds.online runs one policy at a time, not a population")


def _check_mesh(cfg, num_devices: int, members: int) -> int:
    """``mesh.*`` against the devices of a member group; returns the data-parallel size."""
    expert = cfg.mesh.get("expert", 1)
    _check(isinstance(expert, int) and expert >= 1 and num_devices % expert == 0, "mesh.expert",
           f"a divisor of the {num_devices} devices", expert)  # fmt: skip
    num_devices //= expert
    context = cfg.mesh.get("context", 1)
    _check(isinstance(context, int) and context >= 1 and num_devices % context == 0, "mesh.context",
           f"a divisor of the {num_devices} devices" + (f" per member group ({members})" if members > 1 else "")
           + (f" per expert group ({expert})" if expert > 1 else ""), context)  # fmt: skip
    num_devices //= context
    mesh = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    _check(
        all(m == -1 or m >= 1 for m in mesh) and mesh.count(-1) <= 1,
        "mesh",
        "sizes >= 1 with at most one -1",
        dict(cfg.mesh),
    )
    known = math.prod(m for m in mesh if m != -1)
    _check(
        num_devices % known == 0 if -1 in mesh else known == num_devices,
        "mesh",
        f"data * fsdp * tensor = {num_devices} devices"
        + (f" per member group ({members})" if members > 1 else "")
        + (f" per expert group ({expert})" if expert > 1 else "")
        + (f" per context group ({context})" if context > 1 else ""),
        dict(cfg.mesh),
    )
    data_parallel = (num_devices // known if cfg.mesh.data == -1 else cfg.mesh.data) * (
        num_devices // known if cfg.mesh.fsdp == -1 else cfg.mesh.fsdp
    )
    return data_parallel * expert


def _check_schedules(cfg, data_parallel: int) -> None:
    """The stages' optimizers and batch sizes, eval, checkpoints, resume, logging, the reward, rounds, W&B."""
    _check(cfg.optim.grad_accum >= 1, "optim.grad_accum", ">= 1", cfg.optim.grad_accum)
    _check(isinstance(cfg.optim.steps, int) and 0 < cfg.optim.steps <= MAX_STEPS, "optim.steps",
           f"an integer in [1, {MAX_STEPS}]", cfg.optim.steps)  # fmt: skip
    _check(isinstance(cfg.sft.steps, int) and 0 <= cfg.sft.steps <= MAX_STEPS, "sft.steps",
           f"an integer in [0, {MAX_STEPS}] (0: no SFT stage)", cfg.sft.steps)  # fmt: skip
    for stage in ("sft", "optim"):
        s = cfg[stage]
        _check(s.learning_rate > 0, f"{stage}.learning_rate", "> 0", s.learning_rate)
        accum = cfg.optim.grad_accum if stage == "optim" else 1
        _check(
            s.batch_size > 0 and s.batch_size % (data_parallel * accum) == 0,
            f"{stage}.batch_size",
            f"a multiple of data-parallel size x grad_accum = {data_parallel} x {accum}",
            s.batch_size,
        )
    for stage in ("sft", "optim"):
        s = cfg[stage]
        kinds = ("cosine", "linear", "constant")
        _check(s.schedule in kinds, f"{stage}.schedule", " | ".join(kinds), s.schedule)
        _check(0 <= s.end_lr_fraction <= 1, f"{stage}.end_lr_fraction", "a number in [0, 1]", s.end_lr_fraction)
        _check(s.clip_norm >= 0, f"{stage}.clip_norm", ">= 0", s.clip_norm)
        _check(s.weight_decay >= 0, f"{stage}.weight_decay", ">= 0", s.weight_decay)
        _check(s.warmup_steps >= 0, f"{stage}.warmup_steps", ">= 0", s.warmup_steps)
        for b in ("b1", "b2"):
            _check(0 <= s[b] < 1, f"{stage}.{b}", "a number in [0, 1)", s[b])
    _check(cfg.reference.mode in ("cached", "frozen"), "reference.mode", "'cached' or 'frozen'", cfg.reference.mode)
    _check(cfg.eval.every > 0 and cfg.eval.batch_size > 0, "eval", "every > 0 and batch_size > 0", dict(cfg.eval))
    _check(
        cfg.eval.batch_size % data_parallel == 0,
        "eval.batch_size",
        f"a multiple of the data-parallel size {data_parallel}",
        cfg.eval.batch_size,
    )
    _check(
        cfg.checkpoint.every > 0 and cfg.checkpoint.keep >= 1,
        "checkpoint",
        "every > 0, keep >= 1",
        dict(cfg.checkpoint),
    )
    _check(cfg.checkpoint.reserve_mb >= 0, "checkpoint.reserve_mb", ">= 0", cfg.checkpoint.reserve_mb)
    for name in allowed_changes(cfg.resume.allow_changes):
        _check(
            name in CHANGEABLE_ON_RESUME,
            "resume.allow_changes",
            f"comma-separated fields from {', '.join(CHANGEABLE_ON_RESUME)}",
            name,
        )
    _check(cfg.log_every > 0, "log_every", "> 0", cfg.log_every)
    _check(cfg.reward_timeout_s > 0, "reward_timeout_s", "a number of seconds > 0", cfg.reward_timeout_s)
    if cfg.get("reward", ""):
        rewards.check(cfg.reward)
    if "rounds" in cfg:
        ro = cfg.rounds
        _check(isinstance(ro.num, int) and ro.num >= 1, "rounds.num", "an integer >= 1", ro.num)
        _check(isinstance(ro.samples, int) and ro.samples >= 2, "rounds.samples", "an integer >= 2", ro.samples)
        _check(isinstance(ro.prompts, int) and ro.prompts >= 0, "rounds.prompts", "an integer >= 0", ro.prompts)
        _check(ro.reference in ("keep", "refresh"), "rounds.reference", "'keep' or 'refresh'", ro.reference)
        _check(math.isfinite(ro.temperature) and ro.temperature > 0, "rounds.temperature", "a number > 0",
               ro.temperature)  # fmt: skip
        _check(isinstance(ro.max_new_tokens, int) and ro.max_new_tokens >= 0, "rounds.max_new_tokens",
               "an integer >= 0 (0: eval.max_new_tokens)", ro.max_new_tokens)  # fmt: skip
        _check(ro.cut_samples in ("score", "drop"), "rounds.cut_samples", "'score' or 'drop'", ro.cut_samples)
        _check(ro.sample_memory_mb > 0, "rounds.sample_memory_mb", "a number of MiB > 0", ro.sample_memory_mb)
        _check(isinstance(ro.get("online", False), bool), "rounds.online", "True or False", ro.get("online"))
        if online(cfg):
            _check_online(cfg)
    _check(
        cfg.wandb.mode in ("offline", "online", "disabled"), "wandb.mode", "offline | online | disabled", cfg.wandb.mode
    )
