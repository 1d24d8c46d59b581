"""Run-directory safety: one process per run directory (a lock file), no run started over another's checkpoints,
checks before Hydra writes into the directory, and the command that continues a stopped run."""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, open_dict, read_write

from mlxgpt import checkpoint
from mlxgpt.cli import fail, user_message
from mlxgpt.config import validate
from mlxgpt.errors import UserError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run dirs this process holds: the open lock file of each


def start_records(path: Path, resumed_at: int | None) -> None:
    """Ready a JSON-lines record file (each record has an "iter") for a run: on resume, drop the records past the
    resumed iteration (the run writes them again); on a fresh start, drop all (those of an attempt killed before its
    first checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines() if resumed_at is not None else []:
        try:
            if json.loads(line)["iter"] <= resumed_at:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill, or not a record
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def refuse_used_run_dir(run_dir: Path) -> None:
    """UserError when `run_dir` already has checkpoints (resume it or pick a new run_name)."""
    if checkpoint.latest(run_dir / "checkpoints") is not None:  # debris of a killed first save is none
        raise UserError(f"run directory {run_dir} already has checkpoints: continue it with trainer.resume=auto "
                        f"or start a new run with a different run_name")


def lock_run_dir(run_dir: Path) -> None:
    """Hold `run_dir/.lock` until unlock_run_dir or exit; UserError when a live process holds it.

    An OS file lock (flock) is released by the kernel when its process dies, even by kill -9: a lock file left
    by a dead run is taken over. The file names the holder's pid for the message."""
    key = run_dir.resolve()
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"run directory {run_dir} is in use by {holder}; wait for it to end or stop it, "
                        f"or use a different run_name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _held[key] = fd


def holds_lock(run_dir: Path) -> bool:
    return run_dir.resolve() in _held


def unlock_run_dir(run_dir: Path) -> None:
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint trainer.resume names: None, `auto` (this run dir's latest, if any) or a run/checkpoint dir."""
    if resume is None:
        return None
    if resume == "auto":
        return checkpoint.latest(run_dir / "checkpoints")
    return checkpoint.resolve(resume)


def resume_command(run_dir: Path, run_name: str, multirun: bool) -> str:
    """The command line that continues this job: its overrides, its directory, and trainer.resume=auto."""
    from hydra.core.hydra_config import HydraConfig

    where = f"hydra.run.dir={run_dir}" if multirun else f"run_name={run_name}"
    keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(("trainer.resume=", "run_name="))]
    return shlex.join(["python", sys.argv[0], *keep, where, "trainer.resume=auto"])


def is_main_process() -> bool:
    import mlx.core as mx

    return mx.distributed.init().rank() == 0  # the ranks of one distributed run share its directory


def write_nothing(config: DictConfig) -> None:
    """Hydra writes no `.hydra/` and no job log for this process (another rank of rank 0's distributed run)."""
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        config.hydra.job_logging = {"version": 1, "root": None, "disable_existing_loggers": False}  # Hydra: none


class PreflightCheck(HydraCallback):
    """Validates the config, the run dir and the checkpoint to resume, and locks the run dir, all before Hydra
    writes `.hydra/` into it: a refused run changes nothing."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            validate(config)
            t, run_dir = config.trainer, Path(config.hydra.run.dir)
            if t.resume is None and not t.eval_only:
                refuse_used_run_dir(run_dir)
            ckpt = resume_checkpoint(t.resume, run_dir)
            if ckpt is not None:
                state = checkpoint.verify(ckpt)
                if config.init_from is None:  # else the model's sizes may come from init_from: the trainer checks
                    checkpoint.check_model(ckpt, state, config.model)
            if is_main_process():
                lock_run_dir(run_dir)
            else:
                write_nothing(config)
        except Exception as e:  # Hydra turns a callback's exception into a warning and goes on: exit here
            message = user_message(e)  # also e.g. an interpolation that does not resolve
            if message is None:
                raise
            fail(message)
