"""Callbacks the W&B tests add to training runs (`+callbacks.<name>._target_=wandb_callbacks.<class>`)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from mlxgpt.callbacks.base import Callback


class AtIteration(Callback):
    """Acts at the log of iteration `at_iter`, after the W&B callback logged it, `wait_s` seconds later (time for W&B
    to write its file)."""

    priority = 99

    def __init__(self, at_iter: int, wait_s: float = 0.0):
        self.at_iter, self.wait_s = at_iter, wait_s

    def needs_state(self, trainer, iteration: int) -> bool:
        return False

    def on_log(self, trainer, logs) -> None:
        if logs["iter"] == self.at_iter:
            time.sleep(self.wait_s)
            self.act()

    def act(self) -> None: ...


class KillWandbService(AtIteration):
    """Kills this process's wandb-core."""

    def act(self) -> None:
        found = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "wandb-core"], capture_output=True, text=True)
        assert found.stdout.split(), "no wandb-core process to kill"
        for pid in found.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(1)  # gone before the next W&B call


class KillSelf(AtIteration):
    """Kills this process with SIGKILL, as the OOM killer would: no handler, no cleanup."""

    def act(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Crash(AtIteration):
    """Fails, as a bug in the middle of a run would."""

    def act(self) -> None:
        raise RuntimeError(f"injected crash at iteration {self.at_iter}")


class Options(Callback):
    """Takes any options and does nothing: a user's callback whose options (some credentials) are in the config."""

    def __init__(self, **options):
        self.options = options
