"""Local Hugging Face checkpoints: load a folder into a ``Decoder`` + tokenizer, and write one back.

A folder holds ``config.json``, ``model.safetensors`` (or shards with ``model.safetensors.index.json``),
``tokenizer.json`` and ``tokenizer_config.json``. Nothing is downloaded: ``path`` is a local directory.
Weights are mapped by name: torch ``[out, in]`` linear weights become ``[in, out]`` kernels, and per-layer
tensors are stacked on the leading ``[L]`` axis of the decoder's parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import safe_open
from tokenizers import Tokenizer

from dpo_jax.errors import MissingFileError, ModelError, one_line
from dpo_jax.infra.workdir import save_tensors, write_float32_tensors
from dpo_jax.models import lora
from dpo_jax.models.config import (
    ARCHITECTURES,
    CLASSIFIERS,
    FAMILIES,
    LORA_TARGETS,
    ModelConfig,
    fused_projections,
)
from dpo_jax.models.families import config_from_hf, config_to_hf
from dpo_jax.models.llama import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Entry:
    hf_name: str
    path: tuple[str, ...]  # into the decoder's pure state dict
    transpose: bool = False
    layer: int | None = None  # index on the stacked [L] axis
    expert: int | None = None  # index on a mixture's stacked [E] axis (after [L])
    rows: tuple[int, int] | None = None  # a fused tensor's slice [start, stop) of its first (torch out) axis


def _linear_entries(cfg: ModelConfig, prefix: str, i: int) -> list[_Entry]:
    """A layer's projections: Llama's names, or Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` split by rows."""
    attn = [("q_proj", cfg.qkv_bias), ("k_proj", cfg.qkv_bias), ("v_proj", cfg.qkv_bias), ("o_proj", cfg.o_bias)]
    mlp = (
        [] if cfg.num_experts else [("gate_proj", cfg.mlp_bias), ("up_proj", cfg.mlp_bias), ("down_proj", cfg.mlp_bias)]
    )
    fused = fused_projections(cfg)
    out = []
    for module, names in (("self_attn", attn), ("mlp", mlp)):
        for name, bias in names:
            path = ("layers", module, name)
            hf, rows = f"{module}.{name}", None
            if name in fused:
                hf, start, stop = fused[name]
                rows = (start, stop)
            out.append(_Entry(prefix + hf + ".weight", (*path, "kernel"), transpose=True, layer=i, rows=rows))
            if bias:
                out.append(_Entry(prefix + hf + ".bias", (*path, "bias"), layer=i, rows=rows))
    return out


def _expert_entries(cfg: ModelConfig, prefix: str, i: int) -> list[_Entry]:
    """A mixture's router and experts: Qwen3-MoE's ``mlp.gate`` / ``mlp.experts.{e}.*_proj``, Mixtral's
    ``block_sparse_moe.gate`` / ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down)."""
    family = FAMILIES[cfg.architecture]
    module, names = family.experts_module, dict(family.expert_names)
    out = [_Entry(f"{prefix}{module}.gate.weight", ("layers", "mlp", "router"), transpose=True, layer=i)]
    for x in range(cfg.num_experts):
        for ours, theirs in names.items():
            name = f"{prefix}{module}.experts.{x}.{theirs}.weight"
            out.append(_Entry(name, ("layers", "mlp", ours), transpose=True, layer=i, expert=x))
    return out


def weight_entries(cfg: ModelConfig) -> list[_Entry]:
    """Every Hugging Face tensor (or fused tensor's slice) of this config and where it lives in the decoder."""
    entries = [_Entry("model.embed_tokens.weight", ("embed_tokens",)), _Entry("model.norm.weight", ("norm", "weight"))]
    if not cfg.tie_word_embeddings:
        entries.append(_Entry("lm_head.weight", ("lm_head",), transpose=True))
    norms = {"pre": ("input_layernorm", "post_attention_layernorm"),
             "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
             "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                          "post_feedforward_layernorm")}[cfg.norm_layout]  # fmt: skip
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        for norm in norms:
            entries.append(_Entry(prefix + norm + ".weight", ("layers", norm, "weight"), layer=i))
        if cfg.qk_norm != "none":
            for norm in ("q_norm", "k_norm"):
                entries.append(
                    _Entry(f"{prefix}self_attn.{norm}.weight", ("layers", "self_attn", norm, "weight"), layer=i)
                )
        entries += _linear_entries(cfg, prefix, i)
        if cfg.num_experts:
            entries += _expert_entries(cfg, prefix, i)
    return entries


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"invalid {INDEX_FILE} in {path} ({one_line(e)}): expected a weight_map") from None
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.exists():
        raise MissingFileError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@contextlib.contextmanager
def _open_safetensors(file: Path):
    """``safe_open`` whose header and tensor errors (an invalid or truncated file) name the file."""
    try:
        with safe_open(file, framework="numpy") as f:
            yield f
    except (ModelError, MissingFileError):
        raise
    except Exception as e:  # SafetensorError and the OS errors of a truncated file
        raise ModelError(
            f"invalid or truncated safetensors file {file} ({one_line(e)[:160]}): re-copy or re-export the checkpoint"
        ) from None


def _read_tensors(files: dict[str, Path]) -> Iterator[tuple[str, Path, np.ndarray]]:
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if not file.exists():
            raise MissingFileError(f"missing weight shard {file}: listed in {INDEX_FILE}")
        with _open_safetensors(file) as f:
            for name in names:
                yield name, file, f.get_tensor(name)


def load_weights(path: str | os.PathLike, cfg: ModelConfig, *, besides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a folder's safetensors into the decoder's pure state dict (float32), checking names and shapes;
    ``besides``: tensors of the folder that are not the decoder's (a reward model's score head), left out."""
    path = Path(path)
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))[1])
    entries: dict[str, list[_Entry]] = {}
    for e in weight_entries(cfg):
        entries.setdefault(e.hf_name, []).append(e)
    files = _weight_files(path)
    missing = sorted(set(entries) - set(files))
    if missing:
        raise ModelError(
            f"missing tensors in {path}: {missing[:8]}{' ...' if len(missing) > 8 else ''}; expected every tensor of "
            f"a {cfg.architecture} with this config.json"
        )
    out = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract)
    unexpected = []
    for name, file, tensor in _read_tensors(files):
        if name in besides:
            continue
        if name not in entries:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # a tied head saved anyway: the embedding is the source of truth
            if not name.endswith(_IGNORED_SUFFIXES):
                unexpected.append(name)
            continue
        for entry in entries[name]:
            _place(out, entry, np.asarray(tensor, np.float32), file)
    if unexpected:
        raise ModelError(f"unexpected tensors in {path}: {sorted(unexpected)[:8]}; expected a {cfg.architecture}")
    return out


def _place(out: dict, entry: _Entry, value: np.ndarray, file: Path) -> None:
    """Write one tensor (or its slice) into the pure state dict, checking its shape."""
    if entry.rows is not None:
        if value.shape[0] < entry.rows[1]:
            raise ModelError(f"{file.name}: tensor {entry.hf_name} has {value.shape[0]} rows; config.json implies "
                             f"at least {entry.rows[1]}")  # fmt: skip
        value = value[entry.rows[0] : entry.rows[1]]
    value = value.T if entry.transpose else value
    target = out
    for key in entry.path[:-1]:
        target = target[key]
    leaf = target[entry.path[-1]]
    index = tuple(i for i in (entry.layer, entry.expert) if i is not None)
    expected = leaf.shape[len(index) :]
    if value.shape != expected:
        stored = tuple(reversed(value.shape)) if entry.transpose else value.shape
        want = tuple(reversed(expected)) if entry.transpose else expected
        raise ModelError(f"{file.name}: tensor {entry.hf_name} has shape {stored}; config.json implies {want}")
    if index:
        leaf[index] = value
    else:
        target[entry.path[-1]] = value


def _config_json(path: str | os.PathLike, what: str = "model") -> tuple[Path, dict[str, Any]]:
    """A local folder's ``config.json`` (its path and contents); one line naming it when missing or not JSON."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise MissingFileError(f"no config.json in {path}: expected a local Hugging Face {what} folder")
    try:
        return file, json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}: not valid JSON (line {e.lineno}): {e.msg}") from None


def _decoder(cfg: ModelConfig, weights: dict[str, Any]) -> Decoder:
    """The decoder of ``cfg`` holding ``weights`` (``load_weights``' pure state dict)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, weights))
    return nnx.merge(graphdef, state)


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    file, hf = _config_json(path)
    try:
        return config_from_hf(hf, where=str(file), **overrides)
    except (ValueError, TypeError, KeyError) as e:
        if "not supported" in str(e) and "architectures" in str(e):
            raise ModelError(str(e)) from None
        raise ModelError(f"{file}: {one_line(e).split(': ', 1)[-1]}; supported: {', '.join(ARCHITECTURES)}") from None


def load_pretrained(path: str | os.PathLike, **overrides) -> tuple[Decoder, HFTokenizer | None]:
    """The decoder (float32 parameters) and tokenizer of a local folder; ``overrides`` set e.g. dtype, remat."""
    cfg = load_config(path, **overrides)
    tokenizer = HFTokenizer.from_folder(path) if (Path(path) / "tokenizer.json").exists() else None
    return _decoder(cfg, load_weights(path, cfg)), tokenizer


SCORE = "score.weight"  # a *ForSequenceClassification's head: [num_labels, hidden]


def reward_model_config(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, dict[str, Path]]:
    """The decoder config of a local ``*ForSequenceClassification`` folder (a reward model) of a family we load,
    and its tensors' files, checked without reading a weight (``ModelError`` naming the file otherwise)."""
    path = Path(path)
    file, hf = _config_json(path, "reward model")
    archs = hf.get("architectures") or []
    arch = next((CLASSIFIERS[a] for a in archs if a in CLASSIFIERS), None)
    if arch is None:
        raise ModelError(f"{file}: architectures {archs} are not a reward model we load; expected one of "
                         f"{', '.join(CLASSIFIERS)}")  # fmt: skip
    if hf.get("pad_token_id") is None:
        raise ModelError(f"{file}: no pad_token_id; a reward model scores the last token that is not padding")
    try:
        cfg = config_from_hf({**hf, "architectures": [arch]}, where=str(file),
                             **{"tie_word_embeddings": True, **overrides})  # fmt: skip  # no LM head
    except (ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{file}: {one_line(e).split(': ', 1)[-1]}") from None
    files = _weight_files(path)
    if SCORE not in files:
        raise ModelError(f"missing tensors in {path}: ['{SCORE}']; expected a {archs[0]}'s score head")
    return cfg, files


def load_reward_model(path: str | os.PathLike, **overrides) -> tuple[Decoder, np.ndarray, HFTokenizer | None]:
    """A local reward model folder (``reward_model_config``): its decoder (no LM head), its score head
    [num_labels, D] (float32) and its tokenizer."""
    path = Path(path)
    cfg, files = reward_model_config(path, **overrides)
    score = next(t for name, _, t in _read_tensors({SCORE: files[SCORE]}) if name == SCORE)
    if score.ndim != 2 or score.shape[1] != cfg.hidden_size:
        raise ModelError(f"{path}: tensor {SCORE} has shape {score.shape}; config.json implies (num_labels, "
                         f"{cfg.hidden_size})")  # fmt: skip
    decoder = _decoder(cfg, load_weights(path, cfg, besides=(SCORE, "lm_head.weight")))
    tokenizer = HFTokenizer.from_folder(path) if (path / "tokenizer.json").exists() else None
    return decoder, np.asarray(score, np.float32), tokenizer


def _export_parts(model: Decoder) -> dict[str, list[tuple[Any, _Entry]]]:
    """Each Hugging Face tensor's parts: the decoder leaf (not yet read) and the entry that says which slice."""
    pure = nnx.to_pure_dict(nnx.state(model))
    parts: dict[str, list[tuple[Any, _Entry]]] = {}
    for e in weight_entries(model.config):
        leaf = pure
        for key in e.path:
            leaf = leaf[key]
        parts.setdefault(e.hf_name, []).append((leaf, e))
    return parts


def _part_shape(leaf: Any, e: _Entry) -> tuple[int, ...]:
    shape = tuple(leaf.shape[sum(i is not None for i in (e.layer, e.expert)) :])
    return shape[::-1] if e.transpose else shape


def _tensor_shape(parts: list[tuple[Any, _Entry]]) -> tuple[int, ...]:
    shapes = [_part_shape(leaf, e) for leaf, e in parts]
    return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]


def _tensor_value(parts: list[tuple[Any, _Entry]]) -> np.ndarray:
    """One tensor in torch layout, float32: only its own layer's (and expert's) slice is read off the device."""
    values = []
    for leaf, e in parts:
        index = tuple(i for i in (e.layer, e.expert) if i is not None)
        value = np.asarray(jax.device_get(leaf[index] if index else leaf), np.float32)
        values.append(value.T if e.transpose else value)
    return np.ascontiguousarray(np.concatenate(values) if len(values) > 1 else values[0])


def export_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The decoder's parameters under Hugging Face names, torch layout, float32 (all in memory at once:
    ``save_pretrained`` streams them to disk instead)."""
    return {name: _tensor_value(parts) for name, parts in _export_parts(model).items()}


def save_pretrained(
    model: Decoder, path: str | os.PathLike, tokenizer: HFTokenizer | None = None, *, max_shard_bytes: int = 5 << 30
) -> Path:
    """Write a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads (config and tokenizer too).
    Tensors are converted and written one at a time: the export needs at most one tensor's float32 copy beside
    the model (a 262k-vocabulary embedding: 671 MB, not the whole model's 1-3 GB)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    parts = _export_parts(model)
    shapes = {name: _tensor_shape(p) for name, p in parts.items()}
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    files = [SINGLE_FILE] if len(shards) == 1 else [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                                     for k in range(1, len(shards) + 1)]  # fmt: skip
    for file, shard in zip(files, shards, strict=True):
        write_float32_tensors(path / file, shard, lambda name: _tensor_value(parts[name]))
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name in shard}
        total = sum(4 * math.prod(shape) for shape in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)
    return path


@dataclasses.dataclass
class HFTokenizer:
    """A folder's ``tokenizer.json`` (Hugging Face ``tokenizers``) with its special tokens and chat template."""

    tokenizer: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str | None]  # bos_token, eos_token, pad_token, unk_token
    chat_template: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rest of tokenizer_config.json

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> HFTokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise MissingFileError(f"no tokenizer.json in {path}: expected a Hugging Face (fast) tokenizer folder")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exceptions for invalid files
            raise ModelError(f"invalid tokenizer.json in {path} ({one_line(e)[:160]}): re-save the tokenizer") from None
        cfg_file = path / "tokenizer_config.json"
        try:
            config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        except ValueError as e:
            raise ModelError(f"{cfg_file}: not valid JSON ({one_line(e)}); expected the tokenizer's settings") from None
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            special[key] = value.get("content") if isinstance(value, dict) else value
        template = config.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.exists():
            template = jinja.read_text()
        rest = {k: v for k, v in config.items() if k not in (*special, "chat_template")}
        return cls(tok, special, template, rest)

    def token_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self):
        return self.token_id("bos_token")

    @property
    def eos_token_id(self):
        return self.token_id("eos_token")

    @property
    def pad_token_id(self):
        return self.token_id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """Render the chat template as ``transformers`` does (sandboxed Jinja, trim/lstrip blocks)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja)")

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        config = {**self.config, **{k: v for k, v in self.special_tokens.items() if v is not None}}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- LoRA adapters in PEFT's format ---------------------------------------------------------------------------


def fused_parts(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """A fused family's projections: ours -> (its fused module's name, first row, last row + 1)."""
    return {ours: (module.split(".")[-1], a, b) for ours, (module, a, b) in fused_projections(cfg).items()}


def peft_modules(cfg: ModelConfig) -> dict[str, list[str]]:
    """PEFT's target module -> our adapted projections in it (more than one: a fused module's parts, in row order)."""
    fused = fused_parts(cfg)
    out: dict[str, list[str]] = {}
    for name in (n for n in LORA_TARGETS if n in cfg.lora_targets):
        out.setdefault(fused[name][0] if name in fused else name, []).append(name)
    return out


def peft_tensors(adapters: nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's tensor names and torch layout for the adapters of a (non-stacked-member) model. A fused module's
    parts become one adapter of rank r x parts: A stacked, B block-diagonal (``save_peft`` scales alpha alike)."""
    pure = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), nnx.to_pure_dict(adapters))
    found = {path[-1]: (path, lin["lora"]) for path, lin in lora.adapted(pure)}
    fused, r = fused_parts(cfg), cfg.lora_rank
    tensors = {}
    for module, parts in peft_modules(cfg).items():
        group = found[parts[0]][0][1]  # self_attn | mlp
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{group}.{module}"
            a = np.concatenate([found[p][1]["lora_a"][i].T for p in parts])  # [r * parts, in]
            if parts[0] not in fused:
                b = found[parts[0]][1]["lora_b"][i].T
            else:
                rows = max(fused[p][2] for p in fused if fused[p][0] == module)
                b = np.zeros((rows, r * len(parts)), np.float32)
                for j, p in enumerate(parts):
                    b[fused[p][1] : fused[p][2], j * r : (j + 1) * r] = found[p][1]["lora_b"][i].T
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
    return tensors


def save_peft(adapters: nnx.State, cfg: ModelConfig, path, *, base_model: str = "") -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors``: what ``peft.PeftModel.from_pretrained`` loads onto
    the base."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules = peft_modules(cfg)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(modules),
        "rank_pattern": {m: cfg.lora_rank * len(p) for m, p in modules.items() if len(p) > 1},
        "alpha_pattern": {m: cfg.lora_alpha * len(p) for m, p in modules.items() if len(p) > 1},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tensors(peft_tensors(adapters, cfg), path / "adapter_model.safetensors")
    return path
