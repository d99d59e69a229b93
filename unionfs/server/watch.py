"""``-o udba=notify``: fanotify marks on the branch directories of the directories the kernel knows,
and the caches dropped when something changes in them directly.

A directory is watched when its merged listing is built (the kernel looked a name up in it or
listed it: `unionfs.core.udba.Udba.listed`), one inode mark per branch directory, and no longer when
its node is dropped (the kernel forgot it).  The marks report the directory (as a file handle) and
the name of each entry created, removed, moved, written or whose attributes changed, and the pid of
the process that did it: our own pid (the union writing its upper branch: creates, copy-ups,
whiteouts) is skipped, so the union's own changes cost nothing here.  Anyone else's change drops the
daemon's listing of the directory and its stats of the name, and the kernel's entry for the name,
its cached listing of the directory (`invalidate_inode` with data, which drops the pages
`cache_readdir` kept) and, for a file written, its cached pages.

fanotify rather than inotify: inotify cannot tell our changes from anyone else's.  Inode marks with
directory file handles need no privilege (Linux 5.13 on) and count against
``/proc/sys/fs/fanotify/max_user_marks``.  At most *max_watches* (``-o udba_max_watches=N``) branch
directories are watched; past that, or at the kernel's limit, a warning is logged once and the
directories not watched are re-checked at each access as under ``reval`` (the kernel is given zero
timeouts for their names).  When fanotify is not to be had at all the whole mount works as ``reval``.

The loop waits on the fanotify fd with trio (`trio.lowlevel.wait_readable`): no polling.  A queue
overflow (16384 events not read) drops everything cached of every watched directory.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import math
import os
import struct
from typing import TYPE_CHECKING

from . import compat  # noqa: F401  # isort: skip - patches libfuse and pyfuse3 before pyfuse3 loads
import pyfuse3
import trio

from unionfs.core.nodes import Node

if TYPE_CHECKING:
    from unionfs.core.union import Union

    from .offload import Offload

log = logging.getLogger(__name__)

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
AT_EMPTY_PATH = 0x1000
#: Events that change which names a directory holds.
NAMES = FAN_MOVED_FROM | FAN_MOVED_TO | FAN_CREATE | FAN_DELETE
#: Events that change a file's data.
DATA = FAN_MODIFY | FAN_CLOSE_WRITE
MASK = NAMES | DATA | FAN_ATTRIB | FAN_DELETE_SELF | FAN_MOVE_SELF | FAN_ONDIR | FAN_EVENT_ON_CHILD
MAX_HANDLE = 128
_EVENT = struct.Struct("IBBHQii")     # struct fanotify_event_metadata
_INFO = struct.Struct("BBHiiIi")      # header, fsid, struct file_handle without f_handle

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def fan_init() -> int:
    return _check(_libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DIR_FID | FAN_REPORT_NAME,
                                      os.O_RDONLY | os.O_CLOEXEC), "fanotify_init")


def fan_mark(fan: int, flags: int, dirfd: int) -> None:
    _check(_libc.fanotify_mark(fan, flags, MASK, dirfd, None), "fanotify_mark")


def handle_of(dirfd: int) -> bytes:
    """The directory's file handle, as fanotify reports it (type and bytes)."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE)
    struct.pack_into("Ii", buf, 0, MAX_HANDLE, 0)
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(dirfd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH),
           "name_to_handle_at")
    size, kind = struct.unpack_from("Ii", buf, 0)
    return struct.pack("i", kind) + buf.raw[8:8 + size]


def parse(data: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(mask, pid, directory handle, name) of each event in *data* (name b"." for the directory
    itself; handle and name empty for an overflow)."""
    out = []
    off = 0
    while off + _EVENT.size <= len(data):
        length, _vers, _, meta_len, mask, _fd, pid = _EVENT.unpack_from(data, off)
        if length < meta_len:
            break
        p, end = off + meta_len, off + length
        handle, name = b"", b""
        while p + _INFO.size <= end:
            kind, _, info_len, _f0, _f1, size, htype = _INFO.unpack_from(data, p)
            if info_len == 0:
                break
            if kind == FAN_EVENT_INFO_TYPE_DFID_NAME:
                h = p + _INFO.size
                handle = struct.pack("i", htype) + data[h:h + size]
                name = data[h + size:p + info_len].split(b"\0", 1)[0]
            p += info_len
        out.append((mask, pid, handle, name))
        off += length
    return out


class Watcher:
    """The marks of one mount (`unionfs.core.udba.Watches`) and the loop that reads their events.

    Attributes:
        fan: the fanotify fd (-1: none to be had; every directory is then re-checked).
        max_watches: branch directories watched at most.
        watched: branch directories watched now.
        by_handle: directory file handle -> the node whose branch directory it is.
        of_node: node id -> the handles of its watched branch directories.
    """

    def __init__(self, max_watches: int) -> None:
        self.max_watches = max_watches
        self.watched = 0
        self.by_handle: dict[bytes, int] = {}
        self.of_node: dict[int, list[bytes]] = {}
        self._said_full = False
        self._union: Union | None = None
        self._offload: Offload | None = None
        self._pid = os.getpid()
        self._send, self._receive = trio.open_memory_channel[int](math.inf)
        self.fan = -1
        try:
            self.fan = fan_init()
        except OSError as e:
            log.warning("udba=notify: no fanotify (%s): every directory is re-checked at each access, "
                        "as with udba=reval", e.strerror)

    def attach(self, union: Union, offload: Offload) -> None:
        self._union = union
        self._offload = offload

    def close(self) -> None:
        if self.fan >= 0:
            os.close(self.fan)
            self.fan = -1

    # ------------------------------------------------------------------ Watches

    def watch(self, node: Node) -> bool:
        union = self._union
        if self.fan < 0 or union is None:
            return False
        if self.watched + len(node.dirs) > self.max_watches:
            self._full(f"udba_max_watches={self.max_watches} reached")
            return False
        keys: list[bytes] = []
        try:
            for _layer, fd in union.table.branch_fds(node):
                fan_mark(self.fan, FAN_MARK_ADD, fd)
                keys.append(handle_of(fd))
        except OSError as e:
            self._undo(node, len(keys))
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                self._full("the kernel's limit (/proc/sys/fs/fanotify/max_user_marks) reached")
            else:
                log.debug("udba=notify: cannot watch %r: %s", node, e)
            return False
        for k in keys:
            self.by_handle[k] = node.id
        self.of_node[node.id] = keys
        self.watched += len(keys)
        return True

    def _undo(self, node: Node, marked: int) -> None:
        union = self._union
        assert union is not None
        for bd in node.dirs[:marked + 1]:
            try:
                fan_mark(self.fan, FAN_MARK_REMOVE, union.table.fds.fd(bd))
            except OSError:
                pass

    def _full(self, why: str) -> None:
        if not self._said_full:
            self._said_full = True
            log.warning("udba=notify: %s (%d branch directories watched): directories not watched "
                        "are re-checked at each access, as with udba=reval", why, self.watched)

    def unwatch(self, node: Node) -> None:
        keys = self.of_node.pop(node.id, None)
        if keys is None:
            return
        self.watched -= len(keys)
        for k in keys:
            if self.by_handle.get(k) == node.id:
                del self.by_handle[k]
        if self._union is not None and self.fan >= 0:
            for bd in node.dirs:
                try:
                    fan_mark(self.fan, FAN_MARK_REMOVE, self._union.table.fds.fd(bd))
                except OSError:
                    pass    # gone from its branch (the kernel dropped the mark with it), or never marked

    def stale(self, node: Node) -> None:
        """A directory not watched was found changed (at a request: its getattr, which the kernel
        sends before it reads a listing it cached, or a lookup in it): drop the listing the kernel
        cached, now, before the answer.  No read waits on the pages of a cached listing."""
        try:
            pyfuse3.invalidate_inode(node.id, False)
        except OSError:
            pass

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Read and act on events until cancelled (the session ended)."""
        self._pid = os.getpid()     # the events of this process are the union's own
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drop_data_loop)
            if self.fan >= 0:
                await self._events()

    async def _events(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.fan)
            try:
                data = os.read(self.fan, 1 << 16)
            except BlockingIOError:
                continue
            try:
                self.handle(parse(data))
            except Exception:   # noqa: BLE001 - a bug here must not take the mount down
                log.exception("udba=notify: handling events failed")

    async def _drop_data_loop(self) -> None:
        """Drop the kernel's cached data of the nodes sent, on a worker thread: the kernel waits
        for pages a read has locked, and that read may need this loop to be answered."""
        assert self._offload is not None
        async for node_id in self._receive:
            try:
                await self._offload.run(pyfuse3.invalidate_inode, node_id, False)
            except OSError:
                pass    # the kernel forgot it meanwhile

    def handle(self, events: list[tuple[int, int, bytes, bytes]]) -> None:
        """Drop what each event (not ours) makes stale, in the daemon and in the kernel."""
        union = self._union
        assert union is not None
        nodes = union.table.nodes
        dirs: set[int] = set()      # directories whose listing changed
        data: set[int] = set()      # nodes whose cached data changed
        for mask, pid, handle, name in events:
            if mask & FAN_Q_OVERFLOW:
                log.warning("udba=notify: too many changes at once: dropping every cached listing")
                self._drop_all()
                return
            if pid == self._pid:
                continue
            d = nodes.get(self.by_handle.get(handle, 0))
            if d is None:
                continue
            if name == b".":            # the directory itself
                d.st = None
                if mask & (FAN_DELETE_SELF | FAN_MOVE_SELF):
                    dirs.add(d.id)
                union.invalidator.invalidate_attr(d.id)
                continue
            child = d.children.get(name)
            if child is not None:
                child.st = None
                child.xattrs = None
                if mask & (DATA | NAMES) and not child.is_dir:
                    data.add(child.id)
                elif mask & FAN_ATTRIB:
                    union.invalidator.invalidate_attr(child.id)
            if mask & NAMES:
                dirs.add(d.id)
                union.invalidator.invalidate_entry(d.id, name)
            elif mask & FAN_ATTRIB and child is None:
                union.invalidator.invalidate_entry(d.id, name)     # a negative entry, or unknown
        for node_id in dirs:
            d = nodes.get(node_id)
            if d is not None:
                union.udba.drop(d)
                data.add(node_id)       # the listing the kernel cached (cache_readdir)
        for node_id in data:
            self._send.send_nowait(node_id)

    def _drop_all(self) -> None:
        union = self._union
        assert union is not None
        for node_id in list(self.of_node):
            d = union.table.nodes.get(node_id)
            if d is None:
                continue
            for name, child in d.children.items():
                union.invalidator.invalidate_entry(d.id, name)
                if not child.is_dir:
                    self._send.send_nowait(child.id)
            union.udba.drop(d)
            self._send.send_nowait(d.id)
