"""Run-directory safety: one process per run directory (a lock file), no run started over another's checkpoints,
checks before Hydra writes into the directory, the records of a continued run kept until the attempt saves a
checkpoint, and the command that continues a stopped run."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mlxgpt import checkpoint
from mlxgpt.cli import fail, job_started, undo_if_no_job_runs, user_message
from mlxgpt.config import dotted, masked_container, validate
from mlxgpt.errors import UserError, disk_error, make_dir
from mlxgpt.data.sources import check_source
from mlxgpt.memory import check_fits
from mlxgpt.pretrained import is_pretrained
from mlxgpt.sweep_plan import first_job_config

LOCK_FILE = ".lock"
PREVIOUS = ".previous_attempt"  # a used run dir's records as they were before this attempt rewrote them
RECORDS = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "result.json")
_held: dict[Path, int] = {}  # run dirs this process holds: the open lock file of each


def start_records(path: Path, resumed_at: int | None, eval_pending: bool = False) -> None:
    """Ready a JSON-lines record file (each record has an "iter") for a run: on resume, drop the records past the
    resumed iteration, and those of its evaluation when that is pending (the run writes them again: only its train
    log line comes before it); on a fresh start, drop all (those of an attempt killed before its first checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines() if resumed_at is not None else []:
        try:
            record = json.loads(line)
            if record["iter"] < resumed_at or record["iter"] == resumed_at and (
                    not eval_pending or record.get("event") == "train"):
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


def refuse_other_checkpoint(resume: str | None, ckpt: Path | None, run_dir: Path) -> None:
    """UserError when trainer.resume names a checkpoint outside a run dir that has its own (it would roll it back)."""
    if ckpt is not None and resume != "auto" and not own_checkpoint(ckpt, run_dir):
        if checkpoint.latest(run_dir / "checkpoints") is not None:
            raise UserError(f"run directory {run_dir} already has checkpoints; trainer.resume={resume} starts from "
                            f"another run's checkpoint: use a new run_name (or trainer.resume=auto to continue it)")


def own_checkpoint(ckpt: Path, run_dir: Path) -> bool:
    """Whether `ckpt` is one of `run_dir`'s checkpoints (not another run's)."""
    return run_dir.resolve() in ckpt.resolve().parents


def keep_records(run_dir: Path) -> None:
    """Before a continued run's records (.hydra/, result.json) are rewritten, copy them aside: a failed attempt that
    saved no checkpoint puts them back (settle_records). An earlier attempt's copy stays if it got no further."""
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is None:
        return
    previous = run_dir / PREVIOUS
    if (previous / "checkpoint").is_file() and (previous / "checkpoint").read_text() == latest.name:
        return
    shutil.rmtree(previous, ignore_errors=True)
    for name in RECORDS:
        if (run_dir / name).is_file():
            (previous / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / name, previous / name)
    previous.mkdir(exist_ok=True)
    (previous / "checkpoint").write_text(latest.name)


def previous_overrides(run_dir: Path) -> list[str] | None:
    """The overrides of the attempt before this one on a continued run dir (None when it has no kept records)."""
    path = run_dir / PREVIOUS / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else None


def settle_records(run_dir: Path, failed: bool) -> bool:
    """End of an attempt: a failed one that saved no checkpoint gets the kept records back (True); else drop them."""
    previous = run_dir / PREVIOUS
    if not (previous / "checkpoint").is_file():
        return False
    latest = checkpoint.latest(run_dir / "checkpoints")
    restore = failed and latest is not None and latest.name == (previous / "checkpoint").read_text()
    if restore:
        for name in RECORDS:
            (run_dir / name).unlink(missing_ok=True)
            if (previous / name).is_file():
                os.replace(previous / name, run_dir / name)
    shutil.rmtree(previous, ignore_errors=True)
    return restore


def lock_run_dir(run_dir: Path) -> None:
    """Hold `run_dir/.lock` until unlock_run_dir or exit; UserError when a live process holds it.

    An OS file lock (flock) is released by the kernel when its process dies, even by kill -9: a lock file left
    by a dead run is taken over. The file names the holder's pid for the message."""
    key = run_dir.resolve()
    if key in _held:
        return
    make_dir(run_dir, "the run directory", "set paths.log_dir (or MLXGPT_LOG_DIR) to a writable directory")
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


def resume_command(run_name: str, multirun: bool, resume: str = "auto") -> str:
    """The command line that continues this run (its overrides, Hydra's own too, e.g. hydra.run.dir or
    hydra/launcher=slurm; trainer.resume=`resume`); for a sweep's job, the whole sweep in its directory."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    dropped = ("trainer.resume=", "hydra.mode=")  # Hydra adds hydra.mode itself, from -m or its absence
    if multirun:
        keep = [o for o in sweep_command_line(hc) if not o.startswith((*dropped, "hydra.sweep.dir="))]
        return shlex.join(["python", _script(hc), "-m", *keep, f"hydra.sweep.dir={hc.sweep.dir}",
                           "trainer.resume=auto"])
    keep = [o for o in [*hc.overrides.hydra, *hc.overrides.task] if not o.startswith((*dropped, "run_name="))]
    return shlex.join(["python", _script(hc), *keep, f"run_name={run_name}", f"trainer.resume={resume}"])


def _script(hc) -> str:
    """The app's script (train.py) as it was started; in a job that submitit (Slurm) started through its own entry
    point, the one beside the app's conf/."""
    if Path(sys.argv[0]).stem == hc.job.name:
        return sys.argv[0]
    conf = next(s.path for s in hc.runtime.config_sources if s.provider == "main")
    return str(Path(conf).parent / f"{hc.job.name}.py")


def sweep_command_line(hc) -> list[str]:
    """A multirun's command-line overrides, Hydra's own then the task's, as its sweep dir's multirun.yaml records them
    (PreflightCheck writes it for every sweeper, also Optuna's; a job that submitit started has no such arguments)."""
    overrides = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml").hydra.overrides
    return [*overrides.hydra, *overrides.task]


def swept_keys(hc) -> set[str]:
    """The keys a multirun varies: its sweeper's `params` and the command line's sweep overrides (`k=a,b`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set(hc.sweeper.get("params") or {})
    cli = OverridesParser.create().parse_overrides(sweep_command_line(hc))
    return keys | {o.key_or_group for o in cli if o.is_sweep_override()}


CONTINUE_KEYS = ("trainer.resume", "trainer.max_iters", "trainer.eval_interval", "trainer.eval_iters",
                 "trainer.log_interval", "trainer.device", "logger.", "callbacks.", "paths.", "hydra.")


def check_same_job(run_dir: Path, current: list[str]) -> None:
    """UserError when a continued sweep job's overrides differ from those its checkpoints were trained with (but for
    CONTINUE_KEYS, which a continued run may change): else the job's records would name settings it never ran."""
    before = previous_overrides(run_dir)
    if before is None:
        return
    old, new = (_override_values(overrides) for overrides in (before, current))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(CONTINUE_KEYS))
    if changed:
        diff = ", ".join(f"{k}={old.get(k, 'default')} (now {new.get(k, 'default')})" for k in changed)
        raise UserError(f"job directory {run_dir} was trained with {diff}: continue the sweep with its original "
                        f"values, or start it in a new hydra.sweep.dir")


SAME_MATH_KEYS = ("run_name", "init_from", "data.cache_dir", "data.num_proc", "trainer.compile", "trainer.cpu_streams",
                  "trainer.grad_checkpoint")  # where a run is, and how its steps are computed: not what it learns


def changed_settings(saved: dict, cfg: DictConfig) -> list[str]:
    """`key=now (was before)` for each setting a continued run changes from its checkpoint's config (`saved`), but
    for those a continued run may change without changing what it learns (CONTINUE_KEYS, SAME_MATH_KEYS)."""
    before, now = dotted(saved), dotted(masked_container(cfg))
    return [f"{key}={now[key]} (was {before[key]})" for key in now
            if key in before and now[key] != before[key] and not key.startswith((*CONTINUE_KEYS, *SAME_MATH_KEYS))]


def _override_values(overrides: list[str]) -> dict[str, object]:
    """key -> value of `key=value` overrides, numbers as numbers (3e-3 == 0.003)."""
    values = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        try:
            values[key] = float(value)
        except ValueError:
            values[key] = value
    return values


def settle_sweep(sweep_dir: Path) -> None:
    """End of a multirun: drop the kept records of its jobs that did not run this time."""
    for previous in sweep_dir.glob(f"*/{PREVIOUS}"):
        settle_records(previous.parent, failed=True)


def is_main_process() -> bool:
    import mlx.core as mx

    return mx.distributed.init().rank() == 0  # the ranks of one distributed run share its directory


def write_nothing(config: DictConfig) -> None:
    """Hydra writes no `.hydra/` and no job log file for this process (another rank of rank 0's distributed run), and
    its console shows only warnings and errors (rank 0 shows the run's messages: the config, the progress)."""
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        job_logging = config.hydra.job_logging
        if job_logging.get("handlers"):
            job_logging.handlers.pop("file", None)
            if "console" in job_logging.handlers:
                job_logging.handlers.console.level = "WARNING"
        if job_logging.get("root") and job_logging.root.get("handlers"):
            job_logging.root.handlers = [h for h in job_logging.root.handlers if h != "file"]


class PreflightCheck(HydraCallback):
    """Validates the config, the run dir and the checkpoint to resume, and locks the run dir, all before Hydra
    writes `.hydra/` into it: a refused run changes nothing."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        with _exit_on_user_error():
            validate(config)
            check_source(config.data)
            check_fits(config)  # the warning that it may not fit is the run's own (build_trainer)
            for group in ("sweep", "hparams_search"):
                if config.hydra.runtime.choices.get(group):
                    raise UserError(f"{group}={config.hydra.runtime.choices[group]} declares a sweep: run it with "
                                    f"-m (python train.py -m {group}=...)")
            t, run_dir = config.trainer, Path(config.hydra.run.dir)
            ckpt = check_start(t, run_dir, config.init_from)
            if ckpt is not None:
                state = checkpoint.verify(ckpt)
                if config.init_from is None:  # else the model's sizes may come from init_from: the trainer checks
                    checkpoint.check_model(ckpt, state, config.model)
            if is_main_process():
                lock_run_dir(run_dir)
                keep_records(run_dir)
            else:
                write_nothing(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """A sweep into a directory whose jobs have checkpoints continues them (trainer.resume=auto) or is refused
        whole, before any job rewrites one of them; else its command line is recorded there (multirun.yaml)."""
        with _exit_on_user_error():
            if "Slurm" in str(config.hydra.launcher.get("_target_")) and shutil.which("srun") is None:
                raise UserError("hydra/launcher=slurm needs Slurm (no srun on PATH): start the sweep on the cluster, "
                                "or try it on this machine with hydra/launcher=submitit_local")
            refuse_sweep_wide_error(config)
            sweep_dir = Path(config.hydra.sweep.dir)
            used = sorted(d for d in sweep_dir.glob("*") if checkpoint.latest(d / "checkpoints") is not None)
            if used and config.trainer.resume != "auto":
                raise UserError(f"sweep directory {sweep_dir} already has jobs with checkpoints ({used[0].name}, ...): "
                                f"continue them with the same sweep and trainer.resume=auto, or use a new "
                                f"hydra.sweep.dir")
            for run_dir in used:
                keep_records(run_dir)
            undo_if_no_job_runs(sweep_dir_restorer(sweep_dir))  # Hydra refuses some values only after this
            make_dir(sweep_dir, "the sweep directory", "set paths.log_dir (or MLXGPT_LOG_DIR) or hydra.sweep.dir to "
                                                       "a writable directory")
            OmegaConf.save(config, sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper does; Optuna's does not

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        job_started()


def sweep_dir_restorer(sweep_dir: Path) -> Callable[[], None]:
    """What puts `sweep_dir` back as it is now, before the sweep makes it and writes its multirun.yaml: removes what
    the sweep made, restores an earlier multirun.yaml; nothing once another entry appears (a submitted job's)."""
    sweep_dir = sweep_dir.absolute()
    record = sweep_dir / "multirun.yaml"
    before = record.read_bytes() if record.is_file() else None
    made = [d for d in (sweep_dir, *sweep_dir.parents) if not d.exists()]  # deepest first
    entries = _entries(sweep_dir)

    def restore() -> None:
        if _entries(sweep_dir) != entries:
            return
        if before is None:
            record.unlink(missing_ok=True)
        else:
            record.write_bytes(before)
        for directory in made:
            with contextlib.suppress(OSError):  # only an empty one goes
                directory.rmdir()

    return restore


def _entries(directory: Path) -> set[str]:
    """The names in `directory` but its multirun.yaml (none when it is not there)."""
    return {p.name for p in directory.iterdir()} - {"multirun.yaml"} if directory.is_dir() else set()


def check_start(t: DictConfig, run_dir: Path, init_from: str | None) -> Path | None:
    """Whether this run may start in `run_dir` (UserError if not); the checkpoint it resumes from, if any."""
    if t.eval_only and not (init_from or t.resume not in (None, "auto")):
        raise UserError("trainer.eval_only=true evaluates saved weights: add init_from=<run or checkpoint dir> "
                        "(or gpt2, ...), with a run_name of its own")
    if t.resume is None or t.eval_only:
        refuse_used_run_dir(run_dir)
    check_init_from(init_from)
    ckpt = resume_checkpoint(t.resume, run_dir)
    refuse_other_checkpoint(t.resume, ckpt, run_dir)
    return ckpt


def check_init_from(init_from: str | None) -> None:
    """UserError unless init_from is empty, GPT-2 weights, or a run or checkpoint dir that is there and whole."""
    if init_from and not is_pretrained(init_from):
        checkpoint.verify(checkpoint.resolve_best(init_from))


def refuse_sweep_wide_error(config: DictConfig) -> None:
    """UserError when a setting that no job of the sweep changes is wrong (trainer.batch_size=-1, a missing
    init_from): the sweep's settings and its first job's fail alike, so every job would fail one after another. Files
    (data, init_from) are checked only where the jobs run on this machine (a Slurm node may see other files)."""
    files = "Slurm" not in str(config.hydra.launcher.get("_target_"))
    error = _config_error(lambda: config, files)
    if error is not None and _config_error(lambda: first_job_config(config), files) == error:
        raise UserError(error)


def _config_error(compose: Callable[[], DictConfig], files: bool) -> str | None:
    """The one-line user error of a composed config's checks (those that need no run dir or device; with `files`, the
    data and init_from files too), else None."""
    try:
        job = compose()
        validate(job)
        if files:
            check_source(job.data)
            check_init_from(job.init_from)
    except Exception as e:
        return user_message(e)
    return None


@contextlib.contextmanager
def _exit_on_user_error():
    """In a Hydra callback (whose exceptions Hydra turns into a warning, then runs the job unchecked): a user error
    ends the process with one line, any other with its traceback and exit code 1."""
    try:
        yield
    except Exception as e:
        message = user_message(disk_error(e) or e)  # also e.g. an interpolation that does not resolve
        if message is None:
            traceback.print_exc()
            sys.exit(1)
        fail(message)
