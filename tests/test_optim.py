"""Schedules follow nanoGPT's get_lr; decay groups put weight decay on >= 2-D parameters only."""
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map
from omegaconf import OmegaConf

import mlxgpt  # noqa: F401  (fast BLAS before mlx)
from mlxgpt.optim import build_optimizer, build_schedule


def nanogpt_lr(it, lr=6e-4, warmup=100, decay=2000, min_lr=6e-5):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def sched(**kw):
    base = dict(name="cosine", warmup_iters=100, decay_iters=2000, min_lr_ratio=0.1, decay_fraction=0.2)
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("it", [0, 1, 50, 99, 100, 101, 500, 1999, 2000, 2001, 5000])
def test_cosine_matches_nanogpt(it):
    assert build_schedule(sched(), 6e-4, 2000)(mx.array(it)).item() == pytest.approx(nanogpt_lr(it), rel=1e-5)


def test_constant_linear_wsd_shapes():
    const = build_schedule(sched(name="constant", warmup_iters=0), 1e-3, 100)
    assert const(mx.array(0)).item() == pytest.approx(1e-3) and const(mx.array(99)).item() == pytest.approx(1e-3)
    lin = build_schedule(sched(name="linear", warmup_iters=0, decay_iters=100, min_lr_ratio=0.0), 1e-3, 100)
    assert lin(mx.array(50)).item() == pytest.approx(5e-4, rel=1e-4) and lin(mx.array(100)).item() == 0
    wsd = build_schedule(sched(name="wsd", warmup_iters=10, decay_iters=100, min_lr_ratio=0.0), 1e-3, 100)
    assert wsd(mx.array(50)).item() == pytest.approx(1e-3)  # stable phase
    assert wsd(mx.array(90)).item() == pytest.approx(5e-4, rel=1e-4)  # halfway through the last 20%
    assert wsd(mx.array(5)).item() == pytest.approx(1e-3 * 6 / 11)  # warmup


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_only_on_matrices(name):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    cfg = OmegaConf.create(dict(name=name, lr=0.1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.5, momentum=0.9,
                                nesterov=False))
    opt = build_optimizer(cfg, lambda step: mx.array(0.1))
    before = dict(tree_flatten(model.parameters()))
    zeros = tree_map(mx.zeros_like, model.parameters())
    opt.update(model, zeros)  # zero gradient: only weight decay moves parameters (SGD: its first momentum is wd * p)
    after = dict(tree_flatten(model.parameters()))
    assert mx.allclose(after["layers.0.weight"], before["layers.0.weight"] * (1 - 0.1 * 0.5)).item()
    for key in ("layers.0.bias", "layers.1.weight", "layers.1.bias"):
        assert mx.array_equal(after[key], before[key]).item()


def test_adamw_is_bias_corrected():
    """The first step moves a parameter by ~lr * sign(grad)."""
    model = nn.Linear(1, 1, bias=False)
    cfg = OmegaConf.create(dict(name="adamw", lr=0.1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0))
    opt = build_optimizer(cfg, lambda step: mx.array(0.1))
    w0 = model.weight.item()
    opt.update(model, {"weight": mx.array([[0.3]])})
    assert w0 - model.weight.item() == pytest.approx(0.1, rel=1e-4)
