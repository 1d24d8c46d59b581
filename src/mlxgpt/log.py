"""The job's messages: one `mlxgpt` logger, shown on the console around the progress bar and kept in the run's
`train.log` (conf/hydra/job_logging/mlxgpt.yaml); a library's console output held back where it may only precede an
error."""
from __future__ import annotations

import contextlib
import logging
import sys
import time

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


class HeldStream:
    """Stands in for a stream: holds what is written to it for its first `delay_s` seconds, then writes it out and
    passes on what follows (release: at once; drop: forget what it holds)."""

    def __init__(self, stream, delay_s: float):
        self.stream, self.until, self.held = stream, time.monotonic() + delay_s, []

    def write(self, text: str) -> int:
        if self.held is not None and time.monotonic() < self.until:
            self.held.append(text)
            return len(text)
        self.release()
        return self.stream.write(text)

    def flush(self) -> None:
        if self.held is None:
            self.stream.flush()

    def release(self) -> None:
        held, self.held = self.held, None
        if held:
            self.stream.write("".join(held))
            self.stream.flush()

    def drop(self) -> None:
        self.held = None

    def __getattr__(self, name: str):  # fileno, isatty, encoding... of the stream it stands in for
        return getattr(self.stream, name)


@contextlib.contextmanager
def stderr_unless_failing(delay_s: float = 2.0):
    """Within: what goes to stderr (a library's messages, warnings, progress bars) shows once the block has run for
    `delay_s` seconds or ended; not at all when the block fails sooner (its one-line error says what went wrong)."""
    held = HeldStream(sys.stderr, delay_s)
    sys.stderr = held
    try:
        yield
    except Exception:
        held.drop()
        raise
    finally:
        sys.stderr = held.stream
        held.release()
