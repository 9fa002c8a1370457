"""The one exception type for bad input: its message names the file, key or value and what was expected.
Console scripts print it as a single line and exit with status 2."""


class ClipgenError(Exception):
    """User-facing error; ``str(err)`` is one line naming the thing at fault and what was expected."""
