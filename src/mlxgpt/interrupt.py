"""Stop training cleanly on SIGINT / SIGTERM: the first signal asks the loop to stop after the current step (it then
saves a checkpoint); a second one ends the process at once, which is safe because checkpoint writes are atomic."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn

import mlx.core as mx

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Training stopped on a signal at `iteration` (None: before the training loop). Not an Exception: a multirun
    stops as well."""

    def __init__(self, signum: int, iteration: int | None):
        where = f"at iteration {iteration}" if iteration is not None else "before training started"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.iteration = signum, iteration

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StoppedAfterTraining(Interrupted):
    """A stop asked as a run that has done all its iterations ends (its last sample, its checkpoint): the run is
    complete (`summary`); the process still exits 128+n, so a multirun stops too."""

    def __init__(self, signum: int, summary: dict):
        super().__init__(signum, summary["iter"])
        self.args = (f"stopped by {signal.Signals(signum).name} after the last iteration ({summary['iter']}): the run "
                     f"is complete",)
        self.summary = summary


class StopSignals:
    """While active, SIGINT / SIGTERM are recorded instead of raising; after the first, a second kills the process."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set handlers
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _record(self, signum: int, frame) -> None:
        self.signum = signum
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)  # the OS default: the next signal ends the process, even inside MLX
        # os.write, not print: a handler may run in the middle of another write to sys.stderr
        message = (f"mlxgpt: {signal.Signals(signum).name} received: stopping after this step and saving a checkpoint; "
                   f"send it again to stop at once (losing the steps since the last checkpoint)")
        os.write(2, f"\n{message}\n".encode())

    def requested(self, group=None) -> int | None:
        """The signal to stop on, agreed by every process of `group` (a collective: call it on all ranks)."""
        mine = self.signum  # read once: a signal handled during the collective must not change this rank's answer
        if group is None or group.size() == 1:
            return mine
        anyone = mx.distributed.all_sum(mx.array(mine or 0), group=group).item()
        return mine or (signal.SIGTERM if anyone else None)


def exit_together(code: int) -> NoReturn:
    """Exit with `code` once every process of this distributed run (mlx.launch) is ready to: mlx.launch terminates the
    others when one exits, which killed rank 0 while it wrote the run's records, or while it exited (code -15)."""
    group = mx.distributed.init()
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(0), group=group))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _stop_on_sigterm(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)
    raise Interrupted(signum, None)


def _quiet_worker_signals() -> None:
    """A process forked under sigterm_stops (a worker of datasets' num_proc pool) leaves Ctrl-C to its parent and ends
    on SIGTERM when the parent terminates its pool, instead of printing a traceback of KeyboardInterrupt or
    Interrupted."""
    if signal.getsignal(signal.SIGTERM) is _stop_on_sigterm:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_quiet_worker_signals)


@contextlib.contextmanager
def sigterm_stops():
    """Outside the training loop (data, model), SIGTERM stops the job as Ctrl-C does: Interrupted is raised, so the work
    under way cleans up and the job is recorded as interrupted; a second SIGTERM ends the process at once."""
    if threading.current_thread() is not threading.main_thread():  # Python lets only the main thread set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
