"""The training loop: one compiled step (model, optimizer and random state as inputs/outputs), callbacks at events."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxgpt import checkpoint
from mlxgpt.callbacks.base import Callback
from mlxgpt.errors import UserError

EVAL_SPLITS = ("train", "val")


class NonFiniteLoss(UserError):
    """The loss or gradient norm became NaN/inf."""


class Trainer:
    """Owns the model, optimizer and data for one run; callbacks observe it through events."""

    def __init__(self, cfg, model: nn.Module, data, optimizer: optim.Optimizer, schedule, run_dir: Path,
                 callbacks: list[Callback], tokenizer, resume_from: Path | None = None):
        self.cfg, self.model, self.data = cfg, model, data
        self.optimizer, self.schedule = optimizer, schedule
        self.run_dir = Path(run_dir)
        self.callbacks = sorted(callbacks, key=lambda c: c.priority)
        self.tokenizer = tokenizer
        t = cfg.trainer
        self.seed, self.max_iters = t.seed, t.max_iters
        self.batch_size, self.accum = t.batch_size, t.gradient_accumulation_steps
        self.block_size = t.block_size or cfg.model.block_size
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.is_main = self.rank == 0
        self.tokens_per_iter = self.world * self.accum * self.batch_size * self.block_size
        self.iter, self.tokens_seen = 0, 0
        self.best_val_loss = math.inf
        self.extra_state: dict[str, Any] = {}  # callbacks' resumable state (e.g. the W&B run id)
        self.summary: dict[str, Any] = {}  # the latest value of every logged metric
        self.should_stop = False
        self.resumed = resume_from is not None
        self.optimizer.init(self.model.trainable_parameters())
        if resume_from is not None:
            self._restore(resume_from)
        self._build_steps(compiled=t.compile)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """What a checkpoint's state.json holds besides the arrays."""
        from omegaconf import OmegaConf

        return {"iter": self.iter, "tokens_seen": self.tokens_seen,
                "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
                "seed": self.seed, "model_config": asdict(self.model.config),
                "tokenizer": self.tokenizer.to_meta(), "extra": self.extra_state,
                "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def _restore(self, ckpt: Path) -> None:
        state = checkpoint.read_state(ckpt)
        saved, ours = state.get("model_config", {}), asdict(self.model.config)
        if any(saved.get(k) != ours[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")):
            raise UserError(f"checkpoint {ckpt} is for a different model ({_size(saved)}) than this config "
                            f"({_size(ours)}); resume with the checkpoint's model settings or start a new run")
        load_weights(self.model, checkpoint.load_arrays(ckpt, "model.safetensors"), ckpt)
        self.optimizer.state = tree_unflatten(list(checkpoint.load_arrays(ckpt, "optimizer.safetensors").items()))
        self.iter, self.tokens_seen = state["iter"], state["tokens_seen"]
        self.best_val_loss = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        self.extra_state = state.get("extra", {})
        mx.eval(self.model.parameters(), self.optimizer.state)

    # ------------------------------------------------------------------ steps
    def _build_steps(self, compiled: bool) -> None:
        model, optimizer, t = self.model, self.optimizer, self.cfg.trainer
        loss_and_grad = nn.value_and_grad(model, model.loss)
        state = [model.state, optimizer.state, mx.random.state]
        wrap = partial(mx.compile, inputs=state, outputs=state) if compiled else (lambda f: f)

        def grads(x, y):
            return loss_and_grad(x, y)

        def accumulate(x, y, acc):
            loss, g = loss_and_grad(x, y)
            return loss, tree_map(mx.add, acc, g)

        def apply(g):
            if self.accum > 1:
                g = tree_map(lambda a: a / self.accum, g)
            if self.world > 1:
                g = nn.average_gradients(g, group=self.group)
            if t.grad_clip > 0:
                g, norm = optim.clip_grad_norm(g, t.grad_clip)
            else:
                norm = mx.sqrt(sum(mx.sum(a.astype(mx.float32) ** 2) for _, a in tree_flatten(g)))
            optimizer.update(model, g)
            return norm

        def fused(x, y):
            loss, g = loss_and_grad(x, y)
            return loss, apply(g)

        self._grads, self._accumulate, self._apply, self._fused = map(wrap, (grads, accumulate, apply, fused))
        self._eval_loss = mx.compile(model.loss, inputs=model.state) if compiled else model.loss
        # The fused step updates before the host can look at the gradients; `skip` needs to look first.
        self._use_fused = self.accum == 1 and t.on_nan == "stop"

    def batch(self, split: str, key: tuple[int, ...]) -> tuple[mx.array, mx.array]:
        x, y = self.data.get_batch(split, self.batch_size, self.block_size, key)
        return mx.array(x), mx.array(y)

    def train_step(self) -> tuple[float, float]:
        """One optimizer update over `accum` micro-batches; each micro-step is evaluated (bounded memory)."""
        mx.random.seed((self.seed * 1_000_003 + self.iter) % 2**63)  # dropout: a function of (seed, iter)
        keys = [(self.seed, self.iter, k, self.rank) for k in range(self.accum)]
        if self._use_fused:
            loss, norm = self._fused(*self.batch("train", keys[0]))
            mx.eval(loss, norm, self.model.state, self.optimizer.state)
            return self._checked(loss.item(), norm.item())
        loss, acc = self._grads(*self.batch("train", keys[0]))
        total = loss
        mx.eval(total, acc)
        for key in keys[1:]:
            loss, acc = self._accumulate(*self.batch("train", key), acc)
            total = total + loss
            mx.eval(total, acc)
        mean_loss = total.item() / self.accum
        if not math.isfinite(mean_loss):
            return self._checked(mean_loss, math.nan)
        norm = self._apply(acc)
        mx.eval(norm, self.model.state, self.optimizer.state)
        return self._checked(mean_loss, norm.item())

    def _checked(self, loss: float, norm: float) -> tuple[float, float]:
        if math.isfinite(loss) and math.isfinite(norm):
            return loss, norm
        if self.cfg.trainer.on_nan == "skip" and not self._use_fused:
            if self.is_main:
                print(f"mlxgpt: skipped iteration {self.iter}: non-finite loss/gradient ({loss}, {norm})")
            return loss, norm
        raise NonFiniteLoss(f"loss/gradient became non-finite ({loss}, {norm}) at iteration {self.iter}; the last "
                            f"good checkpoint is kept in {self.run_dir / 'checkpoints'}: lower optimizer.lr "
                            f"(now {self.cfg.optimizer.lr}), set trainer.grad_clip, or use trainer.on_nan=skip")

    def lr(self) -> float:
        return self.schedule(mx.array(self.iter)).item()

    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` fixed batches per split (the same batches at every evaluation)."""
        self.model.eval()
        out = {}
        for split_id, split in enumerate(EVAL_SPLITS):
            total = mx.array(0.0)
            for k in range(self.cfg.trainer.eval_iters):
                total = total + self._eval_loss(*self.batch(split, (self.seed, split_id, k, self.rank, 1)))
                mx.eval(total)
            if self.world > 1:
                total = mx.distributed.all_sum(total, group=self.group) / self.world
            out[f"{split}/loss"] = total.item() / self.cfg.trainer.eval_iters
        self.model.train()
        return out

    # ------------------------------------------------------------------- loop
    def emit(self, event: str, payload: Any = None) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self) if payload is None else getattr(cb, event)(self, payload)

    def record_eval(self, losses: dict[str, float]) -> dict[str, Any]:
        """Update the best val loss, emit on_eval_end, return its payload."""
        self.best_val_loss = min(self.best_val_loss, losses["val/loss"])
        logs = {"iter": self.iter, "tokens": self.tokens_seen, **losses, "best/val_loss": self.best_val_loss}
        self.summary.update(logs)
        self.emit("on_eval_end", logs)
        return logs

    def fit(self) -> dict[str, Any]:
        """Train until max_iters (or a callback sets should_stop); returns the summary."""
        t = self.cfg.trainer
        self.model.train()
        try:
            self.emit("on_train_start")
            loss_sum, n_since_log, log_start = 0.0, 0, time.perf_counter()
            while self.iter < self.max_iters and not self.should_stop:
                lr = self.lr()
                start = time.perf_counter()
                loss, norm = self.train_step()
                self.iter += 1
                self.tokens_seen += self.tokens_per_iter
                step_logs = {"iter": self.iter, "tokens": self.tokens_seen, "train/loss": loss, "lr": lr,
                             "grad_norm": norm, "dt_s": time.perf_counter() - start}
                self.emit("on_step_end", step_logs)
                loss_sum, n_since_log = loss_sum + loss, n_since_log + 1
                if self.iter % t.log_interval == 0 or self.iter == self.max_iters:
                    logs = {**step_logs, "train/loss": loss_sum / n_since_log,
                            "dt_s": (time.perf_counter() - log_start) / n_since_log}
                    self.emit("on_log", logs)
                    self.summary.update(logs)
                    loss_sum, n_since_log, log_start = 0.0, 0, time.perf_counter()
            self.emit("on_train_end", dict(self.summary))
        except BaseException as exc:
            self.emit("on_exception", exc)
            raise
        return self.summary


def load_weights(model: nn.Module, weights: dict[str, mx.array], source: Path | str) -> None:
    """Load a complete set of weights; a missing, extra or misshapen tensor is a UserError."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"weights in {source} do not fit this model ({e}); check the model= settings") from None


def _size(model_config: dict) -> str:
    return "/".join(f"{k}={model_config.get(k)}" for k in ("n_layer", "n_head", "n_embd", "vocab_size"))
