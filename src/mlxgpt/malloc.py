"""Keep freed memory in the process for MLX's Linux CPU backend, whose arrays come straight from malloc.

glibc serves blocks over 32 MB with fresh mmaps and unmaps them on free, so every training step page-faults and
zeroes its activations again (a quarter of a step's time on nanoGPT's shakespeare_char config). Turning off mmap
and heap trimming lets the next step reuse the same memory; the process keeps its peak size, as a caching allocator.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

from mlxgpt.blas import is_linux_cpu_wheel

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc malloc.h


def keep_freed_memory() -> bool:
    """Tune glibc malloc for reuse (Linux CPU wheel only; MLXGPT_MALLOC=default leaves it); True when applied."""
    setting = os.environ.get("MLXGPT_MALLOC", "keep")
    if setting not in ("keep", "default"):
        print(f"mlxgpt: MLXGPT_MALLOC={setting!r} is neither keep nor default; using keep (unset it or fix the value)",
              file=sys.stderr)
    if setting == "default" or not is_linux_cpu_wheel() or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # -1 is SIZE_MAX as glibc's size_t threshold: never trim
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
