"""Attributes and xattrs of the union's objects: chmod, chown, truncate, utimes, the xattr calls, statfs.

Each change copies its node up first (a truncate copies only the data it keeps).  The union's
xattr names are escaped in the branches (`whiteout.escape_xattr`), so no xattr set through the
union can turn into a whiteout or opaque marker.
"""
from __future__ import annotations

import errno
import os
import stat

from .attrs import Stat
from .branches import ACL_ACCESS, ACL_DEFAULT
from .interfaces import FREE_BIG
from .nodes import ROOT_ID, Node
from .provenance import BRANCH_XATTR, LAYOUT_XATTR, VIRTUAL_XATTRS, at_name, holders
from .resolve import Handle, Resolver, err
from .whiteout import escape_xattr, missing_xattr_errno, unescape_xattr


class Attributes:
    """The attribute and xattr calls of a union, on the state of its *res*."""

    def __init__(self, res: Resolver) -> None:
        self.res = res

    # ------------------------------------------------------------------ xattrs and statfs

    def getxattr(self, node: Node, name: bytes) -> bytes:
        if name in VIRTUAL_XATTRS:
            return self._provenance(node, name)
        real = escape_xattr(name)
        try:
            names = self.res.xattr_names(node)
        except OSError as e:
            # The kernel reads the ACL of every object it checks access to; on a branch without
            # xattrs there is none, and the mode decides, as on overlayfs.
            if e.errno == errno.ENOTSUP and name in (ACL_ACCESS, ACL_DEFAULT):
                raise err(errno.ENODATA) from None
            raise
        if real not in names:
            raise err(missing_xattr_errno(name))
        return self.res.xattr_target(node, lambda p: os.getxattr(p, real))  # type: ignore[return-value]

    def has_xattr(self, node: Node, name: bytes) -> bool | None:
        """Whether *node* has the real xattr *name* (not a virtual one); None when that cannot be
        told (a branch without xattrs, a node gone).  Cached on the node, as getxattr's list is."""
        try:
            return escape_xattr(name) in self.res.xattr_names(node)
        except OSError:
            return None

    def listxattr(self, node: Node) -> list[bytes]:
        shown = (unescape_xattr(n) for n in self.res.xattr_names(node))
        return [n for n in shown if n is not None]

    async def setxattr(self, node: Node, name: bytes, value: bytes, kill_sgid: bool = False) -> None:
        """Set xattr *name*; with *kill_sgid*, first clear the setgid bit (see `_kill_sgid`)."""
        res = self.res
        res.check_writable()
        _refuse_virtual(name)
        real = escape_xattr(name)
        await res.ensure_upper(node, meta=True)
        if kill_sgid:
            await self._kill_sgid(node)
        node.xattrs = None
        res.touch(node)
        res.xattr_target(node, lambda p: os.setxattr(p, real, value))

    async def removexattr(self, node: Node, name: bytes, kill_sgid: bool = False) -> None:
        res = self.res
        res.check_writable()
        _refuse_virtual(name)
        real = escape_xattr(name)
        self.getxattr(node, name)  # ENODATA before a needless copy-up
        await res.ensure_upper(node, meta=True)
        if kill_sgid:
            await self._kill_sgid(node)
        node.xattrs = None
        res.touch(node)
        res.xattr_target(node, lambda p: os.removexattr(p, real))

    def _provenance(self, node: Node, name: bytes) -> bytes:
        """The read-only xattr *name* of `provenance.VIRTUAL_XATTRS`: where *node* comes from."""
        layers = self.res.stack.layers
        if name == LAYOUT_XATTR:
            if node.id != ROOT_ID:
                raise err(errno.ENODATA)
            return b"\0".join(b"%s:%s" % (b"rw" if layer.writable and not self.res.readonly else b"ro",
                                           os.fsencode(layer.path)) for layer in layers)
        if name == BRANCH_XATTR:
            return os.fsencode(layers[node.layer].path)
        if node.id == ROOT_ID or not node.links:
            found = [node.layer] if not node.is_dir else [bd.layer for bd in node.dirs]
        else:
            parent, child = node.name_in()
            found = list(holders(at_name(list(self.res.table.branch_fds(parent)), child)))
        return b"\n".join(os.fsencode(layers[i].path) for i in found)

    async def _kill_sgid(self, node: Node) -> None:
        """Clear *node*'s setgid bit: overlayfs does so before a change of the access ACL by a
        caller who is neither in the file's group nor holds CAP_FSETID (the FUSE request does not
        say so; the caller of setxattr decides)."""
        mode = self.res.stat(node).st_mode
        if mode & stat.S_ISGID:
            await self.setattr(node, mode=stat.S_IMODE(mode) & ~stat.S_ISGID)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.res.stack.layers[0].fd)

    # ------------------------------------------------------------------ attributes

    async def setattr(self, node: Node, *, size: int | None = None, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      handle: Handle | None = None, kill_setid: bool = False) -> Stat:
        """chmod, chown, truncate and utimes, after a copy-up (truncate copies only what it keeps).

        *kill_setid*: clear the set-id bits as a write by a caller without CAP_FSETID does (the
        set-user-ID bit, and the set-group-ID bit of a group-executable file; the file's
        security.capability too): by chown(-1, -1) of the real file after any truncate, which the
        upper filesystem answers just so."""
        res = self.res
        res.check_writable()
        await res.ensure_upper(node, keep=size, meta=size is None)
        owner = None
        if uid is not None or gid is not None:
            owner = (-1 if uid is None else uid, -1 if gid is None else gid)
        elif kill_setid and not node.is_dir:
            owner = (-1, -1)
        times = None if atime_ns is None and mtime_ns is None else (atime_ns, mtime_ns)
        if handle is not None:
            res.refresh(handle)
        if size is not None and not node.is_dir:
            await self._truncate(node, size, handle)
            size = None
        if node.is_dir or not node.links:
            # A directory, or a file whose last name is gone but is still open: work on the fd.
            fd: int
            if node.is_dir:
                fd = res.table.dirfd(node, 0)
            else:
                # fchown and fchmod reach us without the handle: any open one of the node will do.
                fd = (handle or res.any_handle(node)).fd
            if size is not None:
                os.ftruncate(fd, size)      # a directory: the kernel refuses it before asking us
            if owner is not None:
                os.chown(fd, *owner)
            if mode is not None:
                os.chmod(fd, stat.S_IMODE(mode))
            if times is not None:
                os.utime(fd, ns=_fill_times(times, os.fstat(fd)))
            res.touch(node)
            return Stat.of(os.fstat(fd))
        pfd, name = res.real_parent_fd(node)
        if owner is not None:
            pfd.chown(name, *owner)
        if mode is not None:
            pfd.chmod(name, mode)
        if times is not None:
            st = pfd.lstat(name) if None in times else None
            pfd.utime(name, _fill_times(times, st))
        cached = res.table.remember(node, pfd.lstat(name))
        return cached

    async def _truncate(self, node: Node, size: int, handle: Handle | None) -> None:
        """truncate(2) the file *node* to *size*: through *handle* when it may write (or when the
        file has no name left), else through a new write open; on the executor when that frees
        FREE_BIG bytes or more (ext4 frees 1.5 GiB in about 0.4 s)."""
        res = self.res
        own = None
        if not node.links:
            fd = (handle or res.any_handle(node)).fd
        elif handle is not None and handle.flags & os.O_ACCMODE != os.O_RDONLY:
            fd = handle.fd
        else:
            pfd, name = res.real_parent_fd(node)
            fd = own = pfd.open_file(name, os.O_WRONLY)
        try:
            if os.fstat(fd).st_blocks * 512 - size >= FREE_BIG:
                await res.executor.on_fd(fd, os.ftruncate, size, bulk=True)
            else:
                os.ftruncate(fd, size)
        finally:
            if own is not None:
                os.close(own)
        res.touch(node)


def _refuse_virtual(name: bytes) -> None:
    """The union's own read-only xattrs cannot be set or removed: EPERM, as the kernel answers for
    an xattr the caller may not change (``trusted.*`` without the capability)."""
    if name in VIRTUAL_XATTRS:
        raise err(errno.EPERM)


def _fill_times(times: tuple[int | None, int | None], st: os.stat_result | None) -> tuple[int, int]:
    """(atime, mtime) in ns, taking the one not being set from *st*."""
    atime, mtime = times
    if atime is None or mtime is None:
        assert st is not None
        atime = st.st_atime_ns if atime is None else atime
        mtime = st.st_mtime_ns if mtime is None else mtime
    return atime, mtime
