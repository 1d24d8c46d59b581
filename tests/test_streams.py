"""trainer.cpu_streams: a batch's parts computed concurrently on CPU streams train as the whole batch on one stream."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlx.utils import tree_flatten

from mlxgpt import blas
from mlxgpt.config import register_configs, validate
from mlxgpt.data import load_data
from mlxgpt.errors import UserError
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.optim import build_optimizer, build_schedule
from mlxgpt.trainer import StreamSplit, Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["model=nano", "model.n_embd=32", "trainer.batch_size=4", "trainer.block_size=16", "logger=none"]


def config(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", TINY + overrides)
    validate(cfg)
    return cfg


def train(tmp_path: Path, overrides: list[str], steps: int = 4) -> tuple[list[float], dict]:
    """Losses of `steps` training iterations from a fixed init, and the final weights."""
    cfg = config(overrides)
    data = load_data(cfg.data)
    mx.random.seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=data.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          dropout=cfg.model.dropout))
    schedule = build_schedule(cfg.schedule, 3e-3, cfg.trainer.max_iters)
    trainer = Trainer(cfg, model, data, build_optimizer(cfg.optimizer, schedule), tmp_path, [],
                      data.tokenizer)
    assert trainer.streams == cfg.trainer.cpu_streams
    assert isinstance(trainer._grads, StreamSplit) == (trainer.streams > 1)  # the parts path is the one under test
    start = {name: np.array(w) for name, w in tree_flatten(model.parameters())}
    losses = []
    for it in range(10, 10 + steps):  # past the warm-up: non-zero learning rates
        trainer.iter = it
        losses.append(trainer.train_step()[0])
    weights = dict(tree_flatten(model.parameters()))
    assert all(np.abs(np.array(w) - start[name]).max() > 1e-4 for name, w in weights.items())  # every one is trained
    return losses, weights


@pytest.mark.parametrize("path", [[], ["trainer.gradient_accumulation_steps=2", "trainer.on_nan=skip"]],
                         ids=["fused step", "accumulation"])
def test_two_streams_train_as_one(tmp_path, monkeypatch, path):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    one, weights_one = train(tmp_path, path + ["trainer.cpu_streams=1"])
    two, weights_two = train(tmp_path, path + ["trainer.cpu_streams=2"])
    assert two == pytest.approx(one, rel=1e-5)
    for name, w in weights_one.items():
        np.testing.assert_allclose(np.array(weights_two[name]), np.array(w), atol=2e-5, err_msg=name)


def test_two_streams_with_dropout_are_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    runs = [train(tmp_path, ["model.dropout=0.3", "trainer.cpu_streams=2"])[0] for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] != train(tmp_path, ["model.dropout=0.3", "trainer.cpu_streams=1"])[0]  # the masks are drawn


def test_the_parts_run_on_distinct_streams():
    seen = []

    def part(x, y):
        seen.append(mx.default_stream(mx.cpu))
        return x.sum(), {"g": y}

    split = StreamSplit(part, 2, lambda f: f)
    x, y = mx.arange(8.0).reshape(4, 2), mx.arange(4.0)
    loss, grads = split(x, y)
    assert seen == split.streams and seen[0] != seen[1]
    assert loss.item() == pytest.approx(float(x.sum()) / 2) and grads["g"].tolist() == [1.0, 2.0]  # mean of parts


def test_cpu_streams_must_divide_the_batch():
    with pytest.raises(UserError, match=r"invalid trainer.cpu_streams=3: must divide trainer.batch_size=4"):
        config(["trainer.cpu_streams=3"])
    with pytest.raises(UserError, match=r"invalid trainer.cpu_streams=0: must be >= 1"):
        config(["trainer.cpu_streams=0"])


@pytest.mark.skipif(not blas.use_fast_blas(), reason="OpenBLAS is not in use (only MLX's Linux CPU wheel needs it)")
def test_streams_share_the_cores_as_openblas_threads(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    import ctypes

    openblas = ctypes.CDLL(blas.use_fast_blas())
    cores = len(os.sched_getaffinity(0))
    try:
        assert blas.share_threads(2) == max(1, cores // 2) == openblas.openblas_get_num_threads()
        with blas.all_cores():  # e.g. the peak sgemm for MFU: measured on all cores, whatever the streams took
            assert openblas.openblas_get_num_threads() == cores
        assert openblas.openblas_get_num_threads() == max(1, cores // 2)
    finally:
        assert blas.share_threads(1) == cores == openblas.openblas_get_num_threads()
