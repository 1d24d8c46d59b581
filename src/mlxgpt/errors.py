"""The one exception type for problems a user can fix (bad config, data, checkpoint), and the write failures that are
such problems."""
from __future__ import annotations

import errno

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
