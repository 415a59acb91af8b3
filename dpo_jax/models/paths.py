"""Names of pytree paths, as the sharding rules, LoRA and the step's frozen-router mask match them."""

from __future__ import annotations

import jax


def path_str(path) -> str:
    """A pytree path as "layers/self_attn/q_proj/kernel" (variables' ``value`` keys left out, and the int8 values
    and scales of a ``qwix.QArray`` named as their weight, whose rule they follow)."""
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("qvalue", "scale"):
            continue
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name is not None and name != "value":
            keys.append(str(name))
    return "/".join(keys)
