"""Estimate train/val loss every `interval` iterations (and at the start and end of training)."""
from __future__ import annotations

from mlxgpt.callbacks.base import Callback, check_option


class EvaluationCallback(Callback):
    priority = 10  # before checkpointing, which saves `best` from the evaluation it triggers

    def __init__(self, interval: int, at_start: bool = True):
        check_option("interval", interval, "int", lambda v: v >= 1, ">= 1")
        check_option("at_start", at_start, "bool")
        self.interval, self.at_start = interval, at_start

    def on_train_start(self, trainer) -> None:
        if self.at_start and not trainer.resumed and not trainer.cfg.trainer.eval_only:
            trainer.record_eval(trainer.evaluate())

    def needs_state(self, trainer, iteration: int) -> bool:
        return iteration % self.interval == 0 or iteration == trainer.max_iters

    def on_step_end(self, trainer, logs) -> None:
        if self.needs_state(trainer, trainer.iter):
            trainer.record_eval(trainer.evaluate())
