"""Branch directories of union directories, held open in a bounded cache.

A union directory knows each of its branch directories by identity (branch, st_dev, st_ino) and
holds it open only while it is among the most recently used: the fds the daemon keeps on its own are
bounded by `DirFds.capacity`, whatever the kernel caches and however many directories users make.
A closed one is opened again on demand relative to its parent's branch directory, one name at a
time with O_NOFOLLOW|O_DIRECTORY, up to an ancestor still open (the branch roots always are); the
object opened must be the one recorded (ESTALE otherwise), so nothing is ever followed or mistaken.

An fd handed out by `DirFds.fd` stays open until the next request starts (`next_request`): callers
use it within one synchronous stretch and never across an await, as any other fd they compute.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
from collections import OrderedDict
from typing import TYPE_CHECKING

from .layers import open_dir_at

if TYPE_CHECKING:
    from .inodes import Node

log = logging.getLogger(__name__)

#: Never hold more than this many branch directories open, however high RLIMIT_NOFILE is.
MAX_CAPACITY = 65536
#: A branch root: opened by the LayerStack, never closed here.
FIXED = -1
#: A directory with no name left (removed while known): it cannot be opened again, so it stays open
#: until its node is dropped.
ORPHAN = -2


class BranchDir:
    """One branch's directory of a union directory: its identity and, while cached, an open fd."""

    __slots__ = ("node", "layer", "dev", "ino", "fd", "used")

    def __init__(self, node: Node, layer: int, dev: int, ino: int, fd: int, used: int) -> None:
        self.node = node
        self.layer = layer
        self.dev = dev
        self.ino = ino
        self.fd = fd            # -1 while closed
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


class DirFds:
    """The open branch directories, least recently used first, at most *capacity* of them (plus,
    for the length of one request, those the request is using)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.request = 1
        self._open: OrderedDict[BranchDir, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def next_request(self) -> None:
        """A new request starts: fds handed out before may be closed from now on."""
        self.request += 1

    def fixed(self, node: Node, layer: int, fd: int) -> BranchDir:
        """A branch root, owned by its LayerStack: always open, never closed here."""
        st = os.fstat(fd)
        return BranchDir(node, layer, st.st_dev, st.st_ino, fd, FIXED)

    def adopt(self, node: Node, layer: int, fd: int, in_use: bool = False) -> BranchDir:
        """Take over the open directory *fd*; with *in_use*, the caller goes on using it."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        bd = BranchDir(node, layer, st.st_dev, st.st_ino, fd, self.request if in_use else 0)
        self._open[bd] = None
        self._trim(bd)
        return bd

    def fd(self, bd: BranchDir) -> int:
        """An open fd of *bd*, opened again if it was closed; valid until the next request."""
        if bd.fd >= 0:
            if bd.used != self.request and bd.used >= 0:
                bd.used = self.request
                self._open.move_to_end(bd)
            return bd.fd
        fd = self._reopen(bd)
        bd.used = self.request
        return fd

    def close(self, bd: BranchDir) -> None:
        """Close *bd* for good (its node is dropped, or no longer merges this branch)."""
        if bd.fd >= 0 and bd.used != FIXED:
            self._open.pop(bd, None)
            _close_quietly(bd.fd)
        bd.fd = -1

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

    def _reopen(self, bd: BranchDir) -> int:
        # Walk up to the nearest ancestor whose directory in this branch is open, then down again.
        chain: list[tuple[BranchDir, bytes]] = []
        cur = bd
        while cur.fd < 0:
            parent, name = cur.node.name_in()
            up = parent.branch_dir(cur.layer)
            if up is None:
                raise OSError(errno.ESTALE, "directory no longer in its branch", os.fsdecode(name))
            chain.append((cur, name))
            cur = up
        fd = self.fd(cur)
        for child, name in reversed(chain):
            fd = self._open_child(fd, child, name)
        return fd

    def _open_child(self, parent_fd: int, bd: BranchDir, name: bytes) -> int:
        try:
            fd = self._open_dir(parent_fd, name)
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
        self._open[bd] = None
        self._trim(bd)
        return fd

    def _open_dir(self, parent_fd: int, name: bytes) -> int:
        try:
            return open_dir_at(parent_fd, name)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
        # Files users hold open took the room: give back half of ours and try once more.
        log.info("out of file descriptors: closing %d cached directories", len(self._open) // 2)
        self._trim(None, len(self._open) // 2)
        return open_dir_at(parent_fd, name)

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
            bd.fd = -1

    def close_all(self) -> None:
        for bd in self._open:
            _close_quietly(bd.fd)
            bd.fd = -1
        self._open.clear()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
