"""OpenAI GPT-2 weights in Hugging Face format: load them into a GPT, export a GPT as them."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxgpt.errors import UserError, make_dir
from mlxgpt.hub import offline_unless_reachable
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.tokenizer import GPT2Tokenizer

GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# HF GPT-2 stores these as Conv1D weights, (in, out): the transpose of a Linear weight
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the causal-mask buffers of old HF checkpoints, which are not parameters
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# the conf/model/ entry with each checkpoint's sizes
MODEL_CONFIGS = {"gpt2": "gpt2_small", "gpt2-medium": "gpt2_medium", "gpt2-large": "gpt2_large", "gpt2-xl": "gpt2_xl"}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
RUN_FILES = ("state.json", "checkpoints", ".hydra")  # what marks an mlxgpt checkpoint or run directory
# the files AutoTokenizer reads: an export replaces those of the one it overwrites (a char model has none)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# config.json settings that change a GPT-2's outputs, at the only values our GPT computes (HF's defaults)
GPT2_SETTINGS = {"tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "layer_norm_epsilon": 1e-5}


def hf_to_mlxgpt(hf_weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF GPT-2 state dict -> our parameter names and Linear layout (lm_head dropped: tied to wte)."""
    params = {}
    for name, value in hf_weights.items():
        name = name.removeprefix("transformer.")
        if name.endswith(MASK_BUFFERS) or name.startswith("lm_head."):
            continue
        # row-contiguous like a freshly built model's weights, so matmuls round the same way
        params[name] = mx.contiguous(value.T) if name.endswith(CONV1D_WEIGHTS) else value
    return params


def mlxgpt_to_hf(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our parameters -> HF GPT2LMHeadModel state dict (`transformer.` prefix, Conv1D layout)."""
    return {
        "transformer." + name: value.T if name.endswith(CONV1D_WEIGHTS) else value for name, value in params.items()
    }


def _resolve(name_or_path: str, key: str = "init_from") -> tuple[Path, Path]:
    """Paths of config.json and model.safetensors for a GPT-2 name (HF hub or its cache) or a directory; `key` is the
    option that named it (init_from, or sample.py's checkpoint), which the offline advice sets."""
    how_offline = (
        "to use GPT-2 weights offline run `hf download gpt2 config.json model.safetensors --local-dir DIR` "
        f"(or gpt2-medium/-large/-xl) where there is network, copy DIR here and set {key}=DIR"
    )
    if name_or_path in GPT2_SIZES:
        offline_unless_reachable()
        from huggingface_hub import hf_hub_download

        try:
            return tuple(Path(hf_hub_download(repo_id=name_or_path, filename=f)) for f in (CONFIG_FILE, WEIGHTS_FILE))
        except OSError as e:  # no network and not cached, offline mode, HTTP errors
            raise UserError(
                f"cannot get {name_or_path} from the Hugging Face hub or its cache ({type(e).__name__}); {how_offline}"
            ) from e
    directory = Path(name_or_path)
    if not directory.is_dir():
        raise UserError(f"{name_or_path} is neither one of {', '.join(GPT2_SIZES)} nor a directory; {how_offline}")
    paths = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{directory} lacks {' and '.join(missing)}; use a Hugging Face GPT-2 dir ({how_offline})")
    return paths


def load_pretrained(name_or_path: str, model_config: GPTConfig | None = None,
                    key: str = "init_from") -> tuple[GPTConfig, dict[str, mx.array]]:
    """GPT-2 config and weights (our names) from a hub name or a local HF directory (named by the option `key`).

    model_config, when given, must have the checkpoint's n_layer/n_head/n_embd; its dropout is kept and
    a smaller block_size crops the position embeddings. vocab_size and bias come from the checkpoint.
    """
    config_path, weights_path = _resolve(name_or_path, key)
    hf = json.loads(config_path.read_text())
    _check_gpt2(hf, config_path)
    sizes = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], bias=True, **sizes)
    if model_config is not None:
        wanted = dict(n_layer=model_config.n_layer, n_head=model_config.n_head, n_embd=model_config.n_embd)
        if wanted != sizes:
            known = next((name for name, s in GPT2_SIZES.items() if s == sizes), None)
            fix = f"use model={MODEL_CONFIGS[known]}" if known else f"set the model sizes to {_sizes_text(sizes)}"
            raise UserError(
                f"the model config has {_sizes_text(wanted)} but {name_or_path} has {_sizes_text(sizes)}; "
                f"{fix} for init_from={name_or_path}"
            )
        if model_config.block_size > config.block_size:
            raise UserError(
                f"block_size={model_config.block_size} exceeds the {config.block_size} positions of {name_or_path}; "
                f"set model.block_size<={config.block_size}"
            )
        config = replace(config, block_size=model_config.block_size, dropout=model_config.dropout)
    try:
        params = hf_to_mlxgpt(mx.load(str(weights_path)))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read {weights_path} ({e}); download the weights again") from e
    params["wpe.weight"] = params["wpe.weight"][: config.block_size]
    return config, params


def _check_gpt2(hf: dict, config_path: Path) -> None:
    """UserError unless the HF config describes a GPT-2 that our GPT computes (tanh GELU, tied head, usual scaling)."""
    if hf.get("model_type") != "gpt2" or hf.get("activation_function", "gelu_new") not in TANH_GELUS:
        raise UserError(
            f"{config_path} describes model_type={hf.get('model_type')} activation={hf.get('activation_function')}, "
            "not a GPT-2 with tanh GELU; use an OpenAI GPT-2 checkpoint"
        )
    unlike = [f"{key}={json.dumps(hf[key])}" for key, value in GPT2_SETTINGS.items() if hf.get(key, value) != value]
    if unlike:
        expected = " ".join(f"{key}={json.dumps(value)}" for key, value in GPT2_SETTINGS.items())
        raise UserError(f"{config_path} has {' '.join(unlike)}; this GPT computes only GPT-2's {expected}: use a "
                        "checkpoint with those")


def _sizes_text(sizes: dict) -> str:
    return "n_layer={n_layer} n_head={n_head} n_embd={n_embd}".format(**sizes)


def export_hf(model: GPT, out_dir: str | Path, overwrite: bool = False, tokenizer_meta: dict | None = None,
              vocab_size: int | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that transformers loads as GPT2LMHeadModel; returns out_dir. A char
    model's vocabulary goes into config.json as `mlxgpt_tokenizer` (init_from=<that dir> tokenizes with it), a BPE
    model's tokenizer into GPT-2's vocab.json and merges.txt.
    vocab_size (the tokenizer's) leaves out a padded vocabulary's extra rows, which are no tokens (transformers would
    sample them)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; out= needs a directory")
    if any((out / name).exists() for name in RUN_FILES):
        raise UserError(f"{out} is an mlxgpt run or checkpoint directory: the export would replace its files; choose "
                        f"another out= directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another directory or pass overwrite=true")
    make_dir(out, "the out= directory", "choose another one")
    params = dict(tree_flatten(model.parameters()))
    vocab_size = vocab_size or model.config.vocab_size
    params["wte.weight"] = params["wte.weight"][:vocab_size]
    for name, weight in list(params.items()):  # HF GPT-2 always has biases: zeros keep a bias=False model exact
        bias_name = name.removesuffix("weight") + "bias"
        if name.endswith(".weight") and name not in ("wte.weight", "wpe.weight") and bias_name not in params:
            params[bias_name] = mx.zeros((weight.shape[0],), weight.dtype)
    cfg = model.config
    eos = 50256 if vocab_size > 50256 else None  # GPT-2 BPE's <|endoftext|>, when the vocab has it
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": str(model.wte.weight.dtype).removeprefix("mlx.core."),
    }
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    if tokenizer_meta and tokenizer_meta.get("name") == "char":
        hf_config["mlxgpt_tokenizer"] = tokenizer_meta
    if tokenizer_meta and tokenizer_meta.get("name") == "gpt2":  # AutoTokenizer.from_pretrained(out) gets GPT-2's BPE
        for name, text in GPT2Tokenizer().hf_files(cfg.block_size).items():
            (out / name).write_text(text + "\n", encoding="utf-8")
    mx.save_safetensors(str(out / WEIGHTS_FILE), mlxgpt_to_hf(params), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    return out


def is_pretrained(name_or_path: str | None) -> bool:
    """A GPT-2 hub name (gpt2, gpt2-medium, ...) or a Hugging Face GPT-2 directory, e.g. from `hf download gpt2`."""
    return bool(name_or_path) and (name_or_path in GPT2_SIZES or is_hf_dir(name_or_path))


def is_hf_dir(path: str | None) -> bool:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    return bool(path) and (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def pretrained_tokenizer_meta(name_or_path: str) -> dict:
    """The tokenizer of GPT-2 weights: an exported char model's characters, else GPT-2's own BPE."""
    chars = exported_char_vocabulary(name_or_path) if is_hf_dir(name_or_path) else None
    return {"name": "char", "chars": chars} if chars else {"name": "gpt2"}


def exported_char_vocabulary(path: str | Path) -> str | None:
    """The characters of a char model exported by export_hf (None for any other directory)."""
    config = Path(path) / CONFIG_FILE
    meta = json.loads(config.read_text()).get("mlxgpt_tokenizer") if config.is_file() else None
    return meta["chars"] if meta and meta.get("name") == "char" else None
