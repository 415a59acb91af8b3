"""Runtime settings dpo_jax runs XLA:CPU with, applied before JAX starts its backend by the ``dpo-jax`` command,
``experiments/throughput.py`` and the tests; a setting the user already made is left as they made it. None changes
a value. A program that calls ``dpo_jax.training.train`` itself gets them by calling ``apply()`` before its first JAX
computation (later, the backend has read ``XLA_FLAGS`` and started its threads already)."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import MutableMapping

# XLA:CPU. Copy insertion with region analysis sees that AdamW's fused parameter update reads each moment before
# the moment's own update overwrites it in place, so it no longer copies both moments of every parameter (and ~30
# smaller buffers) each step: ~5% of the 32k-vocabulary step (experiments/throughput.py).
CPU_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)

# glibc malloc. XLA:CPU allocates a program's temporaries afresh on every call (~350 MB for the 32k-vocabulary
# step), from its worker threads. glibc serves a request that large with mmap and returns it with munmap, so every
# step faults in ~80k fresh zeroed pages (a quarter of the step on a 2-core host). One arena, no mmap and no
# trimming keep freed memory in the process to be reused: the step faults in nothing (the process keeps its peak).
MALLOC = {"arena_max": 1, "mmap_max": 0, "trim_threshold": -1}  # mallopt(3): a trim threshold of -1 never trims
_MALLOPT = {"trim_threshold": -1, "mmap_max": -4, "arena_max": -8}  # <malloc.h>: M_TRIM_THRESHOLD, ...


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
    """Add the flags the user has not set to ``environ["XLA_FLAGS"]``, and the malloc settings (``keep_memory``);
    returns ``XLA_FLAGS``."""
    keep_memory(environ)
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in current]
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return environ["XLA_FLAGS"]


def keep_memory(environ: MutableMapping[str, str] = os.environ) -> str:
    """``MALLOC`` for this process (``mallopt``, on Linux, when ``environ`` is ``os.environ``; it holds for threads
    started after it) and, through ``GLIBC_TUNABLES``, for the processes it starts; a ``glibc.malloc`` tunable the
    user set is kept. Returns ``GLIBC_TUNABLES``."""
    current = environ.get("GLIBC_TUNABLES", "")
    if environ.get("DPO_JAX_KEEP_MEMORY") == "0":  # glibc's defaults: memory back to the system, faulted in again
        return current
    mine = {k: v for k, v in MALLOC.items() if f"glibc.malloc.{k}=" not in current}
    environ["GLIBC_TUNABLES"] = ":".join(
        [*filter(None, [current]), *(f"glibc.malloc.{k}={v % 2**64}" for k, v in mine.items())]
    )
    if environ is os.environ and sys.platform == "linux":
        for k, v in mine.items():
            ctypes.CDLL(None).mallopt(_MALLOPT[k], v)
    return environ["GLIBC_TUNABLES"]


class _Mallinfo2(ctypes.Structure):  # <malloc.h> struct mallinfo2
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


RELEASE_AT_BYTES = 256 << 20


@functools.cache
def _glibc():
    """The C library with ``mallinfo2`` typed, loaded once (``release_memory`` runs after every step); None off
    Linux or before glibc 2.33."""
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    return libc


def release_memory(min_free: int = RELEASE_AT_BYTES, *, of_used: float = 0.0) -> int:
    """Give the pages of the heap's free blocks back to the system (``malloc_trim``) when it holds at least
    ``max(min_free, of_used x the bytes in use)`` free; returns the free bytes it found. ``MALLOC`` keeps freed
    memory for the next call of the same program, but a new program (a batch shape met for the first time), an
    eval's or sampling's programs rarely fit the blocks kept for the others: a 270M model's run held 7.0 GB free
    beside 4.3 GB in use in its second eval (``mallinfo2``), 12.2 GB resident where 5.5 GB was needed. The
    addresses stay; a later call faults in only the pages it touches. Called before such programs
    (``training.loop``, ``training.evaluate``) and, bounded by ``of_used``, after every step: a run whose programs
    fit their kept blocks (the 32k-vocabulary benchmark's) is not trimmed between steps."""
    libc = _glibc()
    if libc is None:
        return 0
    info = libc.mallinfo2()
    if info.fordblks >= max(min_free, int(of_used * info.uordblks)):
        libc.malloc_trim(0)
    return info.fordblks
