"""Long system calls off the trio thread, so one slow request does not stall the others.

The daemon answers every request on one trio thread.  A system call that may take long — fsync, a
large read or write, the copy of a big file — runs on a worker thread instead, and the requests that
arrive meanwhile are answered.  Small metadata calls stay inline: handing them to a thread costs more
than they do (measured: every handler on a thread made the benchmarks 1.4-5x slower).

Workers are bounded per `Offload` by two `trio.CapacityLimiter`s: one for the requests' own I/O
(fsync, big reads, writes and fallocates), one for bulk work that may take seconds (copying a big file
up, freeing a big file's blocks), so that a few slow truncates never hold up every fsync.  A call
waiting for a worker holds no worker and may be cancelled until one is free.  Once on its thread, a
call runs to the end.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import trio

from unionfs.core.interfaces import BIG_IO, FREE_BIG

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["BIG_IO", "FREE_BIG", "WORKERS", "Offload"]

#: Worker threads at most, for each of the two kinds of offloaded call of one union.
WORKERS = 4


class Offload:
    """Runs blocking calls on at most *workers* threads at a time for each kind (I/O and bulk): the
    union's `Executor` (see `unionfs.core.interfaces`), with the locks of its copy-ups."""

    def __init__(self, workers: int = WORKERS) -> None:
        self.workers = workers
        self._limiters: dict[bool, trio.CapacityLimiter] = {}

    def limiter(self, bulk: bool = False) -> trio.CapacityLimiter:
        # Made on first use, inside the trio run that uses it.
        lim = self._limiters.get(bulk)
        if lim is None:
            lim = self._limiters[bulk] = trio.CapacityLimiter(self.workers)
        return lim

    def lock(self) -> trio.Lock:
        return trio.Lock()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a bulk worker thread; the caller keeps whatever it passes alive until then."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter(bulk=True))

    async def on_fd(self, fd: int, fn: Callable[..., T], *args: object, bulk: bool = False) -> T:
        """``fn(dup, *args)`` on a worker thread, *dup* being a duplicate of the open file *fd* (a
        bulk worker with *bulk*).

        The duplicate keeps the open file alive for the call: meanwhile the owner of *fd* may close
        it (a release) or replace it (a handle following its file's copy-up), and the number may be
        reused, without the call seeing another file or EBADF.  The thread closes the duplicate when
        the call returns, so the last close of a file released meanwhile happens there too.
        """
        dup = os.dup(fd)
        started = False

        def call() -> T:
            nonlocal started
            started = True
            try:
                return fn(dup, *args)
            finally:
                os.close(dup)

        try:
            return await trio.to_thread.run_sync(call, limiter=self.limiter(bulk))
        finally:
            if not started:     # cancelled while waiting for a worker
                os.close(dup)

    async def close(self, fd: int) -> None:
        """Close *fd* on a worker thread: the last reference to a big unlinked file frees its blocks
        there.  Closed inline if cancelled while waiting for a worker."""
        started = False

        def call() -> None:
            nonlocal started
            started = True
            os.close(fd)

        try:
            await trio.to_thread.run_sync(call, limiter=self.limiter(bulk=True))
        finally:
            if not started:
                os.close(fd)

    def close_soon(self, fd: int) -> None:
        """`close` *fd* in the background, from a trio system task (trio waits for it before
        `trio.run` returns): for a caller that answers its request first."""
        trio.lowlevel.spawn_system_task(self._close_logged, fd)

    async def _close_logged(self, fd: int) -> None:
        try:
            await self.close(fd)
        except OSError as e:    # an error of the branch's filesystem: nobody left to tell but the log
            log.warning("closing a released file: %s", e)
