"""The config: loading files, one-line errors naming the field, the hyper-parameters' declarations and the model
families' records that validation, the sweep, PBT and the resume check read."""

import dataclasses
import inspect
import math
import re
import sys

import pytest
from dpo_jax.configs.default import get_config as default_config
from helpers import ROOT, tiny_config

from dpo_jax.config import CHANGEABLE_ON_RESUME, ConfigError, config_value, load_config_file, validate
from dpo_jax.core.hparams import DECLARED, PERTURBABLE, HParams, direct_domains, resume_fields
from dpo_jax.core.losses import preference_loss
from dpo_jax.infra.workdir import flatten
from dpo_jax.models.config import FAMILIES, MIXTURES
from dpo_jax.research.sweep import VECTOR_KEYS


@pytest.mark.parametrize(
    "override,field",
    [("dpo.beta=0.0", "dpo.beta"), ("dpo.label_smoothing=0.5", "dpo.label_smoothing"),
     ('dpo.loss_type="dpo"', "dpo.loss_type"), ("optim.batch_size=12", "optim.batch_size"),
     ('task="files"', "data.train_path"), ('model.init="hf"', "task"), ("mesh.tensor=3", "mesh"),
     ('model.hf_path="/models/x"', "task"), ('data.train_path="x.jsonl"', "task"),
     (('task="files"', 'model.hf_path="/models/x"'), "model.hf_path"),
     ("optim.learning_rate=Infinity", "optim.learning_rate"), ("dpo.beta=NaN", "dpo.beta"),
     ("optim.steps=-5", r"optim.steps: expected an integer in \[1"), ("optim.steps=3000000000", "optim.steps"),
     ("optim.grad_accum=3", "optim.batch_size"), ("dpo.soft_target_temperature=0.0", "dpo.soft_target_temperature"),
     ("dpo.seed=-2", "dpo.seed"), ('dpo.f_divergence_type="kl"', "dpo.f_divergence_type"),
     (('dpo.loss_type="nca_pair"', 'dpo.f_divergence_type="js_divergence"'), "dpo.loss_type"),
     ("dpo.ld_alpha=1.5", "dpo.ld_alpha"), ("dpo.discopop_tau=0.0", "dpo.discopop_tau"),
     ('dpo.bco_delta="mean"', "dpo.bco_delta"), ('dpo.loss_type="kto+sft"', "dpo.loss_type"),
     (('dpo.loss_type="aot"', "dpo.use_soft_targets=True"), "dpo.use_soft_targets"),
     (('dpo.loss_type="kto"', "dpo.undesirable_weight=-1.0"), "dpo.undesirable_weight"),
     ("reference.sync=True", "reference.sync"),
     (('reference.mode="frozen"', "reference.sync=True", "reference.ref_model_mixup_alpha=0.0"),
      "reference.ref_model_mixup_alpha"),
     ("moe.aux_loss_coef=0.5", "moe.aux_loss_coef: set .* dense"), ("moe.freeze_router=True", "moe.freeze_router"),
     ('moe.impl="dense"', "moe.impl: set"),
     (('model.architecture="MixtralForCausalLM"', "model.num_experts=4", "moe.aux_loss_coef=-2.0"),
      r"moe.aux_loss_coef: expected >= 0, or -1"),
     ('model.architecture="MixtralForCausalLM"', "model.num_experts: expected > 0 .*MixtralForCausalLM"),
     ("model.num_experts=4", "model.num_experts: expected 0 for a dense model .*LlamaForCausalLM"),
     ('model.attention="pallas"', "model.attention: expected 'pallas' on a GPU .*this run's platform is cpu"),
     ('model.attention="cudnn"', "model.attention: expected 'cudnn' on a GPU"),
     ("data.max_shapes=1000000000", r"data.max_shapes: expected an integer in \[0, 64\]")],
)  # fmt: skip
def test_config_errors_name_the_field(override, field):
    cfg = tiny_config(*((override,) if isinstance(override, str) else override))
    with pytest.raises(ConfigError, match=rf"config\.{field}"):
        validate(cfg, num_devices=8)


def test_hf_local_lora_variants_take_a_lora_sized_learning_rate():
    rate = {
        a: load_config_file(str(ROOT / f"configs/hf_local.py{a}")).optim.learning_rate
        for a in ("", ":cpu,lora", ":lora")
    }
    assert rate[":lora"] == rate[":cpu,lora"] == pytest.approx(50 * rate[""])
    assert load_config_file(str(ROOT / "configs/hf_local.py:lora")).lora.rank == 16
    with pytest.raises(ValueError, match="unknown argument 'gpu'"):
        load_config_file(str(ROOT / "configs/hf_local.py:gpu"))


def test_configs_are_a_package_and_loading_one_leaves_sys_path_alone():

    from dpo_jax.config import load_config_module

    before = list(sys.path)
    module, arg = load_config_module(str(ROOT / "configs/beta_sweep.py:runlocal"))
    assert module.__name__ == "dpo_jax.configs.beta_sweep" and arg == "runlocal" and sys.path == before
    cpu = load_config_file(str(ROOT / "configs/hf_local.py:cpu"))
    assert cpu.model.dtype == "float32" and cpu.optim.steps == 20 and cpu.data.max_length == 256
    assert cpu.model.remat == "full"  # a 262k vocabulary at remat=none does not fit 24 GB, dots_no_batch is 2.5x full


# --- One declaration per hyper-parameter, one record per model family -------------------------------------------


def test_every_traced_hyper_parameter_is_declared_once_and_its_facts_hold():
    assert list(DECLARED) == [f.name for f in dataclasses.fields(HParams)]
    cfg = default_config()
    loss_params = set(inspect.signature(preference_loss).parameters)
    for name, h in DECLARED.items():
        for field in h.fields:
            config_value(cfg, field)  # a field the config has (KeyError otherwise)
        if h.domain is not None and not h.derived:
            assert config_value(cfg, h.fields[0]) in h.domain, (name, "its default lies outside its domain")
        if h.loss_kwarg:
            assert name in loss_params, f"{name}: preference_loss takes no such argument"
        if h.perturbable:
            lo, hi = cfg.pbt[f"{name}_bounds"]
            assert h.domain is not None and lo in h.domain and hi in h.domain, name
    assert set(PERTURBABLE) == {k.removesuffix("_bounds") for k in cfg.pbt if k.endswith("_bounds")}


def test_the_sweep_the_resume_check_and_validation_read_the_declarations():
    flat = flatten(default_config().to_dict())
    assert set(VECTOR_KEYS) == {f for h in DECLARED.values() for f in h.fields} | {"dpo.seed"}
    assert set(VECTOR_KEYS) <= set(flat)
    assert set(resume_fields()) <= set(CHANGEABLE_ON_RESUME)
    assert {"dpo.beta", "dpo.label_smoothing", "optim.learning_rate"} <= set(resume_fields())


def _outside(domain):
    """A value just outside ``domain`` (or not finite, for an unbounded one)."""
    if domain.low > -math.inf:
        return domain.low if domain.low_open else domain.low - 1
    return math.nan


@pytest.mark.parametrize("field", sorted(direct_domains()))
def test_validation_refuses_a_value_outside_each_declared_domain(field):
    domain = direct_domains()[field]
    cfg = tiny_config()
    section, key = field.split(".")
    value = _outside(domain)
    cfg[section][key] = int(value) if domain.integer and math.isfinite(value) else value
    with pytest.raises(ConfigError, match=rf"config\.{re.escape(field)}: expected {re.escape(domain.describe())}"):
        validate(cfg, num_devices=8)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_each_family_record_agrees_with_transformers(arch):
    """transformers (an independent oracle) names the same model type, and has experts exactly in a mixture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    family = FAMILIES[arch]
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family.model_type] == arch
    hf = AutoConfig.for_model(family.model_type)
    experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
    assert bool(experts) == family.mixture == (arch in MIXTURES)
    if family.mixture:
        assert hasattr(hf, family.expert_width)
    assert (getattr(hf, "tie_word_embeddings", False) is True) == family.tied_by_default
