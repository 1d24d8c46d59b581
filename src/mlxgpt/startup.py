"""Ctrl-C while a script still imports its modules (mlxgpt, hydra, mlx: its first ~0.2 s) ends it at once with exit
code 130, as it does later (mlxgpt.cli.run_main), not with a KeyboardInterrupt traceback from inside an import. Nothing
is left to clean up then: the script has not started any work."""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def _main_is_importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside one of the main script's top-level imports (nothing could catch an interrupt)."""
    inner = None
    while frame is not None and frame.f_back is not None:
        frame, inner = frame.f_back, frame
    return (frame is not None and inner is not None and frame.f_code.co_name == "<module>"
            and frame.f_globals.get("__name__") == "__main__" and "importlib" in inner.f_code.co_filename)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    if not _main_is_importing(frame):
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler
    os.write(2, b"mlxgpt: interrupted\n")  # not print: a handler may run in the middle of another write to stderr
    os._exit(EXIT_INTERRUPTED)  # at once: an exception raised inside an import can be swallowed or reworded there


def quiet_interrupt_while_importing() -> None:
    """Install the handler when a script imports mlxgpt at its top level (its entry scripts do so first); anywhere else
    (tests, notebooks, a library's import) Python's handler stays."""
    if _main_is_importing(sys._getframe()) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
