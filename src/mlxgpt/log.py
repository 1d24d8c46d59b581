"""The job's messages: one `mlxgpt` logger, shown on the console around the progress bar and kept in the run's
`train.log` (conf/hydra/job_logging/mlxgpt.yaml)."""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger("mlxgpt")
FILE_ONLY = {"file_only": True}  # `log.info(..., extra=FILE_ONLY)`: for train.log, not the console (the bar shows it)


class ConsoleHandler(logging.Handler):
    """Writes above tqdm's progress bar without breaking it: info to stdout, warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)
        except Exception:
            self.handleError(record)


class RunLogHandler(logging.FileHandler):
    """The run's train.log. A message it cannot write (a full disk) is on the console still: one warning says so,
    instead of the logging module's traceback for every message."""

    warned = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.warned:
            self.warned = True
            tqdm.write(f"mlxgpt: warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); messages are on "
                       f"the console only", file=sys.stderr)
