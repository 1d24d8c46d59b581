"""Entry-point plumbing: run a script (a Hydra app) so that user errors end in one line and a non-zero exit."""
from __future__ import annotations

import functools
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

import hydra
from hydra._internal.utils import get_args_parser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from mlxgpt.config import dotted, register_configs
from mlxgpt.errors import UserError
from mlxgpt.startup import EXIT_INTERRUPTED

EXIT_USER_ERROR = 2
MULTIRUN_FLAGS = ("-m", "--multirun")


def _causes(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def one_line(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf error: the option or key at fault and how to fix it."""
    if isinstance(exc, OverrideParseException) and re.fullmatch(r"[\w.]+", exc.override):  # `model nano`
        return (f"'{exc.override}' is not an override: write key=value with no spaces around '=', e.g. "
                f"{exc.override}=...; `--help` lists them")
    if isinstance(exc, OverrideParseException):
        return (f"cannot parse the override {exc.override!r} (Hydra's override grammar); quote a value with special "
                f"characters, e.g. 'data.path=\"~/books/*.txt\"'")
    swept = re.match(r"(?:Ambiguous value for argument|Sweep parameters) '(.+?)'", str(exc))
    if swept:  # `optimizer.lr=1e-4,1e-3` (or a range(...), choice(...)) without -m; `prompt=Hello, world`
        key, _, value = swept[1].partition("=")
        script = Path(sys.argv[0]).name
        sweep = f"add -m to run one job for each (python {script} -m {swept[1]}), or " if script == "train.py" else ""
        return f"{swept[1]} is read as several values: {sweep}quote one value that holds commas: '{key}=\"{value}\"'"
    if "does not support sweep type : INTERVAL_SWEEP" in str(exc):  # `optimizer.lr=interval(1e-4,1e-3)` in a grid
        return ("interval(...) is a range to search, which a grid sweep cannot enumerate: list values (a,b,c) or "
                "range(start,stop,step) instead, or search it with Optuna: hparams_search=lr_depth_optuna")
    deleted = re.fullmatch(r"Could not delete from config\. '(.+)' does not exist\.", str(exc))
    if deleted:  # `~key` of a key the config lacks
        return f"cannot delete '{deleted[1]}': no such key; check the spelling, `--cfg job` lists every key"
    ungrouped = re.match(r"Could not override '(.+)'\. No match in the defaults list", str(exc))
    if ungrouped:  # e.g. sample.py model=nano: Hydra's advice (+model=nano) fails too
        return f"{Path(sys.argv[0]).name} has no config group '{ungrouped[1]}'; `--help` lists its options"
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        options = exc.options or [p.stem for p in (_app_conf() / group).glob("*.yaml")]
        if options:
            return f"no option '{name}' in config group '{group}'; available: {', '.join(sorted(options))}"
    for cause in _causes(exc):
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            reason = (cause.msg or str(cause)).splitlines()[0]
            if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
                callback = _unlisted_callback(cause.full_key)
                if callback:
                    return (f"the callback '{callback}' is not in this run's callbacks, so '{cause.full_key}' cannot "
                            f"be set; add it: callbacks=[default,{callback}]")
                return (f"unknown config key '{cause.full_key}' ({reason}); check the spelling, "
                        f"`--cfg job` lists every key")
            return f"invalid value for '{cause.full_key}': {reason}"
    return " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())


def _unlisted_callback(key: str) -> str | None:
    """The callback of a `callbacks.<name>...` key when conf/callbacks/ has it (so it is left out of the run's list)."""
    group, _, rest = key.partition(".")
    name = rest.split(".")[0]
    conf = _app_conf() / "callbacks" / f"{name}.yaml"
    return name if group == "callbacks" and name and conf.is_file() else None


def _app_conf() -> Path:
    """The running script's conf/ directory (its config groups), where Hydra's error does not list them."""
    return Path(sys.argv[0]).parent / "conf"


def user_message(exc: BaseException) -> str | None:
    """The one line to print for a user's mistake; None for anything else (a bug)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return one_line(exc)
    if _raised_in_hydra(exc):  # Hydra fails on some overrides (`callbacks=null`, `trainer=[0]`) with a plain error
        if "Only one of --run, --multirun" in str(exc):
            return f"{one_line(exc)}: -m with --cfg/--info shows nothing to run; drop one of them"
        return (f"invalid override ({type(exc).__name__}: {one_line(exc)}); a config group takes one option name, "
                f"e.g. model=nano")
    return None


def _raised_in_hydra(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(hydra.__file__).parent in Path(tb.tb_frame.f_code.co_filename).parents


_failed_jobs: set[str] = set()  # the jobs of this process's multirun that did not finish


def report_failed_jobs(names: list[str]) -> None:
    """Make the process exit 1 once Hydra returns: these jobs of the sweep failed."""
    _failed_jobs.update(names)


_undo_before_first_job: list[Callable[[], None]] = []  # puts back what a multirun wrote before its first job


def undo_if_no_job_runs(undo: Callable[[], None]) -> None:
    """Call `undo` if this multirun ends (Hydra refuses a swept value, Ctrl-C) before any of its jobs starts."""
    _undo_before_first_job.append(undo)


def job_started() -> None:
    """A job of the multirun has started: what the multirun wrote stays, however it ends."""
    _undo_before_first_job.clear()


def _no_job_ran() -> None:
    for undo in _undo_before_first_job:
        undo()


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's `main` and exit with the code it returns: a user error (UserError, a Hydra or OmegaConf error)
    prints one line to stderr and exits 2, Ctrl-C exits 130 (also while it imports: mlxgpt.startup)."""
    try:
        code = main()
    except BrokenPipeError:  # `--help | head`
        _end_quietly()
    except Exception as e:
        message = user_message(e)
        if message is None and type(e).__name__ == "UncompletedJobError":  # submitit's
            print(f"mlxgpt: {uncompleted_job(e)}", file=sys.stderr)
            sys.exit(1)
        if message is None:
            raise  # a bug: keep the traceback
        _no_job_ran()
        fail(message)
    except KeyboardInterrupt:  # outside the training loop, which stops on its own terms (mlxgpt.interrupt)
        _no_job_ran()
        print("mlxgpt: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code)


def run_hydra(main: Callable[[], object], schema: type) -> None:
    """run_main for a @hydra.main function whose config has the dataclass `schema`; a sweep with failed jobs exits 1
    after all have run."""
    run_main(functools.partial(_hydra_app, main, schema))


def _hydra_app(main: Callable[[], object], schema: type) -> int:
    """run_hydra's script: `--version`, nanoGPT-style flags refused, the app; its exit code."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let exceptions reach us instead of Hydra's multi-line report
    register_configs()
    sys.argv[1:] = multirun_flag_first(sys.argv[1:])
    if "--version" in sys.argv[1:]:  # Hydra's own would print its version only
        print(versions())
        return 0
    dashed = dashed_options(sys.argv[1:], schema)
    if dashed:
        fail(dashed)
    main()
    if _failed_jobs:
        print(f"mlxgpt: {len(_failed_jobs)} job(s) of the sweep failed: {', '.join(sorted(_failed_jobs))}",
              file=sys.stderr)
        return 1
    return 0


def multirun_flag_first(args: list[str]) -> list[str]:
    """args with -m / --multirun moved before the overrides: Hydra's parser refuses it between two of them (an
    override is one key=value token, so a bare -m is always the flag)."""
    flags = [a for a in args if a in MULTIRUN_FLAGS]
    return [*flags, *(a for a in args if a not in MULTIRUN_FLAGS)]


def versions() -> str:
    """`--version`: mlxgpt's, and those of the packages a run's results depend on."""
    packages = ", ".join(f"{name} {metadata.version(name)}" for name in ("mlx", "hydra-core", "numpy"))
    return f"mlxgpt {metadata.version('mlxgpt')} ({packages}, python {platform.python_version()})"


def dashed_options(args: list[str], schema: type) -> str | None:
    """The error for options Hydra's parser does not know, such as nanoGPT's `--max_iters=20` (argparse would print its
    usage): settings are key=value overrides, named as in `schema` (trainer.max_iters); None when there are none."""
    unknown = [a for a in get_args_parser().parse_known_args(args)[1] if a.startswith("-")]
    if not unknown:
        return None
    name, has_value, value = unknown[0].lstrip("-").partition("=")
    keys = [k for k in dotted(OmegaConf.to_container(OmegaConf.structured(schema))) if k.rsplit(".", 1)[-1] == name]
    script = Path(sys.argv[0]).name
    example = f", e.g. `python {script} {keys[0]}={value if has_value else '...'}`" if len(keys) == 1 else ""
    return f"unknown option {unknown[0]}: settings are key=value overrides without dashes{example}; `--help` lists them"


def uncompleted_job(exc: Exception) -> str:
    """One line for a submitted job (submitit, Slurm) that ended without a result (a signal, a time limit, a kill):
    which job, and the last line it wrote to stderr (a stopped job's: the command that continues the sweep)."""
    job, _, rest = str(exc).partition(" with path ")
    state = re.search(r"\(state: (\w+)\)", rest)
    last = next((line for line in reversed(rest.splitlines()) if line.strip() and not line.startswith("---")), "")
    return (f"{job.strip()} ended without a result" + (f" (state {state[1]})" if state else "")
            + (f"; its last message: {last.strip()}" if "Error stream produced" in rest else ""))


def exit_on_user_error(task: Callable) -> Callable:
    """Wrap a Hydra task so a UserError or a missing mandatory value ends the process with one line (Hydra would add
    its own report)."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except UserError as e:
            fail(str(e))
        except MissingMandatoryValue as e:
            fail(f"{e.full_key}= is required, e.g. `python {Path(sys.argv[0]).name} {e.full_key}=...`")

    return wrapper


def print_result(text: str) -> None:
    """Print a command's result; a reader that stops early (`| head`) ends the process quietly, as Unix tools do."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _end_quietly()


def print_stream(pieces: Iterable[str]) -> None:
    """print_result for text that comes in pieces (generated tokens): each is shown as soon as it arrives."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print(flush=True)
    except BrokenPipeError:
        _end_quietly()


def _end_quietly() -> None:
    """Exit 1 without a word once the reader of stdout has gone (`| head`), as Unix tools do."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
    sys.exit(1)


def shown_path(path: Path) -> str:
    """A path relative to the working directory when it lies below it (tables are often committed), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def fail(message: str) -> None:
    """Print `error: message` on stderr and exit 2 (a user error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
