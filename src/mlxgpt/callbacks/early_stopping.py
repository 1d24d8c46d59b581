"""Stop when the val loss has not improved by `min_delta` for `patience` evaluations."""
from __future__ import annotations

import math

from mlxgpt.callbacks.base import Callback, check_option
from mlxgpt.callbacks.evaluation import EvaluationCallback
from mlxgpt.errors import UserError
from mlxgpt.log import log


class EarlyStoppingCallback(Callback):
    priority = 60

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        check_option("patience", patience, "int", lambda v: v >= 1, ">= 1")
        check_option("min_delta", min_delta, "number", lambda v: v >= 0, ">= 0")
        self.patience, self.min_delta = patience, min_delta
        self._best, self._bad = math.inf, 0

    def on_train_start(self, trainer) -> None:
        if not any(isinstance(cb, EvaluationCallback) for cb in trainer.callbacks):
            raise UserError("callbacks.early_stopping watches the evaluations' val loss, but this run has no "
                            "evaluation callback; use callbacks=[default,early_stopping] (the defaults and early stopping)")

    def on_eval_end(self, trainer, logs) -> None:
        if logs["val/loss"] < self._best - self.min_delta:
            self._best, self._bad = logs["val/loss"], 0
            return
        self._bad += 1
        if self._bad >= self.patience:
            trainer.should_stop = True
            if trainer.is_main:
                log.info(f"mlxgpt: early stopping at iteration {trainer.iter}: val loss has not improved for "
                         f"{self.patience} evaluations (best {self._best:.4f})")
