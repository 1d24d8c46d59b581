"""Device selection (Apple GPU, NVIDIA GPU, CPU), a one-line description, and peak FLOP/s for MFU."""
from __future__ import annotations

import os
import platform
import socket
import zlib

import mlx.core as mx

from mlxgpt import blas
from mlxgpt.errors import UserError

# Dense fp32 / bf16 peak TFLOP/s per Apple GPU (approximate public figures; fp32 == bf16 on Apple GPUs).
APPLE_TFLOPS = {
    "M1": 2.6, "M1 Pro": 5.2, "M1 Max": 10.4, "M1 Ultra": 21.0,
    "M2": 3.6, "M2 Pro": 6.8, "M2 Max": 13.6, "M2 Ultra": 27.2,
    "M3": 4.1, "M3 Pro": 7.4, "M3 Max": 16.4, "M3 Ultra": 28.2,
    "M4": 4.3, "M4 Pro": 9.2, "M4 Max": 18.4,
}
# NVIDIA dense peak TFLOP/s: (fp32 non-tensor, bf16 tensor core).
NVIDIA_TFLOPS = {
    "H200": (67.0, 989.0), "H100 PCIe": (51.0, 756.0), "H100": (67.0, 989.0), "A100": (19.5, 312.0), "L40S": (91.6, 362.0),
    "L4": (30.3, 121.0), "A10": (31.2, 125.0), "RTX 4090": (82.6, 165.2), "RTX 3090": (35.6, 71.0),
}


def choose_device(name: str, key: str = "trainer.device") -> mx.Device:
    """The device `auto|gpu|cpu` names; `gpu` without one is a UserError naming the option `key`."""
    has_gpu = mx.is_available(mx.gpu)
    if name == "gpu" and not has_gpu:
        raise UserError(f"{key}=gpu but no GPU is available to MLX (Metal on a Mac, or mlx[cuda12] on NVIDIA); "
                        f"use {key}=auto or cpu")
    return mx.gpu if (name == "gpu" or (name == "auto" and has_gpu)) else mx.cpu


def select_device(name: str, key: str = "trainer.device") -> mx.Device:
    """Make `auto|gpu|cpu` the default device (see choose_device)."""
    device = choose_device(name, key)
    mx.set_default_device(device)
    if device == mx.gpu and mx.metal.is_available():
        # As MLX recommends for large models: wire up to the recommended working set so weights stay resident.
        limit = mx.device_info().get("max_recommended_working_set_size")
        if limit:
            mx.set_wired_limit(limit)
    return device


def memory_bytes(device: mx.Device) -> int | None:
    """Memory of `device`: a GPU's as MLX reports it (Metal: the unified memory; CUDA: the card's), else the machine's
    RAM (None where neither is known)."""
    memory = reported_memory(mx.device_info(device))
    if memory:
        return int(memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # a platform without these names (Windows: no os.sysconf)
        return None


def ranks_sharing_memory(device: mx.Device) -> int:
    """How many processes of this run (mlx.launch ranks) share `device`'s memory: those on this machine, unless it is
    a CUDA GPU (each rank has its own). A collective: every rank calls it."""
    group = mx.distributed.init()
    if group.size() == 1 or (device == mx.gpu and not mx.metal.is_available()):
        return 1
    host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
    hosts = mx.distributed.all_gather(mx.array([host], dtype=mx.int32), group=group)
    return int(mx.sum(hosts == host).item())


def reported_memory(device_info: dict) -> int | None:
    """The memory in an `mx.device_info()`: Metal's unified memory, or a CUDA card's (none for the CPU)."""
    return device_info.get("memory_size") or device_info.get("total_memory")


def on_cpu() -> bool:
    """True when MLX computes on the CPU (inside mx.compile: decided when the function is traced)."""
    return mx.default_device() == mx.cpu


def backend() -> str:
    """metal | cuda | cpu for the current default device."""
    if on_cpu():
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def info() -> dict:
    """Backend, chip/GPU name, memory in GB and the BLAS in use (CPU)."""
    raw = mx.device_info()
    name = raw.get("device_name") or raw.get("architecture") or platform.processor() or "unknown"
    memory = reported_memory(raw)
    out = {"backend": backend(), "name": str(name), "memory_gb": round(memory / 1e9, 1) if memory else None}
    if out["backend"] == "cpu":
        out["blas"] = blas.describe()
    return out


def describe() -> str:
    i = info()
    mem = f", {i['memory_gb']} GB" if i["memory_gb"] else ""
    extra = f", {i['blas']}" if "blas" in i else ""
    return f"{i['backend']} ({i['name']}{mem}{extra})"


def peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of the current device for MFU: spec tables on GPUs, a measured fp32 sgemm on CPU."""
    i = info()
    if i["backend"] == "cpu":
        return blas.matmul_gflops(n=1024, reps=3) * 1e9
    if i["backend"] == "metal":
        chip = i["name"].replace("Apple ", "")
        tflops = APPLE_TFLOPS.get(chip)
        return tflops * 1e12 if tflops else None
    for key, (fp32, bf16) in NVIDIA_TFLOPS.items():
        if key in i["name"]:
            return (fp32 if dtype == "float32" else bf16) * 1e12
    return None
