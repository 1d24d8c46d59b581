"""Load a trained model with its tokenizer from a checkpoint and generate text."""
from __future__ import annotations

import sys
from itertools import chain
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from mlxgpt import checkpoint, device
from mlxgpt.config import validate_sample
from mlxgpt.data.sources import read_utf8
from mlxgpt.errors import UserError
from mlxgpt.model import GPT, GPTConfig, cropped_prompt_warning
from mlxgpt.pretrained import is_pretrained, load_pretrained, pretrained_tokenizer_meta
from mlxgpt.tokenizer import tokenizer_from_meta
from mlxgpt.trainer import load_weights


def load_model(path: str | Path, which: str = "best"):
    """(model, tokenizer, state) from a run dir or checkpoint dir (`best` falls back to `last`); GPT-2 weights (a hub
    name or a Hugging Face directory) have no state (None)."""
    if is_pretrained(str(path)):
        config, weights = load_pretrained(str(path), key="checkpoint")
        model = GPT(config)
        load_weights(model, weights, path)
        model.eval()
        return model, tokenizer_from_meta(pretrained_tokenizer_meta(str(path))), None
    ckpt = checkpoint.resolve(path, "last") if which == "last" else checkpoint.resolve_best(path)
    state = checkpoint.read_state(ckpt)
    model = GPT(GPTConfig(**state["model_config"]))
    load_weights(model, checkpoint.load_arrays(ckpt, "model.safetensors", state), ckpt)
    model.eval()
    return model, tokenizer_from_meta(state["tokenizer"]), state


def sample(cfg) -> Iterator[Iterator[str]]:
    """Yield `cfg.num_samples` generations after `cfg.prompt` (FILE:path reads a file; a long one is cropped), each as
    its text's pieces: the whole prompt, then the text of each token as it is drawn (read each before the next)."""
    validate_sample(cfg)
    device.select_device(cfg.device, "device")
    model, tokenizer, _ = load_model(cfg.checkpoint, cfg.which)
    prompt = cfg.prompt
    if prompt.startswith("FILE:"):
        prompt_path = Path(prompt[5:]).expanduser()
        if not prompt_path.is_file():
            problem = "is not a file" if prompt_path.exists() else "does not exist"
            raise UserError(f"prompt file {prompt_path} {problem}; give an existing file as prompt=FILE:<path>")
        prompt = read_utf8(prompt_path, "give another prompt=FILE:<path>")
    ids = tokenizer.encode_prompt(prompt)
    cropped = cropped_prompt_warning(len(ids), model.config.block_size)
    if cropped:
        print(cropped, file=sys.stderr)
    mx.random.seed(cfg.seed)
    for _ in range(cfg.num_samples):
        out = model.generate(mx.array([ids]), cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             use_cache=cfg.use_cache, vocab_size=tokenizer.vocab_size)
        yield chain([prompt], tokenizer.decode_stream(out))
