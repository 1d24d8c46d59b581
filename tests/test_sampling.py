"""Sampling from a model whose vocabulary is padded past its tokenizer's (GPT-2's 50257 -> 50304, or a larger
model.vocab_size): the extra ids are no tokens, so neither sample.py nor the sample callback may draw them."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mlxgpt import checkpoint
from mlxgpt.callbacks.sample import SampleCallback
from mlxgpt.config import register_configs
from mlxgpt.data import load_data
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.optim import build_optimizer, build_schedule
from mlxgpt.sampling import sample
from mlxgpt.task import _build_model
from mlxgpt.tokenizer import CharTokenizer
from mlxgpt.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
PADDED = 64  # model ids CHARS' 30..63 are padding


def prefer_padding(model: GPT) -> None:
    """Make every prediction put nearly all probability on the padding ids (logit 32 there, ~0 elsewhere)."""
    model.ln_f.weight = mx.zeros_like(model.ln_f.weight)
    model.ln_f.bias = mx.ones_like(model.ln_f.bias)
    wte = np.array(model.wte.weight)
    wte[len(CHARS):] = 1.0
    model.wte.weight = mx.array(wte)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_py_draws_only_the_tokenizers_ids(tmp_path, temperature):
    mx.random.seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=PADDED, n_layer=1, n_head=2, n_embd=32))
    prefer_padding(model)
    state = {"iter": 1, "model_config": asdict(model.config), "tokenizer": CharTokenizer(CHARS).to_meta()}
    checkpoint.save_checkpoint(tmp_path, model.parameters(), {}, state)
    cfg = OmegaConf.create(dict(checkpoint=str(tmp_path), which="last", prompt="abc", num_samples=2, max_new_tokens=20,
                                temperature=temperature, top_k=None, seed=0, device="cpu", use_cache=True))
    texts = list(sample(cfg))
    assert [len(t) for t in texts] == [23, 23] and set("".join(texts)) <= set(CHARS)


def test_the_sample_callback_draws_only_the_tokenizers_ids(tmp_path):
    (tmp_path / "text.txt").write_text(CHARS * 20)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["model=nano", f"model.vocab_size={PADDED}", "data=text", "logger=none",
                                 f"data.path={tmp_path}/text.txt", f"paths.data_dir={tmp_path}/data"])
    data = load_data(cfg.data)
    model = _build_model(cfg, data.tokenizer)
    assert model.config.vocab_size == PADDED > data.tokenizer.vocab_size
    prefer_padding(model)
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, cfg.trainer.max_iters)
    trainer = Trainer(cfg, model, data, build_optimizer(cfg.optimizer, schedule), tmp_path / "run", [],
                      data.tokenizer)
    (tmp_path / "run").mkdir()
    text = SampleCallback(prompt="abc", max_new_tokens=20, temperature=1.0, top_k=None).sample(trainer)
    assert len(text) == 23 and set(text) <= set(CHARS)
