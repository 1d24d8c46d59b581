"""The one exception type for problems a user can fix (bad config, data, checkpoint), and the write failures that are
such problems."""
import errno

DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})  # a write


class UserError(Exception):
    """A user-fixable problem; the message is one line: what is wrong and how to fix it."""
