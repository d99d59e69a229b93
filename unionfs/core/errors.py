"""Errors that reach the user as one line."""
from __future__ import annotations

import os


class QuietError(Exception):
    """A user error: printed as one line on stderr, no traceback, and a non-zero exit."""

    def __init__(self, message: str, exitcode: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.message


def describe(exc: BaseException) -> str:
    """One line for *exc*: ``step path: reason`` for an OSError that names its step (as the
    launcher's calls do), ``path: reason`` for the stdlib's, the message otherwise."""
    if not isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    step = exc.strerror if exc.strerror and exc.strerror != reason else ""
    where = " ".join(str(x) for x in (step, exc.filename) if x)
    return f"{where}: {reason}" if where else reason
