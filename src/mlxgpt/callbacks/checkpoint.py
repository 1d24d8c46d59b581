"""Save `last` at every evaluation and at the end, and `best` when the val loss improves."""
from __future__ import annotations

import math

from mlxgpt import checkpoint
from mlxgpt.callbacks.base import Callback


class CheckpointCallback(Callback):
    priority = 50

    def __init__(self, keep: int = 2, save_best: bool = True, save_last: bool = True):
        self.keep, self.save_best, self.save_last = keep, save_best, save_last
        self._best = math.inf
        self._saved_iter = -1

    def on_train_start(self, trainer) -> None:
        self._best = trainer.best_val_loss

    def on_eval_end(self, trainer, logs) -> None:
        is_best = self.save_best and logs["val/loss"] < self._best
        self._best = min(self._best, logs["val/loss"])
        if trainer.iter > 0 and (is_best or self.save_last):
            self.save(trainer, is_best)

    def on_train_end(self, trainer, logs) -> None:
        if self.save_last and self._saved_iter != trainer.iter and trainer.iter > 0:
            self.save(trainer, is_best=False)

    def save(self, trainer, is_best: bool) -> None:
        if not trainer.is_main:
            return
        path = checkpoint.save_checkpoint(trainer.run_dir / "checkpoints", trainer.model.parameters(),
                                          trainer.optimizer.state, trainer.state_dict(), is_best, self.keep)
        self._saved_iter = trainer.iter
        trainer.emit("on_checkpoint", {"path": str(path), "iter": trainer.iter, "is_best": is_best})
