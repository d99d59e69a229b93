"""Nodes (what the kernel knows by node id) and the table that owns them.

A node is found by a key: for an object in the writable branch and for any directory, the real
object's (st_dev, st_ino), so hard links made through the union share one node; for a lower
non-directory, its name (parent node, name), so that, as on overlayfs, each name of a lower hard
link is its own inode and is copied up on its own.

Two numbers come from the real object: the node id the kernel uses (its inode number where that is
free, so it is stable across forgets) and the `st_ino` that `stat` shows (its inode number, tagged
with a filesystem index when branches span filesystems; after a copy-up, the copy's, as overlayfs
shows it).

Every name a node is known by is a link (parent node, name); a link holds a reference on its
parent, so a directory outlives its known children.  A node is dropped when the kernel has
forgotten it, no child refers to it and no handle is open on it.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

from .attrs import Stat
from .dirfds import BranchDir, DirFds, default_capacity
from .interfaces import Lock
from .listings import DEFAULT_MAX_ENTRIES, NOTHING_BESIDE, Beside, Listings
from .merge import Entry

if TYPE_CHECKING:
    from .branches import DirFd, LayerStack

log = logging.getLogger(__name__)

ROOT_ID = 1
#: How many nodes keep their stat cached (`NodeTable.remember`): a ceiling on that cache however
#: many objects the kernel knows (about 200 bytes each).
STATS_KEPT = 8192
FALLBACK_BASE = 1 << 60

# (st_dev, st_ino) of a real object, or (parent node id, name) of a lower non-directory
Key = tuple[int, int] | tuple[int, bytes]


# What a non-directory has for branch directories and children: nothing, and (being immutable) a
# bug that tried to give it some would fail loudly instead of sharing them.  An empty list and
# dict per node would cost 120 bytes per entry.
_NO_DIRS = cast("list[BranchDir]", ())
_NO_CHILDREN = cast("dict[bytes, Node]", MappingProxyType({}))


class Superseded(tuple):  # type: ignore[type-arg]
    """`Node.links` of a node whose names a live branch change took (`livebranches`): each now
    stands for another object, or for none.  Empty, as the links of a node with no name left, and
    *was*, the name it had.  The kernel may still hold the node and ask for it by a path it walked
    before the change: while that name shows an object, ESTALE makes it walk the path again (open,
    and every path call, retries once with LOOKUP_REVAL), where ENOENT would tell the caller that a
    name that exists does not (see `resolve.Resolver.gone`)."""

    was: tuple[Node, bytes]


def superseded(parent: Node, name: bytes) -> Superseded:
    """The links of a node whose name *name* in *parent* a branch change took."""
    links = Superseded()
    links.was = (parent, name)
    return links


class Node:
    """One object of the union.  Directories know their branch directories (`BranchDir`), which
    the table's `DirFds` holds open while they are in use."""

    __slots__ = ("id", "ino", "is_dir", "layer", "key", "links", "nlookup", "refs", "handles",
                 "dirs", "listing", "lock", "xattrs", "st", "children", "stamp", "lowerdata", "redirect",
                 "outside", "kind", "prefetched")

    def __init__(self, node_id: int, is_dir: bool, layer: int, key: Key, ino: int) -> None:
        self.id = node_id
        self.ino = ino                          # what stat shows as st_ino
        self.is_dir = is_dir
        self.layer = layer                      # branch that holds the object (directories: topmost)
        self.key = key                          # how the table finds it (see the module docstring)
        self.links: tuple[tuple[Node, bytes], ...] = ()  # names it is known by, most recent last
        self.nlookup = 0                        # lookups the kernel has not forgotten
        self.refs = 0                           # links of other nodes that name this one as parent
        self.handles = 0                        # open files and directories
        # directories: the branch directories, top first (others share one empty, immutable value)
        self.dirs: list[BranchDir] = [] if is_dir else _NO_DIRS
        self.listing: dict[bytes, Entry] | None = None  # directories: merged listing, built on demand
        self.lock: Lock | None = None            # serialises copy-up of this node
        # Names of the real object's xattrs, cached on first use: most getxattr calls (ls asks every
        # file for security.selinux) are for names that are not there and need no syscall.
        self.xattrs: frozenset[bytes] | None = None
        # The real object's stat, cached until a change through the union drops it (`touch`) or
        # the cache is full (`NodeTable.remember`): a warm readdir then answers from memory.
        self.st: Stat | None = None
        # directories: the node behind each linked name
        self.children: dict[bytes, Node] = {} if is_dir else _NO_CHILDREN
        # directories under -o udba=reval|notify: their branch directories' stamp or WATCHED (see udba)
        self.stamp: tuple[int, ...] | None = None
        # -o metacopy: the branch holding a metadata-only copy's data (see `metacopy`); 0 when the
        # object holds its own, None until looked at
        self.lowerdata: int | None = None
        # directories: the redirect of its upper directory (-o redirect_dir), as overlayfs keeps it
        self.redirect: bytes | None = None
        # The real file changes without the union seeing it (the kernel writes an open file's
        # backing file itself, with FUSE passthrough): its stat is not cached meanwhile.
        self.outside = False
        # The object's type (the S_IFMT bits of its mode): the kernel's inode for the node keeps it
        # for good, so a branch change may give the node another object only of the same type.
        self.kind = stat.S_IFDIR if is_dir else 0
        # A file's head was read ahead at its first open for reading (see resolve.open): the
        # kernel keeps the pages it reads through the mount, so later opens need no read ahead.
        self.prefetched = False

    def __repr__(self) -> str:
        names = [n for _, n in self.links]
        return f"Node({self.id}, dir={self.is_dir}, layer={self.layer}, names={names})"

    def branch_dir(self, layer: int) -> BranchDir | None:
        """This directory's directory in branch *layer*, if it has one."""
        for bd in self.dirs:
            if bd.layer == layer:
                return bd
        return None

    def name_in(self) -> tuple[Node, bytes]:
        """One name of this node (the most recent).  Raises FileNotFoundError when it has none
        (ESTALE when a branch change took them: see `Superseded`)."""
        if not self.links:
            if isinstance(self.links, Superseded):
                raise OSError(errno.ESTALE, "names taken by a branch change", str(self.id))
            raise FileNotFoundError(errno.ENOENT, "no name left for node", str(self.id))
        return self.links[-1]



class NodeTable:
    """All nodes the kernel may ask about, by number and by real identity."""

    def __init__(self, stack: LayerStack, max_listed: int = DEFAULT_MAX_ENTRIES,
                 beside: Beside = NOTHING_BESIDE) -> None:
        self.stack = stack
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[Key, Node] = {}
        self._fallback = FALLBACK_BASE
        self.fds = DirFds(default_capacity(len(stack.layers)))
        self.listings = Listings(max_listed, beside)
        self._stats: list[int] = []   # ids of the nodes whose stat was cached since the last flush
        self.stat_hits = 0            # stats answered from a node's cached one (see Resolver)
        self.stat_reads = 0           # stats read from a branch and cached (`remember`)

        #: called with a directory that had a stamp (see udba) as it is dropped, before its fds close
        self.on_free: Callable[[Node], None] | None = None
        #: called as the next request starts, then forgotten (see udba)
        self.on_next_request: Callable[[], None] | None = None
        top = stack.layers[0]
        st = os.fstat(top.fd)
        root = Node(ROOT_ID, True, 0, (st.st_dev, st.st_ino), self.ino_for(st))
        root.dirs = [self.fds.fixed(root, layer.index, layer.fd) for layer in stack.layers]
        self.fds.roots = {layer.index: layer.fd for layer in stack.layers}
        root.nlookup = 1
        self.root = self.listings.root = root
        self.nodes[ROOT_ID] = root
        self.by_key[root.key] = root

    def __len__(self) -> int:
        return len(self.nodes)

    def next_request(self) -> None:
        """A new request starts: the directory fds and listings handed out before may go."""
        self.fds.next_request()
        self.listings.next_request()
        if self.on_next_request is not None:
            self.on_next_request()

    def remember(self, node: Node, st: os.stat_result | Stat) -> Stat:
        """Cache *st* as *node*'s stat; after STATS_KEPT of them, the cached stats are forgotten.
        Not that of a node whose real file changes outside the union (`Node.outside`)."""
        packed = st if isinstance(st, Stat) else Stat.of(st)
        if node.outside:
            return packed
        recent = self._stats
        if len(recent) >= STATS_KEPT:
            # Full: forget them all at once (cheaper per stat than keeping an order).
            nodes = self.nodes
            for node_id in recent:
                old = nodes.get(node_id)
                if old is not None:
                    old.st = None
            recent.clear()
        node.st = packed
        recent.append(node.id)
        self.stat_reads += 1
        return packed

    def stats_kept(self) -> int:
        """How many nodes have had their stat cached since the cache was last emptied."""
        return len(self._stats)

    def get(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise OSError(errno.ESTALE, "unknown inode", str(node_id))
        return node

    # ------------------------------------------------------------------ branch directory fds
    # Valid until the next request starts: use them at once, never across an await.

    def dirfd(self, node: Node, layer: int) -> DirFd:
        """The fd of directory *node*'s directory in branch *layer* (ESTALE when it has none)."""
        for bd in node.dirs:
            if bd.layer == layer:
                return self.fds.fd(bd)
        raise OSError(errno.ESTALE, "directory not in that branch", str(node.id))

    def dirfd_or_none(self, node: Node, layer: int) -> DirFd | None:
        bd = node.branch_dir(layer)
        return None if bd is None else self.fds.fd(bd)

    def top_dirfd(self, node: Node) -> DirFd:
        """The fd of directory *node*'s topmost branch directory (ENOENT when it has none)."""
        if not node.dirs:
            raise OSError(errno.ENOENT, "directory has no branch left", str(node.id))
        return self.fds.fd(node.dirs[0])

    def branch_fds(self, node: Node) -> Iterator[tuple[int, DirFd]]:
        """(layer, fd) of each branch directory of *node*, top first, each opened as it is reached."""
        for bd in node.dirs:
            yield bd.layer, self.fds.fd(bd)

    def real_parent_fd(self, node: Node) -> tuple[DirFd, bytes]:
        """(fd of the branch directory holding *node*'s object, its name there)."""
        parent, name = node.name_in()
        return self.dirfd(parent, node.layer), name

    def set_dirs(self, node: Node, fds: list[tuple[int, DirFd]], in_use: bool = False) -> None:
        """Give directory *node* the branch directories *fds* ((layer, open fd), top first)."""
        self.close_dirs(node, keep=0)
        node.dirs = [self.fds.adopt(node, layer, fd, in_use) for layer, fd in fds]

    def add_upper_dir(self, node: Node, fd: DirFd) -> None:
        """*node* now has a directory in the writable branch, open as *fd* (in use by the caller)."""
        node.dirs.insert(0, self.fds.adopt(node, 0, fd, in_use=True))
        node.layer = 0

    def close_dirs(self, node: Node, keep: int) -> None:
        """Let directory *node* keep only its *keep* topmost branch directories."""
        if len(node.dirs) <= keep:
            return
        for bd in node.dirs[keep:]:
            self.fds.close(bd)
        del node.dirs[keep:]

    def find(self, key: Key) -> Node | None:
        return self.by_key.get(key)

    def ino_for(self, st: os.stat_result) -> int:
        """The st_ino shown for a real object: its own, tagged with its filesystem when needed."""
        return self.ino_of(st.st_dev, st.st_ino)

    def ino_of(self, dev: int, ino: int) -> int:
        idx = self.stack.fs_index(dev)
        return ino if idx == 0 else (idx << 48) | ino

    def _number_for(self, ino: int) -> int:
        if ROOT_ID < ino < FALLBACK_BASE and ino not in self.nodes:
            return ino
        self._fallback += 1
        return self._fallback

    def new(self, is_dir: bool, layer: int, key: Key, st: os.stat_result | Stat) -> Node:
        return self.new_of(is_dir, layer, key, st.st_dev, st.st_ino, st.st_mode)

    def new_of(self, is_dir: bool, layer: int, key: Key, dev: int, real_ino: int, mode: int) -> Node:
        """`new` for the real object (*dev*, *real_ino*) of type *mode*."""
        # ino_of's and _number_for's common answers inline: a cold readdir makes one node per entry
        ino = real_ino if self.stack.fsindex.get(dev) == 0 else self.ino_of(dev, real_ino)
        nodes = self.nodes
        node_id = ino if ROOT_ID < ino < FALLBACK_BASE and ino not in nodes else self._number_for(ino)
        node = Node(node_id, is_dir, layer, key, ino)
        node.kind = stat.S_IFMT(mode)
        nodes[node_id] = node
        self.by_key[key] = node
        return node

    def new_child(self, parent: Node, name: bytes, layer: int, key: Key, dev: int, ino: int, mode: int
                  ) -> Node:
        """A new non-directory node known by *name* in *parent*, of the real object (*dev*, *ino*)
        of type *mode*: `new` and its first `add_link` in one (a cold listing makes one per entry)."""
        node = self.new_of(False, layer, key, dev, ino, mode)
        node.links = ((parent, name),)
        parent.refs += 1
        children = parent.children
        old = children.get(name)
        if old is not None:
            self.drop_link(old, parent, name)
        children[name] = node
        return node

    def rekey(self, node: Node, key: Key) -> None:
        """The node's object moved (copy-up): other names of the old object get nodes of their own."""
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        node.key = key
        self.by_key[key] = node

    def add_link(self, node: Node, parent: Node, name: bytes) -> None:
        link = (parent, name)
        if link in node.links:
            if node.links[-1] != link:
                node.links = (*(k for k in node.links if k != link), link)
            return
        if not node.links:
            for bd in node.dirs:
                self.fds.named(bd)
        node.links = (*node.links, link)
        parent.refs += 1
        self.by_key.setdefault(node.key, node)   # named again (a rename): findable again
        old = parent.children.get(name)
        if old is not None and old is not node:
            self.drop_link(old, parent, name)
        parent.children[name] = node

    def drop_link(self, node: Node, parent: Node, name: bytes) -> None:
        if (parent, name) not in node.links:
            return
        node.links = tuple(k for k in node.links if k != (parent, name))
        if parent.children.get(name) is node:
            del parent.children[name]
        if not node.links:
            if self.by_key.get(node.key) is node:
                # Its last known name is gone: the filesystem may give its inode number to a new
                # object, which must not be mistaken for this one.
                del self.by_key[node.key]
            for bd in node.dirs:   # nothing to open it by any more
                self.fds.orphan(bd)
        parent.refs -= 1
        self.maybe_free(parent)

    def forget(self, node_id: int, n: int) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        left = node.nlookup - n
        node.nlookup = left if left > 0 else 0
        if left <= 0 and not node.refs and not node.handles:     # maybe_free's first test, inline
            self.maybe_free(node)

    def maybe_free(self, node: Node) -> None:
        todo = [node]
        while todo:
            n = todo.pop()
            if n.id == ROOT_ID or n.nlookup > 0 or n.refs > 0 or n.handles > 0:
                continue
            if self.nodes.get(n.id) is not n:
                continue
            del self.nodes[n.id]
            if self.by_key.get(n.key) is n:
                del self.by_key[n.key]
            if n.stamp is not None and self.on_free is not None:
                self.on_free(n)
            if n.is_dir:    # only a directory has branch directories, a listing and snapshots
                self.close_dirs(n, keep=0)
                self.listings.forget(n)
                n.listing = None
            for parent, name in n.links:
                if parent.children.get(name) is n:
                    del parent.children[name]
                parent.refs -= 1
                if not parent.refs:     # (a parent other children still name stays)
                    todo.append(parent)
            n.links = ()

    def close(self) -> None:
        for n in list(self.nodes.values()):
            self.close_dirs(n, keep=0)
        self.fds.close_all()
        self.nodes.clear()
        self.by_key.clear()
