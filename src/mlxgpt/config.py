"""Typed schemas for every config group (registered in Hydra's ConfigStore) and range checks."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from mlxgpt.errors import UserError


@dataclass
class ModelConfig:
    name: str = "mini"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: Optional[int] = None  # None: the data's tokenizer vocab (GPT-2 BPE padded to a multiple of 64)
    dropout: float = 0.0
    bias: bool = True


@dataclass
class DataConfig:
    name: str = "pydoc"
    source: str = "pydoc"  # pydoc | url | text | hf
    tokenizer: str = "char"  # char | gpt2
    chars: Optional[str] = None  # char tokenizer: a fixed vocabulary (None: the corpus' own; init_from a char run sets it)
    path: Optional[str] = None  # local file/dir/glob, local copy of the url file, or a saved HF dataset dir
    url: Optional[str] = None
    sha256: Optional[str] = None
    val_fraction: float = 0.1  # single-text corpora: the last 10% is validation (as nanoGPT)
    hf_path: Optional[str] = None  # HF hub id, or a builder ("parquet", "json") with data_files
    hf_name: Optional[str] = None
    hf_revision: Optional[str] = None
    hf_split: str = "train"
    data_files: Optional[Any] = None
    text_column: str = "text"
    val_size: float = 0.0005  # HF corpora: fraction of documents held out (nanoGPT: 0.0005, seed 2357)
    split_seed: int = 2357
    num_proc: Optional[int] = None  # None: all cores
    streaming: bool = False
    shard_tokens: int = 100_000_000
    max_documents: Optional[int] = None
    cache_dir: str = "${paths.data_dir}"


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 6e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to >= 2-D parameters only (matmul weights, embeddings)
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | constant | linear | wsd
    warmup_iters: int = 100
    decay_iters: Optional[int] = None  # None: trainer.max_iters
    min_lr_ratio: float = 0.1  # floor as a fraction of optimizer.lr (nanoGPT: min_lr = lr / 10)
    decay_fraction: float = 0.2  # wsd: the last fraction of decay_iters decays linearly to the floor


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | gpu | cpu
    max_iters: int = 600
    batch_size: int = 12
    block_size: Optional[int] = None  # None: model.block_size
    gradient_accumulation_steps: int = 1
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337
    compile: bool = True
    dtype: str = "float32"  # float32 | bfloat16 | float16: compute dtype on GPUs (float32 master weights); CPU: float32
    grad_checkpoint: bool = False  # recompute block activations in the backward pass (less memory, ~1/3 more compute)
    resume: Optional[str] = None  # None | auto | <run dir or checkpoint dir>
    eval_only: bool = False
    on_nan: str = "stop"  # stop | skip
    cpu_streams: int = 1  # CPU: each micro-batch in this many parts computed concurrently, one MLX stream each


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "mlxgpt"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online when logged in, else offline) | online | offline | disabled
    group: Optional[str] = None  # None: the sweep (multirun) or the run itself
    job_type: str = "train"
    tags: List[str] = field(default_factory=list)
    log_checkpoints: bool = False


@dataclass
class PathsConfig:
    data_dir: str = "${oc.env:MLXGPT_DATA_DIR,data}"
    log_dir: str = "${oc.env:MLXGPT_LOG_DIR,logs}"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None  # None | run dir / checkpoint dir | gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    run_name: str = "run"


@dataclass
class SampleConfig:
    checkpoint: str = "???"  # a run dir or checkpoint dir, or GPT-2 weights (gpt2..gpt2-xl, a Hugging Face directory)
    which: str = "best"  # best | last (falls back to last when a run has no best)
    prompt: str = "\n"
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: Optional[int] = 200
    seed: int = 1337
    device: str = "auto"
    use_cache: bool = True


@dataclass
class ExportConfig:
    checkpoint: str = "???"  # a run dir or checkpoint dir
    which: str = "best"  # best | last
    format: str = "hf"  # hf: a Hugging Face GPT-2 directory (config.json + model.safetensors)
    out: str = "???"
    overwrite: bool = False


def register_configs() -> None:
    """Register the schemas of conf/config.yaml, sample.yaml and export.yaml (unknown keys, wrong types rejected)."""
    ConfigStore.instance().store(name="mlxgpt_schema", node=Config)
    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


CHOICES = {
    "data.source": ("pydoc", "url", "text", "hf"),
    "data.tokenizer": ("char", "gpt2"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "schedule.name": ("cosine", "constant", "linear", "wsd"),
    "trainer.device": ("auto", "gpu", "cpu"),
    "trainer.dtype": ("float32", "bfloat16", "float16"),
    "trainer.on_nan": ("stop", "skip"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
}


SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials",
                          "auth"})  # a word of a key's name that says its value is a credential


def is_secret(key: str) -> bool:
    """Whether a key's name (its last part) marks a credential: api_key, hf_token, secret_key, apiKey, password."""
    words = re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", key.rsplit(".", 1)[-1])
    return any(word.lower() in SECRET_WORDS for word in words)


def masked_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts and lists, credentials' values masked: what logs, W&B and checkpoints get."""

    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: "***" if is_secret(str(k)) and v else mask(v) for k, v in node.items()}
        return [mask(v) for v in node] if isinstance(node, list) else node

    return mask(OmegaConf.to_container(cfg, resolve=True))


def dotted(node: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (`{"optimizer": {"lr": 1}}` -> `{"optimizer.lr": 1}`)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(dotted(value, name) if isinstance(value, dict) and value else {name: value})
    return flat


def shown_value(value: Any) -> str:
    """A setting's value where people read it (tables, plots, W&B run names): a float to 4 significant digits
    (Optuna's 0.00031622776601683794 -> 0.0003162), a text one only when that shortens it (3e-4 stays); else as is."""
    number = _float(value)
    if number is None or not math.isfinite(number):
        return str(value)
    short = f"{number:.4g}"
    return short if isinstance(value, float) or float(short) != number else value


def _float(value: Any) -> float | None:
    """A float, or the number a float's text (not an int's: a seed keeps its digits) stands for; else None."""
    if isinstance(value, float):
        return value
    if not isinstance(value, str) or value.strip().lstrip("+-").isdigit():
        return None
    try:
        return float(value)
    except ValueError:
        return None


SEED_LIMIT = 2**63  # MLX seeds are 64-bit unsigned; the sample callback adds the iteration to trainer.seed


def _check(ok: bool, key: str, value: Any, need: str, script: str = "train.py") -> None:
    if not ok:
        raise UserError(f"invalid {key}={value}: {need} (override it, e.g. `python {script} {key}=...`)")


def validate_sample(cfg: DictConfig, script: str = "sample.py") -> None:
    """Range checks of sample.py's (and export.py's `which`) options; UserError naming the key and the fix."""
    refuse_added_keys(cfg, SampleConfig if script == "sample.py" else ExportConfig)
    _check(cfg.which in ("best", "last"), "which", cfg.which, "must be best or last", script)
    if script != "sample.py":
        return
    _check(cfg.device in ("auto", "gpu", "cpu"), "device", cfg.device, "must be one of auto, gpu, cpu", script)
    _check(cfg.num_samples >= 1, "num_samples", cfg.num_samples, "must be >= 1", script)
    _check(cfg.max_new_tokens >= 0, "max_new_tokens", cfg.max_new_tokens, "must be >= 0", script)
    _check(cfg.temperature >= 0, "temperature", cfg.temperature, "must be >= 0 (0 is greedy)", script)
    _check(cfg.top_k is None or cfg.top_k >= 1, "top_k", cfg.top_k, "must be >= 1 or null", script)
    _check(0 <= cfg.seed < SEED_LIMIT, "seed", cfg.seed, "must be >= 0 and < 2**63", script)


TYPED_GROUPS = ("model", "data", "optimizer", "schedule", "trainer", "logger", "paths")


def _added_keys(cfg: DictConfig, schema: DictConfig) -> list[str]:
    """Keys that the schema lacks, at the top or in a typed group (`+trainer.max_iter=5` adds one past its check)."""
    top = [key for key in cfg if key not in schema.keys() and key != "hydra"]  # a Hydra callback's has hydra too
    return top + [f"{group}.{key}" for group in TYPED_GROUPS if OmegaConf.is_dict(cfg.get(group))
                  for key in cfg[group] if key not in schema[group].keys()]


def refuse_added_keys(cfg: DictConfig, schema: type) -> None:
    """UserError naming the first key that a `+key=` override added to the config and that `schema` lacks (a typo)."""
    added = _added_keys(cfg, OmegaConf.structured(schema))
    if added:
        raise UserError(f"unknown config key '{added[0]}' (added with +); check the spelling, `--cfg job` lists "
                        f"every key")


def validate(cfg: DictConfig) -> None:
    """Range and consistency checks the types cannot express; raises UserError naming the key and the fix."""
    refuse_added_keys(cfg, Config)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        _check(value in allowed, key, value, f"must be one of {', '.join(allowed)}")
    m, t, o, s, d = cfg.model, cfg.trainer, cfg.optimizer, cfg.schedule, cfg.data
    for key in ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "trainer.max_iters",
                "trainer.batch_size", "trainer.gradient_accumulation_steps", "trainer.eval_interval",
                "trainer.eval_iters", "trainer.log_interval", "trainer.cpu_streams", "data.shard_tokens"):
        value = OmegaConf.select(cfg, key)
        _check(value >= 1, key, value, "must be >= 1")
    _check(m.n_embd % m.n_head == 0, "model.n_embd", m.n_embd, f"must be divisible by model.n_head={m.n_head}")
    _check(m.vocab_size is None or m.vocab_size >= 2, "model.vocab_size", m.vocab_size, "must be >= 2 or null")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    if t.block_size is not None:
        _check(1 <= t.block_size <= m.block_size, "trainer.block_size", t.block_size,
               f"must be in [1, model.block_size={m.block_size}]")
    _check(t.batch_size % t.cpu_streams == 0, "trainer.cpu_streams", t.cpu_streams,
           f"must divide trainer.batch_size={t.batch_size} (each stream computes an equal part of the batch)")
    _check(t.grad_clip >= 0, "trainer.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
    _check(0 < o.lr < math.inf, "optimizer.lr", o.lr, "must be > 0 and finite")
    _check(0 <= t.seed < SEED_LIMIT, "trainer.seed", t.seed, "must be >= 0 and < 2**63")
    _check(d.split_seed >= 0, "data.split_seed", d.split_seed, "must be >= 0")
    betas = list(o.betas) if isinstance(o.betas, ListConfig) else o.betas  # an interpolation can resolve to a scalar
    _check(isinstance(betas, list) and len(betas) == 2 and all(0 <= b < 1 for b in betas), "optimizer.betas", betas,
           "must be two numbers in [0, 1)")
    _check(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _check(s.warmup_iters >= 0, "schedule.warmup_iters", s.warmup_iters, "must be >= 0")
    _check(s.decay_iters is None or s.decay_iters >= 1, "schedule.decay_iters", s.decay_iters, "must be >= 1 or null")
    _check(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")
    _check(0 < s.decay_fraction <= 1, "schedule.decay_fraction", s.decay_fraction, "must be in (0, 1]")
    _check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _check(0 < d.val_size < 1, "data.val_size", d.val_size, "must be in (0, 1)")
    _check(d.num_proc is None or d.num_proc >= 1, "data.num_proc", d.num_proc, "must be >= 1 or null")
    _check(d.max_documents is None or d.max_documents >= 1, "data.max_documents", d.max_documents,
           "must be >= 1 or null")
    _check(0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "must be in [0, 1)")
    _check(o.momentum > 0 or not o.nesterov, "optimizer.nesterov", o.nesterov, "needs optimizer.momentum > 0")
    _check(t.resume not in ("True", "False"), "trainer.resume", str(t.resume).lower(),  # a bool, as a string
           "must be auto (continue this run), a run or checkpoint directory, or null (start a new run)")
    _check_run_name(cfg.run_name)
    for key, variable in (("paths.log_dir", "MLXGPT_LOG_DIR"), ("paths.data_dir", "MLXGPT_DATA_DIR")):
        _check(OmegaConf.select(cfg, key) != "", key, "", f"must name a directory (unset {variable} if it is empty)")
    _check_numbers(cfg)
    if d.chars is not None:
        _check(d.tokenizer == "char", "data.chars", repr(d.chars), "applies to data.tokenizer=char only; set it to null")
        _check(len(d.chars) >= 1 and len(set(d.chars)) == len(d.chars), "data.chars", repr(d.chars),
               "must be distinct characters")
    if d.source == "pydoc" and d.path:  # the embedded text reads no file: the run would train on it silently
        raise UserError(f"data.path={d.path} is not read by data=pydoc (the embedded text); for your own text use "
                        f"data=text data.path={d.path}")
    if d.source == "text" and not d.path:
        raise UserError("data.source=text needs data.path=<file, directory or glob of text files>")
    if d.source == "hf" and not (d.hf_path or d.path):
        raise UserError("data.source=hf needs data.hf_path=<hub id or builder> or data.path=<saved dataset dir>")
    if d.source == "url" and not (d.url or d.path):
        raise UserError("data.source=url needs data.url=<address> or data.path=<local copy>")


def _check_run_name(name: str) -> None:
    """run_name is a directory below paths.log_dir/runs/: '..' would leave it, '' or '.' would be runs/ itself."""
    parts = name.split("/")
    _check(all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in parts), "run_name", name,
           "must be a relative path without empty, '.' or '..' parts, each at most 255 bytes")


INT_LIMIT = 2**63  # MLX computes with int64: a larger integer (an iteration count) fails inside it


def _check_numbers(cfg: DictConfig) -> None:
    """Every number of the typed groups is finite (no nan, inf) and every integer below 2**63."""
    values = dotted({group: OmegaConf.to_container(cfg[group], resolve=True) for group in TYPED_GROUPS})
    for key, value in values.items():
        if isinstance(value, float):
            _check(math.isfinite(value), key, value, "must be a finite number")
        elif isinstance(value, int):
            _check(abs(value) < INT_LIMIT, key, value, "must be below 2**63")
