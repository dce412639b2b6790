"""Keep freed memory in the process (Linux, glibc), so that each batch reuses the last one's.

PyTorch allocates a CPU tensor's memory with ``malloc``. By default glibc gives large blocks back
to the kernel as soon as they are freed (blocks above the mmap threshold, and the top of the heap
above the trim threshold), so every batch page-faults its activations in again, zero-filled: about
300,000 faults per FGSM batch of sixteen 128 px slices with the plain U-Net, and a quarter of the
attack's time on a 2-core CPU (``benchmarks/bench_attack.py``). Raising both thresholds keeps the
process's peak and reuses it. PyTorch's CPU performance guide gets the same effect by preloading
jemalloc or tcmalloc; this needs no extra library.

The cost: the process keeps its peak memory until it exits instead of shrinking between batches.
The ``advseg`` command applies it at start; a library user calls :func:`keep_freed_memory`.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameters (malloc.h)."""

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: never trim in practice
TOP_PAD = 256 * 1024 * 1024  # grow the heap in large steps


def keep_freed_memory() -> bool:
    """Tune glibc's ``malloc`` to keep freed memory; return whether it was applied.

    Nothing is changed off Linux, on a C library without ``mallopt`` (musl), when the user set a
    ``MALLOC_*`` variable or a ``glibc.malloc`` tunable (their choice wins), or when another
    allocator is preloaded.
    """
    if not sys.platform.startswith("linux"):
        return False
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc")):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    settings = [
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
    ]
    return all(mallopt(param, value) == 1 for param, value in settings)
