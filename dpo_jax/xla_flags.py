"""XLA flags dpo_jax runs with: added to ``XLA_FLAGS`` before JAX starts its backend by the ``dpo-jax`` command,
``experiments/throughput.py`` and the tests; a flag the user already set is left as they set it. None changes a
value. A program that calls ``dpo_jax.train`` itself gets them by calling ``apply()`` before its first JAX
computation (later, the backend has read ``XLA_FLAGS`` already)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# XLA:CPU. Copy insertion with region analysis sees that AdamW's fused parameter update reads each moment before
# the moment's own update overwrites it in place, so it no longer copies both moments of every parameter (and ~30
# smaller buffers) each step: ~5% of the 32k-vocabulary step (experiments/throughput.py).
CPU_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
    """Add the flags the user has not set to ``environ["XLA_FLAGS"]``; returns the result."""
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in current]
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return environ["XLA_FLAGS"]
