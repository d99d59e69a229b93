"""Merged directory listings, kept under one ceiling on the entries they hold together.

A directory's merged listing (`Node.listing`) and its listing snapshots (`Node.snaps`) are a cache
of what its branches hold: `Union.listing` builds the listing again from the branches whenever it
is missing.  `Listings` keeps the directories that have one, least recently used first, and drops
the listings and snapshots of the oldest when their entries together pass `Listings.capacity`, so
the daemon's memory for listings is bounded however many large directories the kernel keeps.

What is never dropped:
- the listings a request is using: those used since the current request started
  (`next_request`), as with `DirFds`, and those pinned (`pinned`) by a request across an await;
- the (empty) listing of a directory with no name left (removed while known): its branch
  directories may still hold what it showed before, so it could not be rebuilt.

A listing snapshot dropped with its directory's listing is the only loss a reader can see: a
reader part-way through it goes on at the same position in a new snapshot (see
`Operations._snapshot`).  Listings are dropped least recently used first, so this happens only to
a reader that paused while more than the whole ceiling of entries was listed elsewhere.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .config import DEFAULT_MAX_ENTRIES as DEFAULT_MAX_ENTRIES  # (the default of -o max_cached_entries)

if TYPE_CHECKING:
    from .nodes import Node

log = logging.getLogger(__name__)


def _size(node: Node) -> int:
    n = 0 if node.listing is None else len(node.listing)
    if node.snaps:
        n += sum(len(s) for s in node.snaps.values())
    return n


class Listings:
    """The directories with a listing, least recently used first, holding at most *capacity*
    entries together (plus those the current request uses or pins)."""

    def __init__(self, capacity: int = DEFAULT_MAX_ENTRIES) -> None:
        self.capacity = capacity
        self.total = 0
        self.request = 1
        self._kept: OrderedDict[Node, tuple[int, int]] = OrderedDict()  # node -> (entries, request)
        self._pins: dict[Node, int] = {}
        self.root: Node | None = None   # has no name, yet its listing can always be rebuilt

    def __len__(self) -> int:
        return len(self._kept)

    def next_request(self) -> None:
        """A new request starts: listings used before may be dropped from now on."""
        self.request += 1

    def use(self, node: Node, grown: bool = False) -> None:
        """*node*'s listing was read (or, with *grown*, built or given more entries or snapshots):
        make it the most recently used, and drop the oldest listings if the ceiling is passed."""
        kept = self._kept.get(node)
        if kept is not None and kept[1] == self.request and not grown:
            return
        if not node.links and node is not self.root:
            return      # no name left: its (empty) listing cannot be rebuilt, and is never dropped
        size = _size(node)
        if kept is None:
            self.total += size
        else:
            self.total += size - kept[0]
            self._kept.move_to_end(node)
        self._kept[node] = (size, self.request)
        if self.total > self.capacity:
            self._trim()

    def drop(self, node: Node) -> None:
        """*node* is gone: forget it (its listing is dropped with it)."""
        kept = self._kept.pop(node, None)
        if kept is not None:
            self.total -= kept[0]

    @contextlib.contextmanager
    def pinned(self, *nodes: Node) -> Iterator[None]:
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
            node.snaps = None
            dropped += 1
        if dropped:
            log.debug("dropped %d directory listings: %d entries kept in %d", dropped, self.total, len(kept))
