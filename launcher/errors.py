"""The launcher's one error: a `QuietError` whose exit status defaults to docker run's for a launch
that failed (125); a bad command line gives 2."""

from __future__ import annotations

from unionfs.core.errors import QuietError

EXIT_LAUNCH_FAILED = 125
EXIT_USAGE = 2


class LaunchError(QuietError):
    """A launch that failed for a reason the user can fix: one line, exit 125 unless told."""

    def __init__(self, message: str, exitcode: int = EXIT_LAUNCH_FAILED) -> None:
        super().__init__(message, exitcode)
