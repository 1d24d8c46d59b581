"""The callback interface: objects the trainer calls at named events; they never change a step's math."""
from __future__ import annotations

from typing import Any


def check_option(name: str, value: Any, kind: str, ok=lambda v: True, need: str = "") -> None:
    """ValueError unless a callback option has its kind (int, number, bool, str, int_or_none) and passes `ok`; the
    trainer reports it as `callbacks.<callback>: ...` before any work."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    kinds = {"int": (is_int, "an integer"), "number": (is_int or isinstance(value, float), "a number"),
             "bool": (isinstance(value, bool), "true or false"), "str": (isinstance(value, str), "a string"),
             "int_or_none": (value is None or is_int, "an integer or null")}
    right_kind, description = kinds[kind]
    if not right_kind or (value is not None and not ok(value)):
        raise ValueError(f"{name}={value!r}: must be {description}{', ' + need if need else ''}")


class Callback:
    """Override the events you need. `priority`: lower runs first (producers of metrics before consumers)."""

    priority = 100

    def needs_state(self, trainer, iteration: int) -> bool:
        """Whether on_log/on_step_end at `iteration` read or change the model, the optimizer or should_stop (by
        default: if this class overrides either). Where none does, the trainer queues the next update before them."""
        cls = type(self)
        return cls.on_step_end is not Callback.on_step_end or cls.on_log is not Callback.on_log

    def on_train_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, logs: dict[str, Any]) -> None:
        """Every iteration: iter, tokens, train/loss, lr, grad_norm, dt_s."""

    def on_log(self, trainer, logs: dict[str, Any]) -> None:
        """Every trainer.log_interval: iter, tokens, train/loss (averaged since the last log), lr, grad_norm, dt_s;
        ThroughputCallback adds tok_per_s, mfu, memory_gb."""

    def on_eval_end(self, trainer, logs: dict[str, Any]) -> None:
        """After an evaluation: iter, tokens, train/loss, val/loss, best/val_loss."""

    def on_checkpoint(self, trainer, info: dict[str, Any]) -> None:
        """After a checkpoint was written: path, iter, is_best."""

    def on_sample(self, trainer, info: dict[str, Any]) -> None:
        """After text was generated: iter, prompt, samples (list of str)."""

    def on_train_end(self, trainer, logs: dict[str, Any]) -> None: ...

    def on_exception(self, trainer, exc: BaseException) -> None: ...
