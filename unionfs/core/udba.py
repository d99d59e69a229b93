"""How the union learns of changes made directly in its branches: ``-o udba=none|reval|notify``
(AUFS's "user's direct branch access").

The daemon keeps a directory's merged listing and each node's stat until a change *through the
union* drops them, and the kernel keeps names and attributes for ``timeout=`` seconds.  A file
added, removed or changed directly in a branch is seen:

- ``none``: when those caches let go (a listing dropped under its ceiling, a node forgotten, the
  kernel's timeout) — or never, for a listing the daemon keeps.  No cost.
- ``reval``: at once.  Before a cached listing answers, the stamp of each of the directory's branch
  directories (inode, mtime, ctime: one fstat each) is compared with the one taken when the
  listing was built; a difference drops the listing and the stats of its known children.  Names
  and attributes are stat'ed again at each lookup and getattr, and the kernel is given zero
  timeouts (it would otherwise answer from its own cache without asking).  The stamps rely on
  fine-grained directory timestamps (Linux 6.13 on: a change after a stat gets a new mtime).
- ``notify``: a watcher of the floor above (`Watches`, the server's fanotify marks) is asked to
  watch the branch directories of each directory whose listing is built; a watched directory is
  trusted (its stamp is `WATCHED`) and the watcher drops what changed when it is told.  One it
  could not watch (its limit reached) is re-checked as under ``reval``.

Changes made by the union itself have the directories they change stamped again as the next
request starts (`Udba.restamp`), so they cost no rebuild.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .nodes import Node, NodeTable

log = logging.getLogger(__name__)

NONE, REVAL, NOTIFY = "none", "reval", "notify"
MODES = (NONE, REVAL, NOTIFY)
#: The stamp of a directory whose branch directories are watched: trusted, never re-checked.
WATCHED: tuple[int, ...] = ()

Stamp = tuple[int, ...]


class Watches(Protocol):
    """What the floor above watches for ``notify`` (the server's `unionfs.server.watch.Watcher`)."""

    def watch(self, node: Node) -> bool:
        """Watch directory *node*'s branch directories; False when it cannot (its limit reached)."""
        ...

    def unwatch(self, node: Node) -> None:
        """Stop watching *node* (forgotten by the kernel, or its branch directories changed)."""
        ...

    def stale(self, node: Node) -> None:
        """A re-check found directory *node* changed: drop what the kernel cached of its listing."""
        ...


class NoWatches:
    def watch(self, node: Node) -> bool:
        return False

    def unwatch(self, node: Node) -> None:
        return None

    def stale(self, node: Node) -> None:
        return None


NO_WATCHES = NoWatches()


class Udba:
    """The policy of one union: *mode* (one of MODES), and the watcher of ``notify``."""

    def __init__(self, table: NodeTable, mode: str = NONE, watches: Watches = NO_WATCHES) -> None:
        if mode not in MODES:
            raise ValueError(f"udba={mode}: use one of {', '.join(MODES)}")
        self.table = table
        self.changing: set[Node] = set()  # directories the union changed in this request
        self.mode = mode
        self.active = mode != NONE
        self.watches = watches

    def stamp_of(self, d: Node) -> Stamp:
        """What a change in any of *d*'s branch directories changes."""
        out: list[int] = []
        for layer, fd in self.table.branch_fds(d):
            st = os.fstat(fd)
            out += (layer, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
        return tuple(out)

    def trusted(self, d: Node) -> bool:
        """Whether what is cached of directory *d* (its listing, its children's stats) may answer
        without a re-check."""
        return not self.active or d.stamp is WATCHED

    def listed(self, d: Node) -> None:
        """*d*'s listing was just built from its branches: watch it, or stamp it."""
        if not self.active:
            return
        if d.stamp is WATCHED:
            return
        if self.mode == NOTIFY and self.watches.watch(d):
            d.stamp = WATCHED
            return
        d.stamp = self.stamp_of(d)

    def fresh(self, d: Node) -> bool:
        """Whether *d*'s cached listing still holds (call only when not `trusted`).  When it does
        not, the listing and the stats of *d* and its known children are dropped, and the kernel's
        cached listing with them."""
        if d in self.changing:
            return True
        old = d.stamp
        now = self.stamp_of(d)
        d.stamp = now
        if old is None or old == now:   # None: made by the union itself (mkdir), stamped now
            return True
        self.drop(d)
        self.watches.stale(d)
        return False

    def drop(self, d: Node) -> None:
        """Forget what the daemon cached of directory *d*'s listing and of its known children."""
        self.table.listings.forget(d)
        d.listing = None
        d.st = None
        d.xattrs = None
        for child in d.children.values():
            child.st = None
            child.xattrs = None

    def restamp(self, d: Node) -> None:
        """The union itself changes directory *d* (or just did): until this request ends its listing
        is trusted (the union keeps it up to date itself), and the next request starts by stamping
        it again.  (A change made directly in a branch in between goes unseen until the next one.)"""
        if d.stamp:     # neither None nor WATCHED
            self.changing.add(d)
            self.table.on_next_request = self.flush

    def flush(self) -> None:
        """A new request starts: stamp again the directories the union changed in the last ones."""
        self.table.on_next_request = None
        changing, self.changing = self.changing, set()
        for d in changing:
            if d.stamp:
                try:
                    d.stamp = self.stamp_of(d)
                except OSError:
                    d.stamp = None

    def grew(self, d: Node) -> None:
        """Directory *d* was just given a directory in the writable branch (copied up): watch that
        one too."""
        if d.stamp is WATCHED:
            self.watches.unwatch(d)
            d.stamp = None
            self.listed(d)
        elif d.stamp:
            d.stamp = None

    def freed(self, d: Node) -> None:
        """Directory *d* is being dropped: its watches go with it."""
        if d.stamp is WATCHED:
            self.watches.unwatch(d)
        d.stamp = None

    def regroup(self, d: Node) -> None:
        """Directory *d*'s branch directories are about to change (one appeared or went in a
        branch): forget its stamp or watches, and its listing."""
        self.freed(d)
        self.drop(d)
