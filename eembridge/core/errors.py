"""Exceptions shared by every layer."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line, no traceback."""

    exit_code = 2


class CaptureError(UserError):
    """An input file is not a capture we can read; the message names the problem."""
