"""Fast BLAS for MLX's Linux CPU wheel, which bundles the slow netlib reference BLAS.

Loading a system OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported makes MLX's unversioned
`cblas_sgemm` bind to it (~30-60x faster fp32 matmul). `python -m mlxgpt.setup_blas --setup` installs it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import importlib.metadata
import os
import platform
import sys
import time

_STATE = {"path": None, "checked": False}
DEBIAN_PACKAGE = "libopenblas0-pthread"
HINT = f"install OpenBLAS (Debian/Ubuntu: sudo apt-get install {DEBIAN_PACKAGE}; Fedora: sudo dnf install openblas) or set MLXGPT_BLAS=/path/to/libopenblas.so"


def is_linux_cpu_wheel() -> bool:
    """True on Linux with MLX's CPU wheel (the only build that ships reference BLAS)."""
    if platform.system() != "Linux":
        return False
    try:
        importlib.metadata.distribution("mlx-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def find_openblas() -> str | None:
    """Path of an OpenBLAS shared library exporting cblas_sgemm, or None."""
    if os.environ.get("MLXGPT_BLAS"):
        return os.environ["MLXGPT_BLAS"]
    candidates = sorted(glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"))
    candidates += sorted(glob.glob("/usr/lib*/libopenblasp.so.0")) + sorted(glob.glob("/usr/lib*/libopenblas.so.0"))
    found = ctypes.util.find_library("openblas")
    if found:
        candidates.append(found)
    return next((c for c in candidates if os.path.exists(c) or not os.path.isabs(c)), None)


def use_fast_blas(recheck: bool = False) -> str | None:
    """Load OpenBLAS globally so MLX binds to it; returns its path (None when not needed/found)."""
    if (_STATE["checked"] and not recheck) or os.environ.get("MLXGPT_BLAS") == "reference":
        return _STATE["path"]
    _STATE["checked"] = True
    if not is_linux_cpu_wheel():
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS
    path = find_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        _STATE["path"] = path
    except OSError:
        _STATE["path"] = None
    return _STATE["path"]


def share_threads(parts: int) -> int | None:
    """Give each of `parts` concurrent callers an equal share of the cores as OpenBLAS threads (unless
    OPENBLAS_NUM_THREADS says otherwise); returns the threads per call, None where OpenBLAS is not in use."""
    if not _STATE["path"] or os.environ.get("OPENBLAS_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // parts)
    ctypes.CDLL(_STATE["path"]).openblas_set_num_threads(threads)  # the loaded library: no second copy
    return threads


@contextlib.contextmanager
def all_cores():
    """OpenBLAS on all cores inside the block (a peak measurement, another framework's step), as it was after."""
    before = ctypes.CDLL(_STATE["path"]).openblas_get_num_threads() if _STATE["path"] else None
    share_threads(1)
    try:
        yield
    finally:
        if before is not None:
            ctypes.CDLL(_STATE["path"]).openblas_set_num_threads(before)


def describe() -> str:
    """One line naming the BLAS the CPU backend uses."""
    if not is_linux_cpu_wheel():
        return "platform BLAS"
    return f"OpenBLAS ({_STATE['path']})" if _STATE["path"] else "reference BLAS (slow: " + HINT + ")"


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """Measured fp32 n x n matmul throughput of MLX's default device in GFLOP/s (on the CPU: all cores)."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    with all_cores():
        mx.eval(a @ b)
        start = time.perf_counter()
        for _ in range(reps):
            mx.eval(a @ b)
        return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
