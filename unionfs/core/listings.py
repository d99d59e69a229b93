"""Merged directory listings, kept under one ceiling on the entries they hold together.

A directory's merged listing (`Node.listing`) and what the floor above keeps beside it (the server's
listing snapshots for readers without a directory handle: a `Beside`) are a cache of what its
branches hold: `Union.listing` builds the listing again from the branches whenever it
is missing.  `Listings` keeps the directories that have one, least recently used first, and drops
the listings and snapshots of the oldest when their entries together pass `Listings.capacity`, so
the daemon's memory for listings is bounded however many large directories the kernel keeps.

What is never dropped:
- the listings a request is using: those used since the current request started
  (`next_request`), as with `DirFds`, and those pinned (`pinned`) by a request across an await;
- the (empty) listing of a directory with no name left (removed while known): its branch
  directories may still hold what it showed before, so it could not be rebuilt.

A listing snapshot dropped with its directory's listing is the only loss a reader can see: a
reader part-way through it goes on at the same position in a new snapshot (see the server's
`Operations._snapshot`).  Listings are dropped least recently used first, so this happens only to
a reader that paused while more than the whole ceiling of entries was listed elsewhere.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from .config import DEFAULT_MAX_ENTRIES as DEFAULT_MAX_ENTRIES  # (the default of -o max_cached_entries)
from .merge import Entry

log = logging.getLogger(__name__)


class Listed(Protocol):
    """What `Listings` needs of a directory node (`nodes.Node`)."""

    listing: dict[bytes, Entry] | None

    @property
    def id(self) -> int: ...

    @property
    def links(self) -> tuple[object, ...]: ...


class Beside(Protocol):
    """Entries a floor above keeps per directory beside its listing: counted against the ceiling,
    dropped with the listing and when the directory's node goes."""

    def entries(self, node: Listed) -> int: ...

    def drop(self, node: Listed) -> None: ...


class NothingBeside:
    def entries(self, node: Listed) -> int:
        return 0

    def drop(self, node: Listed) -> None:
        return None


NOTHING_BESIDE = NothingBeside()


class Listings:
    """The directories with a listing, least recently used first, holding at most *capacity*
    entries together (plus those the current request uses or pins)."""

    def __init__(self, capacity: int = DEFAULT_MAX_ENTRIES, beside: Beside = NOTHING_BESIDE) -> None:
        self.capacity = capacity
        self.beside = beside
        self.total = 0
        self.request = 1
        self._kept: OrderedDict[Listed, tuple[int, int]] = OrderedDict()  # node -> (entries, request)
        self._pins: dict[Listed, int] = {}
        self.root: Listed | None = None   # has no name, yet its listing can always be rebuilt
        # for statistics: listings read from memory, built from the branches, dropped under the ceiling
        self.hits = 0
        self.built = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._kept)

    def next_request(self) -> None:
        """A new request starts: listings used before may be dropped from now on."""
        self.request += 1

    def _size(self, node: Listed) -> int:
        listing = node.listing
        return (0 if listing is None else len(listing)) + self.beside.entries(node)

    def use(self, node: Listed, grown: bool = False) -> None:
        """*node*'s listing was read (or, with *grown*, built or given more entries or snapshots):
        make it the most recently used, and drop the oldest listings if the ceiling is passed."""
        kept = self._kept.get(node)
        if kept is not None and kept[1] == self.request and not grown:
            return
        if not node.links and node is not self.root:
            return      # no name left: its (empty) listing cannot be rebuilt, and is never dropped
        size = self._size(node)
        if kept is None:
            self.total += size
        else:
            self.total += size - kept[0]
            self._kept.move_to_end(node)
        self._kept[node] = (size, self.request)
        if self.total > self.capacity:
            self._trim()

    def drop(self, node: Listed) -> None:
        """*node*'s listing is gone: forget it."""
        kept = self._kept.pop(node, None)
        if kept is not None:
            self.total -= kept[0]

    def forget(self, node: Listed) -> None:
        """*node* is gone: forget it, and what was kept beside its listing."""
        self.drop(node)
        self.beside.drop(node)

    @contextlib.contextmanager
    def pinned(self, *nodes: Listed) -> Iterator[None]:
        """Keep the listings of *nodes* while a request awaits between uses of them."""
        for n in nodes:
            self._pins[n] = self._pins.get(n, 0) + 1
        try:
            yield
        finally:
            for n in nodes:
                left = self._pins[n] - 1
                if left:
                    self._pins[n] = left
                else:
                    del self._pins[n]

    def _trim(self) -> None:
        kept = self._kept
        spared = 0
        dropped = 0
        while self.total > self.capacity and spared < len(kept):
            node = next(iter(kept))
            size, used = kept[node]
            if used == self.request or node in self._pins:
                kept.move_to_end(node)
                spared += 1
                continue
            del kept[node]
            self.total -= size
            if not node.links and node is not self.root:
                continue    # lost its name meanwhile: keep its (empty) listing
            node.listing = None
            self.beside.drop(node)
            dropped += 1
        self.dropped += dropped
        if dropped:
            log.debug("dropped %d directory listings: %d entries kept in %d", dropped, self.total, len(kept))
