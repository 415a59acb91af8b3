"""The package's layers: every import points down (or sideways), and the core imports no config, file system, hub,
reward or data-format code. Read from the source (ast) and from a fresh interpreter's sys.modules."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_jax"
# Lowest first: a module may import its own layer and those listed before it. errors is a leaf every layer may
# raise; the package's __init__ re-exports the core's public names.
LAYERS = ["errors", "models", "core", "dpo_jax", "infra", "data", "config", "training", "research", "main"]
FRONT_DOOR = {"errors": "errors", "config": "config", "configs": "config", "main": "main", "__main__": "main"}


def layer(module: str) -> str:
    """``dpo_jax.core.step`` -> "core"; ``dpo_jax.config`` -> "config"; ``dpo_jax`` -> "dpo_jax"."""
    parts = module.split(".")
    if len(parts) == 1:
        return "dpo_jax"
    return FRONT_DOOR.get(parts[1], parts[1])


def source_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def imported(path: Path) -> set[str]:
    """The dpo_jax modules a file imports (``from dpo_jax.x import y``: x.y when that is a module, else x)."""
    mods = source_modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dpo_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in mods else node.module)
    return found


def test_every_module_is_in_a_layer_and_every_import_points_down():
    mods = source_modules()
    assert {layer(m) for m in mods} <= set(LAYERS), sorted({layer(m) for m in mods} - set(LAYERS))
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"{m} ({layer(m)}) imports {dep} ({layer(dep)})"
        for m, path in mods.items()
        for dep in sorted(imported(path))
        if rank[layer(dep)] > rank[layer(m)]
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
    # the test can fail: an upward import is seen (the checker reads what it is shown)
    assert rank[layer("dpo_jax.training.train")] > rank[layer("dpo_jax.core.step")]


def test_the_layer_folders_are_what_the_readme_maps():
    readme = (PACKAGE.parent / "README.md").read_text()
    for folder in ("core", "models", "infra", "data", "training", "research"):
        assert (PACKAGE / folder / "__init__.py").exists()
        assert f"`dpo_jax/{folder}/`" in readme, f"README's module map lacks dpo_jax/{folder}/"
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "config.py", "errors.py", "main.py"], flat


@pytest.mark.parametrize("module", ["dpo_jax.core.step", "dpo_jax.core.sampling", "dpo_jax"])
def test_importing_the_core_loads_no_config_files_hub_rewards_or_data_formats(module):
    code = (
        f"import sys, json; import {module}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('dpo_jax', 'pyarrow', 'huggingface_hub', "
        "'wandb', 'ml_collections', 'orbax', 'tokenizers', 'safetensors')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    loaded = json.loads(out.stdout.splitlines()[-1])
    outside = [m for m in loaded if m != "dpo_jax" and layer(m) not in ("core", "models")]
    assert not outside, f"import {module} loads {outside}"
    assert "dpo_jax.core.losses" in loaded  # what it should load, it does
