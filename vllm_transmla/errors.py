"""One error type for everything a user can get wrong; its message names the problem and the fix."""


class TransMLAError(Exception):
    """A user-facing error: `str(err)` is one line saying what is wrong and how to fix it."""
