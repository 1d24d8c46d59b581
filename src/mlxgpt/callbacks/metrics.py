"""`metrics.jsonl` in the run dir: one JSON object per log / eval event (the contract `compare` reads)."""
from __future__ import annotations

import json
from pathlib import Path

from mlxgpt.callbacks.base import Callback, check_option
from mlxgpt.rundir import start_records


class MetricsFileCallback(Callback):
    priority = 5  # open the file before the evaluation at train start is logged

    def __init__(self, filename: str = "metrics.jsonl"):
        check_option("filename", filename, "str", lambda v: v and Path(v).name == v, "a plain file name (it is "
                     "written in the run directory)")
        self.filename = filename
        self._file = None

    def needs_state(self, trainer, iteration: int) -> bool:
        return False  # its step events only log

    def on_train_start(self, trainer) -> None:
        if not trainer.is_main:
            return
        path = trainer.run_dir / self.filename
        start_records(path, trainer.iter if trainer.resumed else None, trainer.eval_pending)
        self._file = open(path, "a", encoding="utf-8")

    def _write(self, event: str, logs: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"event": event, **logs}) + "\n")
            self._file.flush()

    def on_log(self, trainer, logs) -> None:
        self._write("train", logs)

    def on_eval_end(self, trainer, logs) -> None:
        self._write("eval", logs)

    def on_train_end(self, trainer, logs) -> None:
        self._close()

    def on_exception(self, trainer, exc) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
