"""The one exception type for problems a user can fix (bad config, data, checkpoint)."""


class UserError(Exception):
    """A user-fixable problem; the message is one line: what is wrong and how to fix it."""
