"""Adds tokens/s, MFU and peak memory to every log event (runs before the callbacks that consume them)."""
from __future__ import annotations

import mlx.core as mx

from mlxgpt import device
from mlxgpt.callbacks.base import Callback


class ThroughputCallback(Callback):
    priority = 0

    def __init__(self):
        self.peak_flops = None
        self.flops_per_iter = 0

    def needs_state(self, trainer, iteration: int) -> bool:
        return False  # its step events only log

    def on_train_start(self, trainer) -> None:
        peak = device.peak_flops(trainer.cfg.trainer.dtype)
        self.peak_flops = peak * trainer.world if peak else None  # every rank has its own device
        self.flops_per_iter = trainer.model.flops_per_token(trainer.block_size) * trainer.tokens_per_iter

    def on_log(self, trainer, logs) -> None:
        dt = logs["dt_s"]
        logs["tok_per_s"] = trainer.tokens_per_iter / dt
        logs["mfu"] = self.flops_per_iter / dt / self.peak_flops if self.peak_flops else None
        logs["memory_gb"] = mx.get_peak_memory() / 1e9
