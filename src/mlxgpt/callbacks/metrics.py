"""`metrics.jsonl` in the run dir: one JSON object per log / eval event (the contract `compare` reads)."""
from __future__ import annotations

import json
import os

from mlxgpt.callbacks.base import Callback


class MetricsFileCallback(Callback):
    priority = 5  # open the file before the evaluation at train start is logged

    def __init__(self, filename: str = "metrics.jsonl"):
        self.filename = filename
        self._file = None

    def on_train_start(self, trainer) -> None:
        if not trainer.is_main:
            return
        path = trainer.run_dir / self.filename
        if trainer.resumed and path.exists():
            self._truncate_after(path, trainer.iter)
        # a fresh start replaces the records of an attempt killed before its first checkpoint
        self._file = open(path, "a" if trainer.resumed else "w", encoding="utf-8")

    @staticmethod
    def _truncate_after(path, it: int) -> None:
        """Drop records past the resumed iteration (the resumed run writes them again, identically)."""
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iter"] <= it:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a kill
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)

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
