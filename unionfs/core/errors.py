"""Errors that reach the user as one line."""
from __future__ import annotations


class QuietError(Exception):
    """A user error: printed as one line on stderr, no traceback, and a non-zero exit."""

    def __init__(self, message: str, exitcode: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.message
