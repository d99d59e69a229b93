"""Branch directories of union directories, held open in a bounded cache.

A union directory knows each of its branch directories by identity (branch, st_dev, st_ino) and
holds it open only while it is among the most recently used: the fds the daemon keeps on its own are
bounded by `DirFds.capacity`, whatever the kernel caches and however many directories users make.
A closed one is opened again on demand relative to its parent's branch directory, one name at a
time with O_NOFOLLOW|O_DIRECTORY, up to an ancestor still open (the branch roots always are); the
object opened must be the one recorded (ESTALE otherwise), so nothing is ever followed or mistaken.

An fd handed out by `DirFds.fd` stays open until the next request starts (`next_request`): callers
use it within one synchronous stretch and never across an await, as any other fd they compute.
A request that walks many directories in one go (copying a deep tree's parents up) would hold them
all that way: it takes `DirFds.pins` around the walk and releases, level by level, the fds it began
to use and no longer needs.  Only fds no one in the request had before are released, so an fd a
caller obtained earlier always stays valid.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from .branches import DirFd

log = logging.getLogger(__name__)

#: Never hold more than this many branch directories open, however high RLIMIT_NOFILE is.
MAX_CAPACITY = 65536
#: A branch root: opened by the LayerStack, never closed here.
FIXED = -1
#: A directory with no name left (removed while known): it cannot be opened again, so it stays open
#: until its node is dropped.
ORPHAN = -2


class Named(Protocol):
    """What a branch directory needs of its union directory (`nodes.Node`) to be opened again."""

    @property
    def id(self) -> int: ...

    def name_in(self) -> tuple[Named, bytes]: ...

    def branch_dir(self, layer: int) -> BranchDir | None: ...


#: The fd of a branch directory not open at the moment.
CLOSED = DirFd(-1)


class BranchDir:
    """One branch's directory of a union directory: its identity and, while cached, an open fd."""

    __slots__ = ("node", "layer", "dev", "ino", "fd", "used")

    def __init__(self, node: Named, layer: int, dev: int, ino: int, fd: DirFd, used: int) -> None:
        self.node = node
        self.layer = layer
        self.dev = dev
        self.ino = ino
        self.fd = fd            # CLOSED (-1) while closed
        self.used = used        # request that last used it, or FIXED / ORPHAN

    def __repr__(self) -> str:
        return f"BranchDir(node={self.node.id}, layer={self.layer}, fd={self.fd})"


def default_capacity(branches: int) -> int:
    """Half the soft RLIMIT_NOFILE (the rest is for files users open), at least enough for a few
    directories of every branch at once."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = MAX_CAPACITY * 2
    return max(16 + 4 * branches, min(soft // 2, MAX_CAPACITY))


class Pins:
    """The branch directories a stretch of one request began to use (see `DirFds.pins`)."""

    __slots__ = ("fds", "bds")

    def __init__(self, fds: DirFds) -> None:
        self.fds = fds
        self.bds: list[BranchDir] = []

    def release(self, keep: BranchDir | None = None) -> None:
        """Let the fds this stretch began to use be closed again, but *keep*'s.

        The caller must hold none of them any more (but *keep*'s): each may be closed, and its
        number reused, by the next fd opened.
        """
        fds = self.fds
        kept = []
        for bd in self.bds:
            if bd is keep:
                kept.append(bd)
            elif bd.used == fds.request:
                bd.used = 0
        self.bds = kept
        fds.trim()


class DirFds:
    """The open branch directories, least recently used first, at most *capacity* of them (plus,
    for the length of one request, those the request is using)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.request = 1
        self._open: OrderedDict[BranchDir, None] = OrderedDict()
        self._pins: Pins | None = None
        self.reopened = 0       # branch directories opened again after the cache closed them

    def __len__(self) -> int:
        return len(self._open)

    def next_request(self) -> None:
        """A new request starts: fds handed out before may be closed from now on."""
        self.request += 1

    @contextmanager
    def pins(self) -> Iterator[Pins]:
        """Record the branch directories this request begins to use inside the block, so that
        the block can release them (`Pins.release`) before the request ends.  Those the request
        used before the block are not recorded: they stay in use.  Not nested; on leaving, the
        ones not released stay in use until the request ends."""
        if self._pins is not None:
            raise RuntimeError("DirFds.pins does not nest")
        pins = self._pins = Pins(self)
        try:
            yield pins
        finally:
            self._pins = None

    def _use(self, bd: BranchDir) -> None:
        """*bd* is in use until the request ends (or a `Pins` that recorded it releases it)."""
        bd.used = self.request
        if self._pins is not None:
            self._pins.bds.append(bd)

    def fixed(self, node: Named, layer: int, fd: DirFd) -> BranchDir:
        """A branch root, owned by its LayerStack: always open, never closed here."""
        st = os.fstat(fd)
        return BranchDir(node, layer, st.st_dev, st.st_ino, fd, FIXED)

    def adopt(self, node: Named, layer: int, fd: DirFd, in_use: bool = False) -> BranchDir:
        """Take over the open directory *fd*; with *in_use*, the caller goes on using it."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        bd = BranchDir(node, layer, st.st_dev, st.st_ino, fd, 0)
        if in_use:
            self._use(bd)
        self._open[bd] = None
        self._trim(bd)
        return bd

    def fd(self, bd: BranchDir) -> DirFd:
        """An open fd of *bd*, opened again if it was closed; valid until the next request."""
        if bd.fd >= 0:
            if bd.used != self.request and bd.used >= 0:
                bd.used = self.request          # as _use, inline: the lookup path's hot spot
                if self._pins is not None:
                    self._pins.bds.append(bd)
                self._open.move_to_end(bd)
            return bd.fd
        fd = self._reopen(bd)
        self._use(bd)
        return fd

    def trim(self) -> None:
        """Close least recently used fds not in use down to the capacity."""
        self._trim(None)

    def close(self, bd: BranchDir) -> None:
        """Close *bd* for good (its node is dropped, or no longer merges this branch)."""
        if bd.fd >= 0 and bd.used != FIXED:
            self._open.pop(bd, None)
            _close_quietly(bd.fd)
        bd.fd = CLOSED

    def orphan(self, bd: BranchDir) -> None:
        """*bd*'s node lost its last name: keep its fd (if open) until the node is dropped."""
        if bd.fd >= 0 and bd.used >= 0:
            self._open.pop(bd, None)
            bd.used = ORPHAN

    def named(self, bd: BranchDir) -> None:
        """*bd*'s node has a name again (moved): it is cached like any other."""
        if bd.used == ORPHAN:
            bd.used = 0
            if bd.fd >= 0:
                self._open[bd] = None
                self._trim(bd)

    def _reopen(self, bd: BranchDir) -> DirFd:
        # Walk up to the nearest ancestor whose directory in this branch is open, then down again.
        # The ancestors are used only here, one step at a time: none is kept in use (else a walk
        # down a deep tree would hold every level), each is only spared while its child opens.
        chain: list[tuple[BranchDir, bytes]] = []
        cur = bd
        while cur.fd < 0:
            parent, name = cur.node.name_in()
            up = parent.branch_dir(cur.layer)
            if up is None:
                raise OSError(errno.ESTALE, "directory no longer in its branch", os.fsdecode(name))
            chain.append((cur, name))
            cur = up
        if cur.used >= 0 and cur.used != self.request:
            self._open.move_to_end(cur)
        for child, name in reversed(chain):
            self._open_child(cur, child, name)
            cur = child
        return cur.fd

    def _open_child(self, parent: BranchDir, bd: BranchDir, name: bytes) -> None:
        try:
            fd = self._open_dir(parent, name)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):   # something else took its name: never follow
                raise OSError(errno.ESTALE, "directory replaced in its branch", os.fsdecode(name)) from None
            raise
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (bd.dev, bd.ino):
                raise OSError(errno.ESTALE, "directory replaced in its branch", os.fsdecode(name))
        except BaseException:
            os.close(fd)
            raise
        bd.fd = fd
        bd.used = 0
        self.reopened += 1
        self._open[bd] = None
        self._trim(bd)

    def _open_dir(self, parent: BranchDir, name: bytes) -> DirFd:
        try:
            return parent.fd.open_dir(name)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
        # Files users hold open took the room: give back half of ours (never the parent's) and
        # try once more.
        log.info("out of file descriptors: closing %d cached directories", len(self._open) // 2)
        self._trim(parent, len(self._open) // 2)
        return parent.fd.open_dir(name)

    def _trim(self, keep: BranchDir | None, target: int | None = None) -> None:
        """Close least recently used fds down to *target* (default: the capacity), sparing *keep*
        and those the current request is using."""
        limit = self.capacity if target is None else target
        spared = 0
        while len(self._open) > limit and spared < len(self._open):
            bd = next(iter(self._open))
            if bd is keep or bd.used == self.request:
                self._open.move_to_end(bd)
                spared += 1
                continue
            del self._open[bd]
            _close_quietly(bd.fd)
            bd.fd = CLOSED

    def close_all(self) -> None:
        for bd in self._open:
            _close_quietly(bd.fd)
            bd.fd = CLOSED
        self._open.clear()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
