"""The union of branches, callable without a mount: resolve, read, and change the merged tree.

`Union` is a `Resolver` (names to nodes, open files, reads and writes, copy-up: what every request
needs) with two parts that work on its state: `Namespace` (create, link, unlink, rename...) and
`Attributes` (chmod, chown, truncate, utimes, xattrs).  Every method raises OSError with the errno a
program should see; the server turns that into its reply.  The server hands a union its executor
and its kernel cache at construction (see `interfaces`); alone, a union runs everything inline.
"""
from __future__ import annotations

import os

from .attributes import Attributes
from .attrs import Stat
from .branches import LayerStack
from .interfaces import INLINE, NO_KERNEL_CACHE, Executor, Invalidator
from .listings import DEFAULT_MAX_ENTRIES, NOTHING_BESIDE, Beside
from .namespace import Creds, Namespace
from .nodes import Node
from .resolve import Handle, Resolver
from .udba import NO_WATCHES, NONE, Watches
from .whiteout import Dialect

__all__ = ["Creds", "Handle", "Union"]


class Union(Resolver):
    """A union of branches: the node table, the merged listings and every change.

    *names* and *attrs* are the parts that change the tree; the calls below hand each request to
    its part (one place that lists everything a union does).
    """

    def __init__(self, stack: LayerStack, dialect: Dialect, readonly: bool = False,
                 max_listed: int = DEFAULT_MAX_ENTRIES, executor: Executor = INLINE,
                 invalidator: Invalidator = NO_KERNEL_CACHE, beside: Beside = NOTHING_BESIDE,
                 udba: str = NONE, watches: Watches = NO_WATCHES, metacopy: bool = False,
                 redirect_dir: str = "off") -> None:
        super().__init__(stack, dialect, readonly, max_listed, executor, invalidator, beside, udba, watches,
                         metacopy, redirect_dir)
        self.names = Namespace(self)
        self.attrs = Attributes(self)

    # ------------------------------------------------------------------ namespace

    def create(self, parent: Node, name: bytes, mode: int, flags: int, creds: Creds
               ) -> tuple[Handle, Node, Stat]:
        return self.names.create(parent, name, mode, flags, creds)

    def mkdir(self, parent: Node, name: bytes, mode: int, creds: Creds) -> tuple[Node, Stat]:
        return self.names.mkdir(parent, name, mode, creds)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, creds: Creds) -> tuple[Node, Stat]:
        return self.names.mknod(parent, name, mode, rdev, creds)

    def symlink(self, parent: Node, name: bytes, target: bytes, creds: Creds) -> tuple[Node, Stat]:
        return self.names.symlink(parent, name, target, creds)

    async def link(self, node: Node, parent: Node, name: bytes) -> tuple[Node, Stat]:
        return await self.names.link(node, parent, name)

    def pin_big_file(self, parent: Node, name: bytes) -> int | None:
        return self.names.pin_big_file(parent, name)

    def unlink(self, parent: Node, name: bytes) -> None:
        self.names.unlink(parent, name)

    def rmdir(self, parent: Node, name: bytes) -> None:
        self.names.rmdir(parent, name)

    async def rename(self, op: Node, on: bytes, np: Node, nn: bytes, flags: int) -> None:
        await self.names.rename(op, on, np, nn, flags)

    # ------------------------------------------------------------------ attributes

    async def setattr(self, node: Node, *, size: int | None = None, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      handle: Handle | None = None, kill_setid: bool = False) -> Stat:
        return await self.attrs.setattr(node, size=size, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns,
                                        mtime_ns=mtime_ns, handle=handle, kill_setid=kill_setid)

    def getxattr(self, node: Node, name: bytes) -> bytes:
        return self.attrs.getxattr(node, name)

    def has_xattr(self, node: Node, name: bytes) -> bool | None:
        return self.attrs.has_xattr(node, name)

    def listxattr(self, node: Node) -> list[bytes]:
        return self.attrs.listxattr(node)

    async def setxattr(self, node: Node, name: bytes, value: bytes, kill_sgid: bool = False) -> None:
        await self.attrs.setxattr(node, name, value, kill_sgid)

    async def removexattr(self, node: Node, name: bytes, kill_sgid: bool = False) -> None:
        await self.attrs.removexattr(node, name, kill_sgid)

    def statvfs(self) -> os.statvfs_result:
        return self.attrs.statvfs()
