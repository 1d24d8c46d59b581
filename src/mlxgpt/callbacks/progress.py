"""A tqdm progress bar with loss, lr, tokens/s, MFU and ETA on a terminal; elsewhere (a file, Slurm's log) a line per
log interval with the ETA instead. Eval results as lines; every log line in train.log."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

from mlxgpt.callbacks.base import Callback, check_option
from mlxgpt.log import FILE_ONLY, log


class ProgressCallback(Callback):
    priority = 40  # closes its bar before the final sample is printed (45)

    def __init__(self, leave: bool = True):
        check_option("leave", leave, "bool")
        self.leave = leave
        self._bar = None

    def needs_state(self, trainer, iteration: int) -> bool:
        return False  # its step events only log

    def on_train_start(self, trainer) -> None:
        if trainer.is_main and sys.stderr.isatty():  # a bar's redraws would fill a log file with partial lines
            self._bar = tqdm(total=trainer.max_iters, initial=trainer.iter, desc="train", unit="it",
                             leave=self.leave, dynamic_ncols=True)

    def on_step_end(self, trainer, logs) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_log(self, trainer, logs) -> None:
        if not trainer.is_main:
            return
        post = {"loss": f"{logs['train/loss']:.4f}", "lr": f"{logs['lr']:.2e}"}
        if "tok_per_s" in logs:
            post["tok/s"] = f"{logs['tok_per_s']:.0f}"
        if logs.get("mfu") is not None:
            post["mfu"] = f"{100 * logs['mfu']:.1f}%"
        line = f"iter {logs['iter']}: " + ", ".join(f"{k} {v}" for k, v in post.items())
        if self._bar is not None:
            log.info(line, extra=FILE_ONLY)
            self._bar.set_postfix(post, refresh=False)
        else:  # no bar: the line says how far the run is
            left = (trainer.max_iters - logs["iter"]) * logs["dt_s"]
            log.info(f"{line}, {100 * logs['iter'] / trainer.max_iters:.0f}% of {trainer.max_iters}, "
                     f"eta {tqdm.format_interval(left)}")

    def on_eval_end(self, trainer, logs) -> None:
        message = (f"iter {logs['iter']}: train loss {logs['train/loss']:.4f}, val loss {logs['val/loss']:.4f} "
                   f"(best {logs['best/val_loss']:.4f})")
        if trainer.is_main:
            log.info(message)  # above the bar

    def on_train_end(self, trainer, logs) -> None:
        self._close()

    def on_exception(self, trainer, exc) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
