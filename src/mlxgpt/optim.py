"""Optimizer and learning-rate schedule builders (nanoGPT semantics: decay groups, warmup, cosine/linear/WSD)."""
from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim

Schedule = Callable[[mx.array], mx.array]


def build_schedule(cfg, lr: float, max_iters: int) -> Schedule:
    """lr(step) with step = number of updates done so far (MLX evaluates it before incrementing)."""
    warmup = cfg.warmup_iters
    decay_iters = cfg.decay_iters or max_iters
    min_lr = lr * cfg.min_lr_ratio
    stable_until = decay_iters * (1.0 - cfg.decay_fraction) if cfg.name == "wsd" else warmup

    def schedule(step: mx.array) -> mx.array:
        step = mx.array(step).astype(mx.float32)
        warm = lr * (step + 1) / (warmup + 1)
        start = max(warmup, stable_until)
        progress = mx.clip((step - start) / max(1.0, decay_iters - start), 0.0, 1.0)
        if cfg.name == "cosine":
            after = min_lr + 0.5 * (1.0 + mx.cos(math.pi * progress)) * (lr - min_lr)
        elif cfg.name in ("linear", "wsd"):
            after = lr + (min_lr - lr) * progress
        else:  # constant
            after = mx.array(lr, dtype=mx.float32)
        return mx.where(step < warmup, warm, after)

    return schedule


def build_optimizer(cfg, schedule: Schedule) -> optim.Optimizer:
    """AdamW/Adam/SGD; weight decay only on >= 2-D parameters (matmuls, embeddings), as nanoGPT."""
    betas = list(cfg.betas)
    if cfg.name == "adam" and cfg.weight_decay == 0:
        return optim.Adam(schedule, betas=betas, eps=cfg.eps, bias_correction=True)

    def make(weight_decay: float) -> optim.Optimizer:
        if cfg.name == "sgd":
            return optim.SGD(schedule, momentum=cfg.momentum, weight_decay=weight_decay, nesterov=cfg.nesterov)
        return optim.AdamW(schedule, betas=betas, eps=cfg.eps, weight_decay=weight_decay, bias_correction=True)

    if cfg.name == "sgd" and cfg.weight_decay == 0:  # one group, whose state earlier SGD checkpoints hold
        return make(0.0)
    return optim.MultiOptimizer([make(cfg.weight_decay), make(0.0)], [lambda path, p: p.ndim >= 2])
