"""Schedules follow nanoGPT's get_lr; decay groups put weight decay on >= 2-D parameters only; a training update
applies the schedule's lr to the clipped mean gradient of its micro-batches."""
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from omegaconf import OmegaConf

import mlxgpt  # noqa: F401  (fast BLAS before mlx)
from mlxgpt.bench import compose
from mlxgpt.optim import build_optimizer, build_schedule
from mlxgpt.task import build_trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


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


@pytest.mark.parametrize("compiled", [True, False])
def test_an_update_applies_the_clipped_mean_gradient_of_its_micro_batches(tmp_path, monkeypatch, compiled):
    """Plain SGD at a constant lr: the weights move by -lr x the micro-batches' mean gradient, clipped to grad_clip;
    the logged loss is their mean loss and the logged norm the mean gradient's before clipping."""
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    lr, clip = 0.1, 0.05
    cfg = compose(CONF, ["model=nano", "model.n_embd=32", "trainer.batch_size=2", "trainer.block_size=16",
                         "trainer.gradient_accumulation_steps=3", f"trainer.grad_clip={clip}",
                         f"trainer.compile={str(compiled).lower()}", "optimizer=sgd", "optimizer.momentum=0",
                         f"optimizer.lr={lr}", "schedule=constant", "logger=none"])
    (tmp_path / "run").mkdir()
    trainer = build_trainer(cfg, tmp_path / "run")
    model, loss_and_grad = trainer.model, nn.value_and_grad(trainer.model, trainer.model.loss)
    before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    micro = [loss_and_grad(*trainer._micro_batch(k, trainer.iter)) for k in range(3)]
    mean = {k: sum(np.array(g[k]) for g in (dict(tree_flatten(g)) for _, g in micro)) / 3 for k in before}
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in mean.values()))
    assert norm > clip  # the clipping is in play

    loss, logged_norm = trainer.train_step()
    assert loss == pytest.approx(sum(value.item() for value, _ in micro) / 3, rel=1e-5)
    assert logged_norm == pytest.approx(norm, rel=1e-4)
    after = dict(tree_flatten(model.trainable_parameters()))
    for k, w in before.items():
        np.testing.assert_allclose(np.array(after[k]), w - lr * clip / norm * mean[k], atol=1e-6, err_msg=k)
