"""The FUSE request handlers: thin wrappers over `Union`.

Attributes:
    union: the union's logic (node table, listings, changes).
    timeout: entry and attribute cache time handed to the kernel, in seconds.
    dirs: open directory handles -> the listing snapshot taken at their first readdir.

Each handler converts the OSError of the syscall that failed into `FUSEError` with its errno, once,
in `_handler` (`fallocate`, called synchronously by the libfuse shim, returns the errno instead);
`_errno_for` decides it for both.  Any other exception is a bug: it is logged with its traceback and
answered with EIO, and the mount keeps serving.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .fusebind import shim  # isort: skip - loads the libfuse shim before pyfuse3 (see fusebind)
import pyfuse3
from pyfuse3 import FUSEError

from .attrs import Stat
from .inodes import Node
from .union import Creds, Union

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Set in the fh of READDIRPLUS and FSYNCDIR by the libfuse shim when the kernel opens directories
#: without asking (zero-message opendir): the rest of the fh is then the directory's node id.
STATELESS_DIR = 1 << 63
#: Nodes whose reply attributes are kept built (about 350 bytes each; see Operations._attr).
REPLIES_KEPT = 4096
#: Listing snapshots kept per directory for readers without a handle (see Operations._snapshot).
SNAPSHOTS_KEPT = 4


def _find_shown_ino_offset() -> int | None:
    """Where, inside a pyfuse3 EntryAttributes, the st_ino of the reply's stat lives.

    The kernel shows ``attr.ino`` as st_ino and uses the entry's node id as identity; pyfuse3 sets
    both from `st_ino`.  To show a lower file's real inode number (hard links of it then agree, as on
    overlayfs) while giving each name its own node, we write ``attr.st_ino`` directly.  The offset is
    found by probing, and verified; if the layout is not the one expected, st_ino stays the node id.
    """
    marker, other = 0x5A5A_1234_ABCD_7777, 0x0123_4567_89AB_CDEF
    probe = pyfuse3.EntryAttributes()
    probe.st_ino = marker
    raw = ctypes.string_at(id(probe), sys.getsizeof(probe))
    hits = [i for i in range(0, len(raw) - 7, 8) if struct.unpack_from("=Q", raw, i)[0] == marker]
    # fuse_entry_param: ino, generation, then struct stat {st_dev, st_ino, ...}
    if len(hits) != 2 or hits[1] - hits[0] != 24:
        return None
    ctypes.c_uint64.from_address(id(probe) + hits[1]).value = other
    raw = ctypes.string_at(id(probe), sys.getsizeof(probe))
    if struct.unpack_from("=Q", raw, hits[0])[0] != marker or probe.st_ino != marker:
        return None
    if struct.unpack_from("=Q", raw, hits[1])[0] != other:
        return None
    return hits[1]


_SHOWN_INO_OFFSET = _find_shown_ino_offset()


def set_shown_ino(attr: pyfuse3.EntryAttributes, ino: int) -> None:
    """Make stat show *ino* for *attr*, whose node id stays ``attr.st_ino``."""
    if _SHOWN_INO_OFFSET is not None:
        ctypes.c_uint64.from_address(id(attr) + _SHOWN_INO_OFFSET).value = ino


def _errno_for(e: Exception, name: str, args: tuple[Any, ...], debug: bool) -> int:
    """The errno a request that raised *e* is answered with (call it inside the except block): an
    OSError's own; anything else is a bug, logged with its traceback, and EIO."""
    if isinstance(e, OSError):
        if debug:
            log.debug("%s -> %s", name, errno.errorcode.get(e.errno or 0, e.errno))
        return e.errno or errno.EIO
    log.exception("unexpected error in %s%r", name, args)
    return errno.EIO


def _handler(fn: F) -> F:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        if self.debug:
            log.debug("%s%r", name, args)
        self.union.table.fds.next_request()
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except Exception as e:
            raise FUSEError(_errno_for(e, name, args, self.debug)) from None

    return wrapper  # type: ignore[return-value]


class DirHandle:
    """An open directory; *entries* is its listing as of the first readdir (None until then: with
    listings cached by the kernel, most opens of a directory read nothing from us)."""
    __slots__ = ("node", "entries")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.entries: list[bytes] | None = None


class Operations(pyfuse3.Operations):
    """unionfs as pyfuse3 sees it."""

    union: Union
    timeout: float
    debug: bool
    dirs: dict[int, DirHandle]

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, union: Union, timeout: float = 1.0, debug: bool = False) -> None:
        super().__init__()
        self.union = union
        self.timeout = timeout
        self.debug = debug
        self.dirs = {}
        self._replies: dict[int, tuple[Stat, pyfuse3.EntryAttributes]] = {}
        self._next_dh = 0
        union.invalidate_entry = self._invalidate_entry
        self.on_init: Callable[[], None] = lambda: None
        union.invalidate_attr = self._invalidate_attr

    @staticmethod
    def _invalidate_attr(node_id: int) -> None:
        try:
            pyfuse3.invalidate_inode(node_id, attr_only=True)
        except Exception:  # noqa: BLE001 - a stale cache entry is not worth failing a request over
            log.debug("invalidate_inode(%d) failed", node_id, exc_info=True)

    @staticmethod
    def _invalidate_entry(parent: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        except Exception:  # noqa: BLE001 - a stale cache entry is not worth failing a request over
            log.debug("invalidate_entry(%d, %r) failed", parent, name, exc_info=True)

    def init(self) -> None:
        try:
            self.on_init()
        except Exception:
            log.exception("init hook failed")

    # ------------------------------------------------------------------ helpers

    def _attr(self, node: Node, st: Stat) -> pyfuse3.EntryAttributes:
        """The attributes the kernel gets for *node*, built once per cached stat (pyfuse3 copies
        them into each reply, so one object serves every readdir and lookup until the stat changes)
        and kept for up to REPLIES_KEPT nodes."""
        replies = self._replies
        cached = replies.get(node.id)
        if cached is not None and cached[0] is st:
            return cached[1]
        a = self._build_attr(node, st)
        if st is node.st:   # only the attributes of a cached stat can serve again
            if len(replies) >= REPLIES_KEPT:
                replies.clear()   # full: start again (cheaper per reply than keeping an order)
            replies[node.id] = (st, a)
        return a

    def _build_attr(self, node: Node, st: Stat) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.id
        if node.ino != node.id:
            set_shown_ino(a, node.ino)
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        _dev, _ino, _nlink, rdev, size, blocks, blksize, atime, mtime, ctime, mode, uid, gid = st.fields()
        a.st_mode = mode
        a.st_nlink = self.union.nlink(node, st)
        a.st_uid = uid
        a.st_gid = gid
        a.st_rdev = rdev
        a.st_size = size
        a.st_blksize = blksize
        a.st_blocks = blocks
        a.st_atime_ns = atime
        a.st_mtime_ns = mtime
        a.st_ctime_ns = ctime
        return a

    def _looked_up(self, node: Node, st: Stat) -> pyfuse3.EntryAttributes:
        node.nlookup += 1
        return self._attr(node, st)

    def _node(self, inode: int) -> Node:
        return self.union.table.get(inode)

    @staticmethod
    def _creds(ctx: pyfuse3.RequestContext) -> Creds:
        return Creds(ctx.uid, ctx.gid)

    # ------------------------------------------------------------------ read path

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        found = self.union.lookup(self._node(parent_inode), name)
        if found is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.timeout
            return neg
        return self._looked_up(*found)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, n in inode_list:
                self.union.table.forget(inode, n)
        except Exception:
            log.exception("forget failed")

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        return self._attr(node, self.union.stat(node))

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.union.readlink(self._node(inode))

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        self._next_dh += 1
        self.dirs[self._next_dh] = DirHandle(node)
        node.handles += 1
        return self._next_dh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh & STATELESS_DIR:
            node = self._node(fh & ~STATELESS_DIR)
            entries, start, gen = self._snapshot(node, start_id)
        else:
            dh = self.dirs[fh]
            node = dh.node
            if dh.entries is None:
                dh.entries = self._entries(node)
            entries, start, gen = dh.entries, start_id, 0
        union = self.union
        listing = node.listing if node.listing is not None else union.listing(node)
        for i in range(start, len(entries)):
            name = entries[i]
            if i < 2:           # "." and ".."
                found = union.lookup(node, name)
                assert found is not None
                if not pyfuse3.readdir_reply(token, name, self._attr(*found), gen | (i + 1)):
                    return
                continue
            cur = listing.get(name)
            if cur is None:
                continue        # removed since the snapshot
            try:
                child, st = union.node_for(node, name, cur)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(child, st), gen | (i + 1)):
                union.table.maybe_free(child)
                return
            child.nlookup += 1

    def _entries(self, node: Node) -> list[bytes]:
        """A snapshot of the names in *node* (the names themselves are the listing's: 8 bytes each)."""
        return [b".", b"..", *self.union.listing(node)]

    def _snapshot(self, node: Node, offset: int) -> tuple[list[bytes], int, int]:
        """Listing, start index and offset tag for a READDIRPLUS without an open directory handle.

        Reading from offset 0 takes a new snapshot of the listing; each entry's offset names the
        snapshot (high 32 bits) and the position in it, so a reader that goes on later continues in
        what it started with, however the directory changed meanwhile.  The last few snapshots of
        a directory are kept (there is no releasedir to say a reader is done).
        """
        snaps = node.snaps
        if offset and snaps is not None:
            entries = snaps.get(offset >> 32)
            if entries is not None:
                return entries, offset & 0xFFFF_FFFF, offset & ~0xFFFF_FFFF
        if snaps is None:
            snaps = node.snaps = {}
        gen = max(snaps, default=0) + 1
        if gen >= 1 << 30:      # the offset's high half must stay positive: start again
            snaps.clear()
            gen = 1
        elif len(snaps) >= SNAPSHOTS_KEPT:
            del snaps[min(snaps)]
        entries = snaps[gen] = self._entries(node)
        # a reader whose snapshot was dropped goes on at the same position in the new one
        return entries, offset & 0xFFFF_FFFF, gen << 32

    @_handler
    async def releasedir(self, fh: int) -> None:
        dh = self.dirs.pop(fh)
        dh.node.handles -= 1
        self.union.table.maybe_free(dh.node)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self._node(fh & ~STATELESS_DIR) if fh & STATELESS_DIR else self.dirs[fh].node
        fd = self.union.table.dirfd_or_none(node, 0)
        if fd is not None:
            os.fsync(fd)

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        h = await self.union.open(self._node(inode), flags)
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=True)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.union.handles[fh]
        if h.layer != h.node.layer:
            self.union.refresh(h)
        if h.layer == 0:
            h.node.st = None   # a read may move the atime of a file in the writable branch
        return os.pread(h.fd, size, off)

    @_handler
    async def release(self, fh: int) -> None:
        self.union.release(self.union.handles[fh])

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self.union.statvfs()
        d = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(d, attr, getattr(sv, attr))
        return d

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.union.getxattr(self._node(inode), name)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.union.listxattr(self._node(inode))

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Mounted with default_permissions: the kernel checks modes itself and never asks.
        return True

    # ------------------------------------------------------------------ write path

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.union.handles[fh]
        if h.layer != h.node.layer:
            self.union.refresh(h)
        h.node.st = None
        return os.pwrite(h.fd, buf, off)

    def fallocate(self, inode: int, fh: int, mode: int, offset: int, length: int) -> int:
        """FUSE_FALLOCATE, called synchronously by the libfuse shim: the errno to answer, 0 if done."""
        args = (inode, fh, mode, offset, length)
        if self.debug:
            log.debug("fallocate%r", args)
        self.union.table.fds.next_request()
        try:
            self.union.fallocate(self.union.handles[fh], mode, offset, length)
        except Exception as e:
            return _errno_for(e, "fallocate", args, self.debug)
        return 0

    def use_shim(self) -> None:
        """Hand the next FUSE session fallocate and, with caching on, kernel-cached listings."""
        if shim is not None:
            shim.configure(cache_dirs=self.timeout > 0, fallocate=self.fallocate, stateless_dirs=True)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.union.handles[fh]
        (os.fdatasync if datasync else os.fsync)(h.fd)

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        h, node, st = self.union.create(self._node(parent_inode), name, mode, flags, self._creds(ctx))
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=True), self._looked_up(node, st)

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        return self._looked_up(*self.union.mkdir(self._node(parent_inode), name, mode, self._creds(ctx)))

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._looked_up(*self.union.mknod(self._node(parent_inode), name, mode, rdev,
                                                 self._creds(ctx)))

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._looked_up(*self.union.symlink(self._node(parent_inode), name, target,
                                                   self._creds(ctx)))

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._looked_up(*await self.union.link(self._node(inode), self._node(new_parent_inode),
                                                      new_name))

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.union.unlink(self._node(parent_inode), name)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.union.rmdir(self._node(parent_inode), name)

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.union.rename(self._node(parent_inode_old), name_old, self._node(parent_inode_new),
                                name_new, flags)

    @_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        st = await self.union.setattr(
            node,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            handle=self.union.handles.get(fh) if fh is not None else None,
        )
        return self._attr(node, st)

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.union.setxattr(self._node(inode), name, value)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.union.removexattr(self._node(inode), name)
