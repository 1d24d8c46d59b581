"""Entry-point plumbing: run a Hydra app so that user errors end in one line and a non-zero exit."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mlxgpt.errors import UserError

EXIT_USER_ERROR = 2


def _causes(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def one_line(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf error: the option or key at fault and how to fix it."""
    if isinstance(exc, MissingConfigException) and exc.options:
        group, _, name = (exc.missing_cfg_file or "").rpartition("/")
        return f"no option '{name}' in config group '{group}'; available: {', '.join(sorted(exc.options))}"
    for cause in _causes(exc):
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            reason = (cause.msg or str(cause)).splitlines()[0]
            if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
                return (f"unknown config key '{cause.full_key}' ({reason}); check the spelling, "
                        f"`--cfg job` lists every key")
            return f"invalid value for '{cause.full_key}': {reason}"
    return " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())


def run_hydra(main: Callable[[], object]) -> None:
    """Call a @hydra.main function; config and user errors print one line to stderr and exit 2."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let exceptions reach us instead of Hydra's multi-line report
    try:
        main()
    except UserError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        fail(one_line(e))


def exit_on_user_error(task: Callable) -> Callable:
    """Wrap a Hydra task so a UserError ends the process with one line (Hydra would add its own report)."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except UserError as e:
            fail(str(e))

    return wrapper


def fail(message: str) -> None:
    """Print `error: message` on stderr and exit 2 (a user error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
