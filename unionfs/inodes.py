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

import logging
import os
from typing import TYPE_CHECKING

from .merge import Entry

if TYPE_CHECKING:
    import trio

    from .layers import LayerStack

log = logging.getLogger(__name__)

ROOT_ID = 1
FALLBACK_BASE = 1 << 60

# (st_dev, st_ino) of a real object, or (parent node id, name) of a lower non-directory
Key = tuple[int, int] | tuple[int, bytes]


class Node:
    """One object of the union.  Directories hold their branch directories open."""

    __slots__ = ("id", "ino", "is_dir", "layer", "key", "links", "nlookup", "refs", "handles",
                 "dirfds", "fdmap", "listing", "lock", "owns_fds", "xattrs", "st", "children", "reply",
                 "snaps")

    def __init__(self, node_id: int, is_dir: bool, layer: int, key: Key, ino: int) -> None:
        self.id = node_id
        self.ino = ino                          # what stat shows as st_ino
        self.is_dir = is_dir
        self.layer = layer                      # branch that holds the object (directories: topmost)
        self.key = key                          # how the table finds it (see the module docstring)
        self.links: list[tuple[Node, bytes]] = []  # names it is known by
        self.nlookup = 0                        # lookups the kernel has not forgotten
        self.refs = 0                           # links of other nodes that name this one as parent
        self.handles = 0                        # open files and directories
        self.dirfds: list[tuple[int, int]] = []  # directories: (layer, fd) top first
        self.fdmap: dict[int, int] = {}          # directories: layer -> fd
        self.listing: dict[bytes, Entry] | None = None  # directories: merged listing, built on demand
        self.lock: trio.Lock | None = None       # serialises copy-up of this node
        self.owns_fds = True
        # Names of the real object's xattrs, cached on first use: most getxattr calls (ls asks every
        # file for security.selinux) are for names that are not there and need no syscall.
        self.xattrs: frozenset[bytes] | None = None
        # The real object's stat, cached until a change through the union drops it (`touch`): a
        # warm readdir then answers from memory.
        self.st: os.stat_result | None = None
        self.children: dict[bytes, Node] = {}   # directories: the node behind each linked name
        self.reply: tuple[os.stat_result, object] | None = None  # (stat, the attributes built from it)
        # directories: listing snapshots for readers without a directory handle (Operations._snapshot)
        self.snaps: dict[int, list[tuple[bytes, Entry | None]]] | None = None

    def __repr__(self) -> str:
        names = [n for _, n in self.links]
        return f"Node({self.id}, dir={self.is_dir}, layer={self.layer}, names={names})"

    def set_dirfds(self, dirfds: list[tuple[int, int]]) -> None:
        self.dirfds = dirfds
        self.fdmap = dict(dirfds)

    def add_upper_dirfd(self, fd: int) -> None:
        self.dirfds.insert(0, (0, fd))
        self.fdmap[0] = fd
        self.layer = 0

    def name_in(self) -> tuple[Node, bytes]:
        """One name of this node (the most recent).  Raises FileNotFoundError when it has none."""
        if not self.links:
            raise FileNotFoundError(2, "no name left for node", str(self.id))
        return self.links[-1]

    def real_parent_fd(self) -> tuple[int, bytes]:
        """(fd of the branch directory holding this object, its name there)."""
        parent, name = self.name_in()
        return parent.fdmap[self.layer], name

    def close_fds(self) -> None:
        if self.owns_fds:
            for _, fd in self.dirfds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.dirfds = []
        self.fdmap = {}
        self.listing = None


class NodeTable:
    """All nodes the kernel may ask about, by number and by real identity."""

    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[Key, Node] = {}
        self._fallback = FALLBACK_BASE
        top = stack.layers[0]
        st = os.fstat(top.fd)
        root = Node(ROOT_ID, True, 0, (st.st_dev, st.st_ino), self.ino_for(st))
        root.set_dirfds([(layer.index, layer.fd) for layer in stack.layers])
        root.owns_fds = False   # the LayerStack owns the branch roots
        root.nlookup = 1
        self.root = root
        self.nodes[ROOT_ID] = root
        self.by_key[root.key] = root

    def __len__(self) -> int:
        return len(self.nodes)

    def get(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise OSError(116, "unknown inode", str(node_id))  # ESTALE
        return node

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

    def new(self, is_dir: bool, layer: int, key: Key, st: os.stat_result) -> Node:
        ino = self.ino_for(st)
        node = Node(self._number_for(ino), is_dir, layer, key, ino)
        self.nodes[node.id] = node
        self.by_key[key] = node
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
                node.links.remove(link)
                node.links.append(link)
            return
        node.links.append(link)
        parent.refs += 1
        self.by_key.setdefault(node.key, node)   # named again (a rename): findable again
        old = parent.children.get(name)
        if old is not None and old is not node:
            self.drop_link(old, parent, name)
        parent.children[name] = node

    def drop_link(self, node: Node, parent: Node, name: bytes) -> None:
        try:
            node.links.remove((parent, name))
        except ValueError:
            return
        if parent.children.get(name) is node:
            del parent.children[name]
        if not node.links and self.by_key.get(node.key) is node:
            # Its last known name is gone: the filesystem may give its inode number to a new
            # object, which must not be mistaken for this one.
            del self.by_key[node.key]
        parent.refs -= 1
        self.maybe_free(parent)

    def forget(self, node_id: int, n: int) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.nlookup = max(0, node.nlookup - n)
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
            n.close_fds()
            for parent, name in n.links:
                if parent.children.get(name) is n:
                    del parent.children[name]
                parent.refs -= 1
                todo.append(parent)
            n.links = []

    def close(self) -> None:
        for n in list(self.nodes.values()):
            n.close_fds()
        self.nodes.clear()
        self.by_key.clear()
