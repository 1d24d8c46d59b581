"""Precision: mixed precision computes in bfloat16 from float32 master weights (checked on the CPU, where it is only
slow); a run asking for it on the CPU trains in float32 and says so."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from hydra import compose, initialize_config_dir
from mlx.utils import tree_flatten

from mlxgpt.config import register_configs
from mlxgpt.data import load_data
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.optim import build_optimizer, build_schedule
from mlxgpt.pretrained import export_hf
from mlxgpt.task import build_trainer
from mlxgpt.trainer import Trainer, mixed_precision_loss

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def dtypes(tree) -> set:
    return {a.dtype for _, a in tree_flatten(tree)}


def test_forward_runs_in_bfloat16_and_gradients_come_back_float32():
    mx.random.seed(0)
    model = GPT(TINY)
    x, y = mx.random.randint(0, 50, (2, 16)), mx.random.randint(0, 50, (2, 16))
    loss, grads = nn.value_and_grad(model, mixed_precision_loss(model, mx.bfloat16))(x, y)
    assert dtypes(grads) == {mx.float32} and dtypes(model.parameters()) == {mx.float32} and loss.dtype == mx.float32

    half = GPT(TINY)
    half.update(model.parameters())
    half.set_dtype(mx.bfloat16)
    assert mx.allclose(loss, half.loss(x, y), rtol=1e-6)  # what a bfloat16 model computes...
    assert abs(loss.item() - model.loss(x, y).item()) > 1e-5  # ...which is not the float32 loss


def test_a_bfloat16_training_step_updates_float32_master_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["model=nano", "model.n_embd=32", "trainer.batch_size=2", "trainer.block_size=16",
                                 "trainer.dtype=bfloat16", "logger=none"])
    data = load_data(cfg.data)
    mx.random.seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=data.vocab_size, n_layer=2, n_head=2, n_embd=32))
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, cfg.trainer.max_iters)
    trainer = Trainer(cfg, model, data, build_optimizer(cfg.optimizer, schedule), tmp_path, [], data.tokenizer)
    before = model.parameters()["h"][0]["mlp"]["c_fc"]["weight"]
    trainer.iter = 10  # past the warm-up: a non-zero learning rate
    loss, norm = trainer.train_step()
    after = model.parameters()["h"][0]["mlp"]["c_fc"]["weight"]
    assert loss > 0 and norm > 0 and not mx.array_equal(before, after)
    assert dtypes(model.parameters()) == {mx.float32} and dtypes(trainer.optimizer.state) <= {mx.float32, mx.uint64}


def test_half_precision_pretrained_weights_become_float32_master_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    chars = "abcdefgh \n"
    (tmp_path / "text.txt").write_text(chars * 50)
    mx.random.seed(0)
    half = GPT(GPTConfig(block_size=16, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32))
    half.set_dtype(mx.float16)  # as a Hugging Face checkpoint saved in float16
    export_hf(half, tmp_path / "hf", tokenizer_meta={"name": "char", "chars": chars})
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["model=nano", "model.n_embd=32", "model.block_size=16", "trainer.batch_size=2",
                                 f"init_from={tmp_path}/hf", "data=text", f"data.path={tmp_path}/text.txt",
                                 "logger=none"])
    trainer = build_trainer(cfg, tmp_path / "run")
    assert dtypes(trainer.model.parameters()) == {mx.float32}
    assert mx.array_equal(trainer.model.wte.weight, half.wte.weight.astype(mx.float32))
    trainer.iter = 10
    trainer.train_step()
    assert dtypes(trainer.model.parameters()) == {mx.float32}
    assert dtypes(trainer.optimizer.state) <= {mx.float32, mx.uint64}


def test_a_bfloat16_run_on_the_cpu_trains_in_float32_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["model=nano", "model.n_embd=32", "trainer.batch_size=2", "trainer.block_size=16",
                                 "trainer.dtype=bfloat16", "trainer.device=cpu", "logger=none"])
    trainer = build_trainer(cfg, tmp_path / "run")
    assert "trainer.dtype=bfloat16 is slow on the CPU" in caplog.text and cfg.trainer.dtype == "float32"  # recorded
    float32_loss = trainer.model.loss(*trainer._micro_batch(0, trainer.iter)).item()
    assert trainer.train_step()[0] == pytest.approx(float32_loss, rel=1e-6)  # bfloat16 differs from the 5th digit
