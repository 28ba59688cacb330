"""CPU memory: freed large blocks stay with the process for reuse. torch has no caching allocator on the CPU (a GPU's
keeps its blocks), so each tensor comes from glibc's malloc, which maps every block above its mmap threshold (at most
32 MiB) afresh and returns it to the system when freed. A training step frees and allocates the same large blocks
every step (the stacked experts' gradients, ZeRO's flat buffers, Adam's temporaries), so every step the kernel faults
their pages in and zeroes them again. Raising the threshold (glibc's ``mallopt``, the same setting as the
``MALLOC_MMAP_THRESHOLD_`` variable) serves them from the heap, where freed memory is reused (docs/performance.md
measures the grouped MoE layer's step with and without it). The price is that the process's resident memory stays at
its peak, as a GPU's caching allocator's does."""

from __future__ import annotations

import ctypes
import os
from typing import Mapping, Optional

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
HEAP_BELOW = 2**31 - 1  # bytes (mallopt takes a C int): blocks up to 2 GiB come from the heap
NEVER_TRIM = -1  # mallopt(3): "-1 disables trimming completely"
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")  # set by the user: glibc has applied them already


def keep_freed_memory(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """On a CPU with glibc, serve large blocks from the heap and keep freed memory for reuse, unless the user set
    glibc's malloc variables; return the start-up line saying so. On a GPU, or without glibc, nothing changes
    (None)."""
    if torch.cuda.is_available():
        return None
    user_set = next((name for name in USER_VARIABLES if env.get(name, "").strip()), None)
    if user_set:
        return f"CPU memory: glibc's allocator as {user_set} sets it"
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    except (AttributeError, OSError):  # not glibc (musl, macOS): their allocators are left as they are
        return None
    if not (mallopt(M_MMAP_THRESHOLD, HEAP_BELOW) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        return None
    return ("CPU memory: freed blocks are kept for reuse, not returned to the system each step (set "
            "MALLOC_MMAP_THRESHOLD_ to choose)")
