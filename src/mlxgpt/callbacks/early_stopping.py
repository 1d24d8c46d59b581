"""Stop when the val loss has not improved by `min_delta` for `patience` evaluations."""
from __future__ import annotations

import math

from mlxgpt.callbacks.base import Callback, check_option
from mlxgpt.callbacks.evaluation import EvaluationCallback
from mlxgpt.errors import UserError
from mlxgpt.log import log

STATE_KEY = "early_stopping"  # in trainer.extra_state (checkpoints): a resumed run counts on where it was


class EarlyStoppingCallback(Callback):
    priority = 48  # before checkpointing (50): the checkpoint of an evaluation holds that evaluation's count

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        check_option("patience", patience, "int", lambda v: v >= 1, ">= 1")
        check_option("min_delta", min_delta, "number", lambda v: v >= 0, ">= 0")
        self.patience, self.min_delta = patience, min_delta
        self._best, self._bad = math.inf, 0

    def on_train_start(self, trainer) -> None:
        if not any(isinstance(cb, EvaluationCallback) for cb in trainer.callbacks):
            raise UserError("callbacks.early_stopping watches the evaluations' val loss, but this run has no "
                            "evaluation callback; use callbacks=[default,early_stopping] (the defaults and early stopping)")
        saved = trainer.extra_state.get(STATE_KEY)
        if saved:
            self._best, self._bad = saved["best"], saved["bad"]

    def on_eval_end(self, trainer, logs) -> None:
        if logs["val/loss"] < self._best - self.min_delta:
            self._best, self._bad = logs["val/loss"], 0
        else:
            self._bad += 1
        trainer.extra_state[STATE_KEY] = {"best": self._best, "bad": self._bad}
        if self._bad >= self.patience:
            trainer.should_stop = True
            if trainer.is_main:
                log.info(f"mlxgpt: early stopping at iteration {trainer.iter}: val loss has not improved for "
                         f"{self.patience} evaluations (best {self._best:.4f})")


def stopped_early(state: dict, patience: int) -> bool:
    """Whether a checkpoint's run had stopped early: its val loss did not improve for `patience` evaluations."""
    return (state.get("extra") or {}).get(STATE_KEY, {}).get("bad", 0) >= patience
