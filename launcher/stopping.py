"""How a launch waits for its container and stops it, as ``docker stop`` does.

The signals the launcher forwards to the container, and the stop clock: SIGTERM starts it, and once
``--stop-timeout`` has run out the caller kills PID 1 (or asks the runtime to) with SIGKILL.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Iterable

FORWARDED_SIGNALS = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
)


class StopClock:
    """The stop timeout of one container: armed by the first SIGTERM, run out once."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline: float | None = None
        self.killed = False

    def start(self) -> None:
        """SIGTERM arrived: the container has *timeout* seconds (a second SIGTERM changes nothing)."""
        if self.deadline is None and not self.killed:
            self.deadline = time.monotonic() + self.timeout

    def wait(self, waited: Iterable[int]) -> signal.struct_siginfo | None:
        """The next of the blocked signals *waited*, or None when the timeout ran out (the caller
        kills then; from then on only the container's end is left to wait for)."""
        if self.deadline is None:
            return signal.sigwaitinfo(waited)
        info = signal.sigtimedwait(waited, max(0.0, self.deadline - time.monotonic()))
        if info is None:
            self.deadline, self.killed = None, True
        return info
