"""The one exception type users see: its message is a single line naming the problem and the fix."""


class NanoplayError(Exception):
    """A problem with the user's input or environment (not a bug): shown as one line, exit code 2."""

    exit_code = 2
