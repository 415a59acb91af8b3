"""Device mesh and parameter partition rules: the one place sharding is declared.

Mesh axes: ``member`` (the members of a population, K / member of them per device group), ``data`` (pure data
parallelism), ``fsdp`` (data parallelism with parameters sharded over it, ZeRO-3 style), ``expert`` (a
mixture's experts), ``context`` (a row's tokens: context parallelism, attention by ``models.context.ring_attention``)
and ``tensor`` (Megatron-style model parallelism of heads / MLP width / vocabulary). Batches are split over
``("data", "fsdp", "expert")`` and their token axis over ``context`` (and over ``member`` when members draw their own
batches); a population's state over ``member``. ``jax.jit``
with these ``NamedSharding``s is the modern ``pmap`` and spans hosts.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax.core.batch import ROWS
from dpo_jax.models.paths import path_str

MESH_AXES = ("member", "data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# (regex on the '/'-joined parameter path, spec of one layer's tensor). Kernels are [in, out].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head$", P("fsdp", "tensor")),  # [D, V]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),  # [D, out]
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),  # [in, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/bias$", P(None)),
    (r"(norm|layernorm)/weight$", P(None)),
    # a mixture of experts (dpo_jax.models.moe): experts [E, D, F] / [E, F, D] split over ``expert``, then as an
    # MLP's kernels; the router [D, E] as a column-parallel kernel with its few experts replicated
    (r"mlp/(gate_proj|up_proj)$", P("expert", "fsdp", "tensor")),
    (r"mlp/down_proj$", P("expert", "tensor", "fsdp")),
    (r"mlp/router$", P("fsdp", None)),
    # LoRA adapters (A [in, r], B [r, out]): the in / out axis as the projection's kernel, the rank replicated
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora/lora_a$", P("fsdp", None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora/lora_b$", P(None, "tensor")),
    (r"(o_proj|down_proj)/lora/lora_a$", P("tensor", None)),
    (r"(o_proj|down_proj)/lora/lora_b$", P(None, "fsdp")),
)
STACKED = re.compile(r"(^|/)layers/")  # parameters with a leading [L] axis


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None, member: int = 1,
    expert: int = 1, context: int = 1,
) -> Mesh:  # fmt: skip
    """A ``(member, data, fsdp, expert, context, tensor)`` mesh over all devices; one of data/fsdp/tensor may be -1
    (the rest). ``expert`` splits a mixture's experts (and, like data, the batch); ``context`` a row's tokens."""
    devices = list(jax.devices() if devices is None else devices)
    if member < 1 or len(devices) % member:
        raise ValueError(f"mesh: member={member} does not divide {len(devices)} devices")
    if expert < 1 or (len(devices) // member) % expert:
        raise ValueError(f"mesh: expert={expert} does not divide a member group's {len(devices) // member} devices")
    if context < 1 or (len(devices) // member // expert) % context:
        raise ValueError(f"mesh: context={context} does not divide a member group's {len(devices) // member} devices"
                         f" ({expert} expert groups)")  # fmt: skip
    devices_per_group = len(devices) // member // expert // context
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1; got {sizes}")
    known, group = int(np.prod([s for s in sizes if s != -1])), devices_per_group
    if -1 in sizes:
        if group % known:
            raise ValueError(f"mesh: {group} devices per member group are not divisible by {known} (sizes {sizes})")
        sizes[sizes.index(-1)] = group // known
    if int(np.prod(sizes)) != group:
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but a member group has "
                         f"{group * expert * context} devices ({expert} expert groups, context {context})")  # fmt: skip
    shape = [member, sizes[0], sizes[1], expert, context, sizes[2]]
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def member_axis_size(num_members: int, num_devices: int, data: int, fsdp: int, tensor: int) -> int:
    """``mesh.member = 0`` (auto): the largest divisor of K whose groups leave data/fsdp/tensor a valid split."""
    known = int(np.prod([s for s in (data, fsdp, tensor) if s != -1]))
    for m in range(min(num_members, num_devices), 0, -1):
        if num_members % m == 0 and num_devices % m == 0:
            group = num_devices // m
            if (group % known == 0) if -1 in (data, fsdp, tensor) else group == known:
                return m
    return 1


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of one parameter; an axis that does not divide its dimension is replicated."""
    spec = next((spec for pattern, spec in PARTITION_RULES if re.search(pattern, path)), None)
    if spec is None:
        raise ValueError(f"no partition rule matches parameter {path!r}; add one to PARTITION_RULES")
    axes = ((None,) if STACKED.search(path) else ()) + tuple(spec)
    axes = axes + (None,) * (len(shape) - len(axes))
    if len(axes) != len(shape):
        raise ValueError(f"partition rule for {path!r} has {len(axes)} axes; the parameter has shape {shape}")
    if mesh.shape.get("context", 1) > 1:  # the context axis's devices share the parameters out too (ZeRO-3 over both)
        axes = tuple(("fsdp", "context") if a == "fsdp" else a for a in axes)
    size = lambda a: math.prod(mesh.shape[x] for x in (a if isinstance(a, tuple) else (a,)))  # noqa: E731
    return P(*(a if a is None or dim % size(a) == 0 else None for a, dim in zip(axes, shape, strict=True)))


def param_shardings(tree, mesh: Mesh):
    """``NamedSharding`` for every array leaf of a parameter tree (an ``nnx.State`` or a pure dict)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_str(path), tuple(x.shape), mesh)), tree
    )


def tree_shardings(tree, mesh: Mesh, *, members: bool = False):
    """Shardings for a whole train state: arrays whose path matches a rule (parameters, and optimizer moments,
    whose paths end in the parameter's) follow it; everything else (steps, scalars, RNG keys) is replicated.
    ``members``: the tree has a leading [K] axis, split over ``member`` (replicated if that does not divide K)."""

    def one(path, x):
        p, shape = path_str(path), tuple(x.shape)
        lead = ()
        if members:
            lead, shape = ("member" if shape[0] % mesh.shape["member"] == 0 else None,), shape[1:]
        if len(shape) == 0 or not any(re.search(pattern, p) for pattern, _ in PARTITION_RULES):
            return NamedSharding(mesh, P(*lead))
        return NamedSharding(mesh, P(*lead, *spec_for(p, shape, mesh)))

    return jax.tree_util.tree_map_with_path(one, tree)


def fetch(x) -> np.ndarray:
    """The whole value of a global array on every process (it may span other hosts' devices)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def take_member(tree_K, k, mesh: Mesh):
    """Member ``k`` of a population tree ([K, ...] leaves), laid out like an ordinary run's (replicated over
    ``member``), on every device: what checkpoints, sampling and exports of one member take (across hosts too)."""
    leaves, treedef = jax.tree.flatten(tree_K)
    return _take_program(mesh, treedef, tuple((x.shape[1:], x.dtype) for x in leaves))(tree_K, k)


@functools.lru_cache(maxsize=32)
def _take_program(mesh: Mesh, treedef, shapes: tuple):
    """One jitted program per mesh and tree (``k`` is traced): compiled once, not at every eval and export."""
    one = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes])
    return jax.jit(lambda t, i: jax.tree.map(lambda x: x[i], t), out_shardings=tree_shardings(one, mesh))


def member_view(tree_K, k: int, shardings):
    """Member ``k`` of a population's [K, ...] tree without copying it, or None where that cannot be done: on a CPU,
    each device's shard holding every member is read in place (a NumPy view of the device buffer at ``k``, put back
    zero-copy) and the shards assembled with ``shardings`` (member k's, as ``tree_shardings`` gives them). Valid only
    until the population's buffers change (a donated step): a synchronous save reads it before then."""
    if jax.default_backend() != "cpu":
        return None
    leaves, treedef = jax.tree.flatten(tree_K)
    if not all(isinstance(x, jax.Array) and all(s.data.shape[0] == x.shape[0] for s in x.addressable_shards)
               for x in leaves):  # fmt: skip
        return None  # the member axis is split over devices: a device holds some members only
    out = []
    for x, sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
        parts = [jax.device_put(np.asarray(s.data)[k], s.device) for s in x.addressable_shards]
        out.append(jax.make_array_from_single_device_arrays(x.shape[1:], sh, parts))
    return jax.tree.unflatten(treedef, out)


def batch_sharding(mesh: Mesh, ndim: int = 2, *, members: bool = False, tokens: bool = False) -> NamedSharding:
    """Leading (batch) axis over ``data`` x ``fsdp`` x ``expert``; the rest replicated, but for ``tokens`` (the last
    axis is a row's tokens: ``..._xT`` arrays) the last axis over ``context``. ``members``: a leading [K] axis over
    ``member`` first."""
    lead = ("member",) if members else ()
    rest = [None] * (ndim - 1 - len(lead))
    if tokens and rest:
        rest[-1] = "context"
    return NamedSharding(mesh, P(*lead, BATCH_AXES, *rest))


def batch_shardings(mesh: Mesh, batch, *, members: bool = False):
    """``batch_sharding`` for every array of a batch pytree (a ``core.batch.Batch``): its token rows
    (``core.batch.ROWS``) have their token axis split over ``context``."""

    def one(path, x):
        name = getattr(path[-1], "name", None) if path else None
        return batch_sharding(mesh, x.ndim, members=members, tokens=name in ROWS)

    return jax.tree_util.tree_map_with_path(one, batch)


@functools.lru_cache(maxsize=32)
def batch_slice(mesh: Mesh) -> tuple[int, int]:
    """(index, count): which of ``count`` equal contiguous slices of a batch this process's devices hold. Usually
    (process index, process count); 1 slice when the processes differ only in members (each needs all of it)."""
    coords = {}  # process -> the batch-axis positions its devices hold
    # [M, data*fsdp*expert, context*tensor]: devices that differ in context or tensor only hold the same rows
    flat = np.asarray(mesh.devices).reshape(mesh.shape["member"], -1, mesh.shape["context"] * mesh.shape["tensor"])
    for pos in range(flat.shape[1]):
        for d in flat[:, pos, :].ravel():
            coords.setdefault(d.process_index, set()).add(pos)
    spans = sorted({(min(c), max(c) + 1) for c in coords.values()})
    width = spans[0][1] - spans[0][0]
    if any(hi - lo != width for lo, hi in spans) or any(len(c) != width for c in coords.values()):
        raise ValueError(f"mesh: processes hold uneven slices of the batch axes: {spans}")
    mine = coords[jax.process_index()]
    return spans.index((min(mine), max(mine) + 1)), len(spans)


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch is split over."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
