"""The package's architecture in figures: modules per layer, import arrows between layers, arrows against the
layers (back-arrows), import circles between modules, and the import closure of the core.

    python experiments/layers.py [--root PATH]   # PATH: a checkout (default: this one)

A checkout from before the layer folders (flat modules) is read through ``FLAT``: the layer each flat module
went to, so the same layers are counted before and after. The layers are tests/test_layers.py's.
"""

import argparse
import ast
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

LAYERS = ["errors", "models", "core", "dpo_jax", "infra", "data", "config", "training", "research", "main"]
FRONT_DOOR = {"errors": "errors", "config": "config", "configs": "config", "main": "main", "__main__": "main"}
FLAT = {  # a flat module of the earlier layout -> the layer it went to
    **dict.fromkeys(("losses", "logprobs", "scoring", "hparams", "state", "step", "optim", "sampling"), "core"),
    **dict.fromkeys(("workdir", "checkpoint", "logging", "signals", "sharding", "hub", "hf", "xla_flags",
                     "throughput"), "infra"),
    **dict.fromkeys(("train", "loop", "builders", "inputs", "evaluate", "reference", "outputs", "runs"), "training"),
    **dict.fromkeys(("pbt", "sweep", "rounds", "best_of_n"), "research"),
    "lora": "models", "rewards": "data", "domains": "config",
}  # fmt: skip


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "dpo_jax"
    if parts[1:] == ["data", "batch"]:
        return "core"
    return FRONT_DOOR.get(parts[1]) or FLAT.get(parts[1]) or parts[1]


def graph(package: Path) -> dict[str, set[str]]:
    names = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}  # fmt: skip
    out = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dpo_jax")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo_jax"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                         for a in node.names}  # fmt: skip
        out[name] = deps & set(names)
    return out


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def closure(root: Path, module: str) -> list[str]:
    listed = "sorted(m for m in sys.modules if m.startswith('dpo_jax'))"
    code = f"import sys, json; import {module}; print(json.dumps({listed}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    root = Path(parser.parse_args().root)
    g = graph(root / "dpo_jax")
    rank = {n: i for i, n in enumerate(LAYERS)}
    arrows = Counter((layer(a), layer(b)) for a, deps in g.items() for b in deps if layer(a) != layer(b))
    back = sorted(f"{a} -> {b}" for a, deps in g.items() for b in deps if rank[layer(b)] > rank[layer(a)])
    print(f"{root}: {len(g)} modules; per layer: {dict(Counter(layer(m) for m in g))}")
    folders = sorted(p.name for p in (root / "dpo_jax").iterdir() if p.is_dir() and p.name != "__pycache__")
    print(f"folders under dpo_jax/: {folders}")
    print(f"arrows between layers: {len(arrows)} pairs, {sum(arrows.values())} imports; back-arrows: {len(back)}")
    for b in back:
        print(f"  back-arrow {b}")
    cs = circles(g)
    print(f"import circles: {len(cs)} {cs}")
    step = "dpo_jax.core.step" if (root / "dpo_jax/core/step.py").exists() else "dpo_jax.step"
    mods = closure(root, step)
    print(f"import {step} loads {len(mods)} dpo_jax modules; outside the core and models: "
          f"{[m for m in mods if layer(m) not in ('core', 'models', 'dpo_jax')]}")  # fmt: skip


if __name__ == "__main__":
    main()
