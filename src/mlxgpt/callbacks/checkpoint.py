"""Save `last` at every evaluation, at the end and when stopped by a signal; `best` when the val loss improves."""
from __future__ import annotations

import math

from mlxgpt import checkpoint
from mlxgpt.callbacks.base import Callback, check_option
from mlxgpt.errors import UserError
from mlxgpt.interrupt import Interrupted
from mlxgpt.log import log


class CheckpointCallback(Callback):
    priority = 50

    def __init__(self, keep: int = 2, save_best: bool = True, save_last: bool = True):
        check_option("keep", keep, "int", lambda v: v >= 0, ">= 0")
        check_option("save_best", save_best, "bool")
        check_option("save_last", save_last, "bool")
        self.keep, self.save_best, self.save_last = keep, save_best, save_last
        self._best = math.inf
        self._saved_iter = -1

    def on_train_start(self, trainer) -> None:
        self._best = trainer.best_val_loss
        self._saved_iter = trainer.iter if trainer.resumed else -1  # a stop before the first step saves nothing new

    def on_eval_end(self, trainer, logs) -> None:
        is_best = self.save_best and logs["val/loss"] < self._best
        self._best = min(self._best, logs["val/loss"])
        if trainer.iter > 0 and (is_best or self.save_last):
            self.save(trainer, is_best)

    def on_train_end(self, trainer, logs) -> None:
        if self.save_last and self._saved_iter != trainer.iter and trainer.iter > 0:
            self.save(trainer, is_best=False)

    def on_exception(self, trainer, exc) -> None:
        """Stopped by a signal after a complete step: save it (a failure here only warns, the stop goes on)."""
        if isinstance(exc, Interrupted) and self.save_last and self._saved_iter != trainer.iter and trainer.iter > 0:
            try:
                self.save(trainer, is_best=False)
            except UserError as e:
                log.warning(f"mlxgpt: warning: {e}")

    def save(self, trainer, is_best: bool) -> None:
        if not trainer.is_main:
            return
        root = trainer.run_dir / "checkpoints"
        try:
            path = checkpoint.save_checkpoint(root, trainer.model.parameters(), trainer.optimizer.state,
                                              trainer.state_dict(), is_best, self.keep)
        except (OSError, RuntimeError) as e:  # disk full, no permission; MLX reports a failed write as RuntimeError
            previous = checkpoint.latest(root)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"cannot write the checkpoint of iteration {trainer.iter} to {root} ({e}); {kept}; "
                            f"free disk space or fix permissions, then continue with trainer.resume=auto") from None
        self._saved_iter = trainer.iter
        trainer.emit("on_checkpoint", {"path": str(path), "iter": trainer.iter, "is_best": is_best})
