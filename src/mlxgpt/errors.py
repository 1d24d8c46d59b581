"""The one exception type for problems a user can fix (bad config, data, checkpoint), and the write failures that are
such problems."""
from __future__ import annotations

import errno
from pathlib import Path

DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})  # a write


class UserError(Exception):
    """A user-fixable problem; the message is one line: what is wrong and how to fix it."""


def disk_error(exc: BaseException) -> UserError | None:
    """A one-line UserError for a failed write (disk full, read-only, no permission); None for other errors."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        target = exc.filename2 or exc.filename or "to the run directory"  # a copy's or a rename's: the second
        return UserError(f"cannot write {target} ({exc.strerror}); free disk space or fix permissions, then continue "
                         f"with trainer.resume=auto")
    return None


def make_dir(path: Path, what: str, fix: str) -> None:
    """mkdir -p `path`; a one-line UserError naming `what` it is and the `fix` when it cannot be (a file in the way,
    no such place, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {path} ({e.strerror}); {fix}") from None
