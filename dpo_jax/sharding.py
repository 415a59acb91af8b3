"""Device mesh and parameter partition rules: the one place sharding is declared.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters sharded over it, ZeRO-3
style) and ``tensor`` (Megatron-style model parallelism of heads / MLP width / vocabulary). Batches are split
over ``("data", "fsdp")``. ``jax.jit`` with these ``NamedSharding``s is the modern ``pmap`` and spans hosts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the '/'-joined parameter path, spec of one layer's tensor). Kernels are [in, out].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head$", P("fsdp", "tensor")),  # [D, V]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),  # [D, out]
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),  # [in, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/bias$", P(None)),
    (r"(norm|layernorm)/weight$", P(None)),
)
STACKED = re.compile(r"(^|/)layers/")  # parameters with a leading [L] axis


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1; got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} (sizes {sizes})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _path_str(path) -> str:
    keys = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name is not None and name != "value":
            keys.append(str(name))
    return "/".join(keys)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of one parameter; an axis that does not divide its dimension is replicated."""
    spec = next((spec for pattern, spec in PARTITION_RULES if re.search(pattern, path)), None)
    if spec is None:
        raise ValueError(f"no partition rule matches parameter {path!r}; add one to PARTITION_RULES")
    axes = ((None,) if STACKED.search(path) else ()) + tuple(spec)
    axes = axes + (None,) * (len(shape) - len(axes))
    if len(axes) != len(shape):
        raise ValueError(f"partition rule for {path!r} has {len(axes)} axes; the parameter has shape {shape}")
    return P(*(a if a is None or dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape, strict=True)))


def param_shardings(tree, mesh: Mesh):
    """``NamedSharding`` for every array leaf of a parameter tree (an ``nnx.State`` or a pure dict)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(_path_str(path), tuple(x.shape), mesh)), tree
    )


def tree_shardings(tree, mesh: Mesh):
    """Shardings for a whole train state: arrays whose path matches a rule (parameters, and optimizer moments,
    whose paths end in the parameter's) follow it; everything else (steps, scalars, RNG keys) is replicated."""

    def one(path, x):
        p = _path_str(path)
        if getattr(x, "ndim", 0) == 0 or not any(re.search(pattern, p) for pattern, _ in PARTITION_RULES):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(p, tuple(x.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch is split over."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
