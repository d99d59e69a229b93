"""What the core asks of the floor that runs it: worker threads and locks, and a kernel cache to correct.

The core imports neither pyfuse3 nor trio.  The server hands a `Union` its `Executor` (trio's worker
threads and locks, `unionfs.server.offload.Offload`) and its `Invalidator` (pyfuse3's cache
invalidation) when it is made.  A union used on its own (tests, tools) runs every call inline and
has no kernel cache to correct: `INLINE` and `NO_KERNEL_CACHE`.
"""
from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Protocol, TypeVar

T = TypeVar("T")

#: Reads and writes of at least this many bytes go to a worker thread (reads only when they would
#: wait for the disk: see `Resolver.read`).
BIG_IO = 256 << 10
#: Dropping the last reference to a file with this many bytes allocated happens on a worker thread
#: (ext4 frees 1.5 GiB in about 0.45 s).
FREE_BIG = 64 << 20


class Lock(Protocol):
    """A lock held across awaits (one per node, serialising its copy-up)."""

    async def __aenter__(self, /) -> object: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None, /) -> bool | None: ...


class Executor(Protocol):
    """Runs blocking calls that may take long off the thread that answers requests."""

    def lock(self) -> Lock:
        """A new lock for the tasks this executor's caller runs concurrently."""
        ...

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` as bulk work (seconds: copying a big file up)."""
        ...

    async def on_fd(self, fd: int, fn: Callable[..., T], *args: object, bulk: bool = False) -> T:
        """``fn(dup, *args)``, *dup* being a duplicate of the open file *fd* that the call owns
        (*fd* may be closed or replaced meanwhile); as bulk work with *bulk*."""
        ...


class Invalidator(Protocol):
    """Tells the kernel to drop what it cached of a node or a name that changed behind its back."""

    def invalidate_entry(self, parent_id: int, name: bytes) -> None: ...

    def invalidate_attr(self, node_id: int) -> None: ...


class _NoLock:
    """Needs no locking: with `Inline`, nothing awaited ever lets another task run."""

    async def __aenter__(self, /) -> None:
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None, /) -> None:
        return None


class Inline:
    """Every call inline, on the caller's thread; nothing ever yields, so no lock is needed."""

    def lock(self) -> Lock:
        return _NoLock()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return fn(*args)

    async def on_fd(self, fd: int, fn: Callable[..., T], *args: object, bulk: bool = False) -> T:
        return fn(fd, *args)


class NoKernelCache:
    """Nothing to invalidate: no kernel caches what this union answers."""

    def invalidate_entry(self, parent_id: int, name: bytes) -> None:
        return None

    def invalidate_attr(self, node_id: int) -> None:
        return None


INLINE = Inline()
NO_KERNEL_CACHE = NoKernelCache()
