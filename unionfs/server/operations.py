"""The FUSE request handlers: thin wrappers over `Union`.

Attributes:
    union: the union's logic (node table, listings, changes, reads and writes).
    offload: the worker threads the union's long calls run on (its executor), and the server's.
    snapshots: listing snapshots for readers without a directory handle, by directory node id.
    timeout: entry and attribute cache time handed to the kernel, in seconds.
    dirs: open directory handles -> the listing snapshot taken at their first readdir.
    stats: the mount's live statistics (requests, lookups by branch; see `stats_snapshot`).

Each handler converts the OSError of the syscall that failed into `FUSEError` with its errno, once,
in `_handler` (`fallocate` and `lseek`, called synchronously by the libfuse shim, return the errno
instead);
`_errno_for` decides it for both.  Any other exception is a bug: it is logged with its traceback and
answered with EIO, and the mount keeps serving.  What may take long runs on worker threads
(`offload`), so the requests behind it are answered meanwhile: fsync and fsyncdir, large reads,
writes and fallocates, and the freeing of a big file's blocks by unlink, rename and release.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter_ns
from typing import Any, TypeVar

from . import compat  # isort: skip - patches libfuse and pyfuse3 before pyfuse3 loads (see compat)
import pyfuse3
import trio
from pyfuse3 import FUSEError

from unionfs.core.attrs import Stat
from unionfs.core.branches import ACL_ACCESS, LayerStack
from unionfs.core.caller import in_group_or_capable
from unionfs.core.interfaces import BIG_IO, FREE_BIG, Invalidator
from unionfs.core.listings import DEFAULT_MAX_ENTRIES, Listed
from unionfs.core.nodes import STATS_KEPT, Node
from unionfs.core.sysx import fallocate
from unionfs.core.udba import NO_WATCHES, NONE, NOTIFY, REVAL, WATCHED
from unionfs.core.union import Creds, Handle, Union
from unionfs.core.whiteout import Dialect

from . import stats
from .offload import Offload
from .passthrough import CAPABILITY, Passthrough
from .watch import Watcher

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Set in the fh of READDIRPLUS and FSYNCDIR by the libfuse shim when the kernel opens directories
#: without asking (zero-message opendir): the rest of the fh is then the directory's node id.
STATELESS_DIR = 1 << 63
#: Nodes whose reply attributes are kept built (about 350 bytes each; see Operations._attr).
REPLIES_KEPT = 4096
#: Listing snapshots kept per directory for readers without a handle (see Operations._snapshot).
SNAPSHOTS_KEPT = 4
#: The largest snapshot generation (the high half of a stateless directory offset).
MAX_GEN = (1 << 31) - 1
#: The index half of a stateless directory offset.
INDEX_MASK = 0xFFFF_FFFF


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
    """Wrap a handler: debug log, a new request for the union's caches, errors converted once, and
    the request counted and timed in its `stats.Requests` (inline: a method call would cost more
    than the counting itself)."""
    name = fn.__name__
    at = stats.slot(name)

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        if self.debug:
            log.debug("%s%r", name, args)
        self.union.table.next_request()
        r = self.stats.requests[at]
        started = perf_counter_ns()
        try:
            return await fn(self, *args)
        except FUSEError:
            r.errors += 1
            raise
        except Exception as e:
            r.errors += 1
            raise FUSEError(_errno_for(e, name, args, self.debug)) from None
        finally:
            took = perf_counter_ns() - started
            r.total_ns += took
            if took > r.max_ns:
                r.max_ns = took
            r.hist[(took.bit_length() + 1) >> 1] += 1     # stats.bucket(took), inline

    return wrapper  # type: ignore[return-value]


_FORGET, _FALLOCATE, _LSEEK = stats.slot("forget"), stats.slot("fallocate"), stats.slot("lseek")


class _EntryInvalidations:
    """``pyfuse3.invalidate_entry`` on a thread of its own, in order: a handler must not wait for
    it (the kernel may hold the directory's lock for the very request being answered).  pyfuse3's
    ``invalidate_entry_async`` does the same, but its thread, once stopped at the end of a session,
    never starts again, and a resident server's worker serves one session after another.  Started
    at the first invalidation of a session, stopped at its end (`stop`), as pyfuse3's is: no thread
    waits beside the session loop while nothing is invalidated."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[int, bytes] | None] | None = None

    def put(self, parent_id: int, name: bytes) -> None:
        if self.queue is None:
            self.queue = queue.SimpleQueue()
            threading.Thread(target=self._run, args=(self.queue,), name="invalidate-entry",
                             daemon=True).start()
        self.queue.put((parent_id, name))

    def stop(self) -> None:
        """The session ended: the thread sends what it has and exits."""
        if self.queue is not None:
            self.queue.put(None)
            self.queue = None

    @staticmethod
    def _run(q: queue.SimpleQueue[tuple[int, bytes] | None]) -> None:
        while (item := q.get()) is not None:
            try:
                pyfuse3.invalidate_entry(*item)
            except FileNotFoundError:
                pass   # the kernel did not have it
            except Exception:  # noqa: BLE001 - a stale cache entry is not worth a thread
                log.debug("invalidate_entry(%d, %r) failed", *item, exc_info=True)


entry_invalidations = _EntryInvalidations()


class KernelCache:
    """The union's `Invalidator`: drops what the kernel cached of a node or a name, through pyfuse3."""

    @staticmethod
    def invalidate_attr(node_id: int) -> None:
        try:
            pyfuse3.invalidate_inode(node_id, attr_only=True)
        except Exception:  # noqa: BLE001 - a stale cache entry is not worth failing a request over
            log.debug("invalidate_inode(%d) failed", node_id, exc_info=True)

    @staticmethod
    def invalidate_entry(parent_id: int, name: bytes) -> None:
        entry_invalidations.put(parent_id, name)


class Snapshots:
    """Listing snapshots for readers without a directory handle (see `Operations._snapshot`): by
    directory node id, generation -> names.  The union's listings count them against their ceiling
    and drop them with the listing or the node (`unionfs.core.listings.Beside`).

    Generations are numbered for all directories together (*last*), so a generation above *last*
    was never handed out, and one at most *last* that a directory does not keep was dropped (or
    is another directory's).  *wrapped*: the numbering started again (see `next_gen`), so a
    generation above *last* may be one from before.
    """

    __slots__ = ("by_node", "last", "wrapped", "taken", "continued")

    def __init__(self) -> None:
        self.by_node: dict[int, dict[int, list[bytes]]] = {}
        self.last = 0
        self.wrapped = False
        self.taken = 0          # for statistics: snapshots taken, and reads that went on in one
        self.continued = 0

    def next_gen(self) -> int:
        """A new generation; past MAX_GEN every snapshot is dropped and the numbering starts again
        (the offset's high half must stay positive)."""
        if self.last >= MAX_GEN:
            self.by_node.clear()
            self.last = 0
            self.wrapped = True
        self.last += 1
        return self.last

    def entries(self, node: Listed) -> int:
        snaps = self.by_node.get(node.id)
        return sum(len(s) for s in snaps.values()) if snaps else 0

    def drop(self, node: Listed) -> None:
        self.by_node.pop(node.id, None)


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
    offload: Offload
    snapshots: Snapshots
    timeout: float
    debug: bool
    dirs: dict[int, DirHandle]
    stats: stats.Stats
    watcher: Watcher | None

    supports_dot_lookup = True
    # The kernel's writeback cache (``-o writeback``): write(2) fills the page cache and the kernel
    # sends WRITEs of up to 1 MiB later, as with fuse-overlayfs; it keeps size, mtime and ctime itself
    # and sends them back with SETATTR (see setattr), and reads the pages around a partial write
    # through the writing handle (see _readable).  It excludes passthrough.
    enable_writeback_cache = False
    # POSIX ACLs: the kernel checks access with the ACL it reads as system.posix_acl_access, and
    # drops its cached attributes and ACL when one is set through the mount.  New objects get their
    # parent's default ACL from the upper filesystem (see Union._new_mode).
    enable_acl = True

    def __init__(self, union: Union, offload: Offload, snapshots: Snapshots, timeout: float = 1.0,
                 debug: bool = False, passthrough: bool = False, writeback: bool = False) -> None:
        """Serve *union*, which runs its long calls on *offload* and keeps *snapshots* beside its
        listings (`Operations.over` makes the three together); with *passthrough*, let the kernel
        read and write the open files it may itself (`unionfs.server.passthrough`); with
        *writeback*, let the kernel gather writes in its page cache instead."""
        super().__init__()
        self.union = union
        self.offload = offload
        self.snapshots = snapshots
        self.timeout = timeout
        self.debug = debug
        self.dirs = {}
        self.stats = stats.Stats(len(union.stack.layers))
        self.enable_writeback_cache = writeback
        # Whether the shim may answer security.capability for nodes the union knows have none (not
        # while changes made directly in the branches are looked for), and whether it was asked.
        self._caps_known = not union.udba.active
        self._caps_asked = False
        self.passthrough = Passthrough(union, passthrough and not writeback)
        self._replies: dict[int, tuple[Stat, pyfuse3.EntryAttributes]] = {}
        # The shim fills a reply's attributes in one call (not under -o metacopy, whose st_blocks
        # may be another object's)
        self._build_in_c = None if union.metacopy else compat.attr_builder()
        self._next_dh = 0
        self.on_init: Callable[[], None] = lambda: None
        self.watcher = None
        # -o udba=notify: names and attributes under a directory not watched get zero timeouts
        self._per_dir_timeouts = union.udba.mode == NOTIFY and timeout > 0

    @classmethod
    def over(cls, stack: LayerStack, dialect: Dialect, *, readonly: bool = False,
             max_listed: int = DEFAULT_MAX_ENTRIES, timeout: float = 1.0, debug: bool = False,
             udba: str = NONE, max_watches: int = 0, metacopy: bool = False,
             redirect_dir: str = "off", passthrough: bool = False,
             writeback: bool = False, invalidator: Invalidator | None = None) -> Operations:
        """The handlers of a new union of *stack*, whose long calls run on worker threads and whose
        changes the kernel's cache is told of; *udba* says how changes made directly in the branches
        are seen (see `unionfs.core.udba`): under ``reval`` the kernel caches nothing (zero
        timeouts: it would not ask), under ``notify`` a `Watcher` keeps up to *max_watches* marks.
        *invalidator*: what tells the kernel's cache of changes (default: `KernelCache`)."""
        offload, snapshots = Offload(), Snapshots()
        watcher = Watcher(max_watches) if udba == NOTIFY else None
        if udba == REVAL:
            timeout = 0.0
        union = Union(stack, dialect, readonly=readonly, max_listed=max_listed,
                      executor=offload, invalidator=invalidator or KernelCache(), beside=snapshots,
                      udba=udba, watches=watcher or NO_WATCHES, metacopy=metacopy,
                      redirect_dir=redirect_dir)
        ops = cls(union, offload, snapshots, timeout=timeout, debug=debug, passthrough=passthrough,
                  writeback=writeback)
        if watcher is not None:
            watcher.attach(union, offload)
            ops.watcher = watcher
        return ops

    def init(self) -> None:
        try:
            compat.report()   # the INIT request came through the session loop: the patches can tell
            self.passthrough.start()
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
            self.stats.replies_hit += 1
            return cached[1]
        self.stats.replies_built += 1
        a = self._build_attr(node, st)
        if st is node.st:   # only the attributes of a cached stat can serve again
            if len(replies) >= REPLIES_KEPT:
                replies.clear()   # full: start again (cheaper per reply than keeping an order)
            replies[node.id] = (st, a)
        return a

    def _build_attr(self, node: Node, st: Stat) -> pyfuse3.EntryAttributes:
        build = self._build_in_c
        if build is not None:
            # -1: the object's own link count (what union.nlink answers for all but merged directories)
            return build(st, node.id, node.ino, self.union.nlink(node, -1) if node.is_dir else -1,
                         self.timeout)
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.id
        if node.ino != node.id:
            compat.set_shown_ino(a, node.ino)
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        _dev, _ino, nlink, rdev, size, blocks, blksize, atime, mtime, ctime, mode, uid, gid = st.fields()
        a.st_mode = mode
        a.st_nlink = self.union.nlink(node, nlink)
        a.st_uid = uid
        a.st_gid = gid
        a.st_rdev = rdev
        a.st_size = size
        a.st_blksize = blksize
        a.st_blocks = self.union.shown_blocks(node, mode, blocks) if self.union.metacopy else blocks
        a.st_atime_ns = atime
        a.st_mtime_ns = mtime
        a.st_ctime_ns = ctime
        return a

    def _looked_up(self, node: Node, st: Stat) -> pyfuse3.EntryAttributes:
        node.nlookup += 1
        return self._attr(node, st)

    def _timed(self, a: pyfuse3.EntryAttributes, where: Node, node: Node | None) -> pyfuse3.EntryAttributes:
        """*a* with the timeouts of *node* (None: no such name) in directory *where* under
        -o udba=notify: zero for what is not watched, which is re-checked at each access instead
        (a name: its directory; a directory's attributes, which tell the kernel whether its cached
        listing holds: the directory itself; a file's attributes: its directory)."""
        watched = where.stamp is WATCHED
        a.entry_timeout = self.timeout if watched else 0.0
        if node is not None and node.is_dir:
            watched = node.stamp is WATCHED
        a.attr_timeout = self.timeout if watched else 0.0
        return a

    def _node(self, inode: int) -> Node:
        return self.union.table.get(inode)

    @staticmethod
    def _creds(ctx: pyfuse3.RequestContext) -> Creds:
        return Creds(ctx.uid, ctx.gid, ctx.umask, ctx.pid)

    # ------------------------------------------------------------------ read path

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        found = self.union.lookup(parent, name)
        if found is None:
            self.stats.negative += 1
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.timeout
            return self._timed(neg, parent, None) if self._per_dir_timeouts else neg
        self.stats.looked_up(found[0].layer)
        a = self._looked_up(*found)
        return self._timed(a, parent, found[0]) if self._per_dir_timeouts else a

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        started = perf_counter_ns()
        try:
            for inode, n in inode_list:
                self.union.table.forget(inode, n)
                if self._caps_asked or self.enable_writeback_cache:
                    compat.no_capability(inode, False)   # node ids are reused once forgotten
        except Exception:
            log.exception("forget failed")
        self.stats.requests[_FORGET].add(perf_counter_ns() - started)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if self.union.revalidate and self.union.unsure(node):
            self.union.recheck(node)    # -o udba=reval: changes made directly in a branch show at once
        a = self._attr(node, self.union.stat(node))
        if self._per_dir_timeouts:
            return self._timed(a, node.links[-1][0] if node.links else node, node)
        return a

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
        listing = union.listing(node)
        timed = self._per_dir_timeouts
        # bound once: a cold listing makes a node and a reply per entry
        node_for, attr, reply = union.node_for, self._attr, pyfuse3.readdir_reply
        caps, has_xattr, no_capability = self._caps_asked, union.has_xattr, compat.no_capability
        for i in range(start, len(entries)):
            name = entries[i]
            if i < 2:           # "." and ".."
                try:
                    found = union.lookup(node, name)
                except OSError as e:
                    if e.errno != errno.ESTALE:
                        raise
                    # A directory a branch change took, read through a handle opened before: gone,
                    # as a removed directory is (getdents answers ENOENT).
                    raise FUSEError(errno.ENOENT) from None
                assert found is not None
                if not pyfuse3.readdir_reply(token, name, self._attr(*found), gen | (i + 1)):
                    return
                continue
            cur = listing.get(name)
            if cur is None:
                continue        # removed since the snapshot
            try:
                child, st = node_for(node, name, cur)
            except FileNotFoundError:
                continue
            a = attr(child, st)
            if timed:
                self._timed(a, node, child)
            if caps and has_xattr(child, CAPABILITY) is False:
                no_capability(child.id, True)
            if not reply(token, name, a, gen | (i + 1)):
                union.table.maybe_free(child)
                return
            child.nlookup += 1

    def _entries(self, node: Node) -> list[bytes]:
        """A snapshot of the names in *node* (the names themselves are the listing's: 8 bytes each)."""
        return [b".", b"..", *self.union.listing(node)]

    def _snapshot(self, node: Node, offset: int) -> tuple[list[bytes], int, int]:
        """Listing, start index and offset tag for a READDIRPLUS without an open directory handle.

        Reading from offset 0 takes a new snapshot of the listing; each entry's offset names the
        snapshot (high half) and the position in it, so a reader that goes on later continues in
        what it started with, however the directory changed meanwhile.  The last few snapshots of
        a directory are kept (there is no releasedir to say a reader is done).

        Any other offset goes on at the next entry, as on ext4 and overlayfs: entry *i* of
        snapshot *g* stands at ``g << 32 | i`` (the first at 0), so an offset below every
        snapshot's starts the newest at its second entry, one inside a snapshot at its index, and
        one above the newest snapshot of the directory, never handed out for it, is past the end.
        A reader whose snapshot was dropped goes on at the same position in a new one.
        """
        snapshots = self.snapshots
        snaps = snapshots.by_node.get(node.id)
        gen, index = offset >> 32, max(offset & INDEX_MASK, 1)
        if offset and snaps:
            entries = snaps.get(gen)
            if entries is not None:
                snapshots.continued += 1
                return entries, index, gen << 32
            newest = max(snaps)
            if gen == 0:                    # below every offset but 0: the next entry is the 2nd
                return snaps[newest], 1, newest << 32
            if gen > newest:                # above the directory's last offset: nothing more
                return [], 0, 0
        elif offset and gen > snapshots.last and not snapshots.wrapped:
            return [], 0, 0                 # never handed out: past the end
        if snaps is None:
            snaps = snapshots.by_node[node.id] = {}
        elif len(snaps) >= SNAPSHOTS_KEPT:
            del snaps[min(snaps)]
        gen = snapshots.next_gen()
        snapshots.taken += 1
        entries = snaps[gen] = self._entries(node)
        self.union.table.listings.use(node, grown=True)     # snapshots count against the ceiling
        # a reader whose snapshot was dropped goes on at the same position in the new one
        return entries, index if offset else 0, gen << 32

    @_handler
    async def releasedir(self, fh: int) -> None:
        dh = self.dirs.pop(fh)
        dh.node.handles -= 1
        self.union.table.maybe_free(dh.node)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self._node(fh & ~STATELESS_DIR) if fh & STATELESS_DIR else self.dirs[fh].node
        await self.union.fsyncdir(node)

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        keep = True
        if self.union.revalidate and self.union.unsure(node):
            keep = self._unchanged(node)
        wide = self._readable(flags)
        try:
            h = await self.union.open(node, wide)
        except PermissionError:
            if wide == flags:
                raise
            h = await self.union.open(node, flags)   # a file we may write but not read
        self.passthrough.open(h)   # pyfuse3 replies right after: no await in between
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=keep)

    def _unchanged(self, node: Node) -> bool:
        """Whether *node*'s file is as the daemon last saw it (-o udba=reval, at open: a file
        rewritten directly in its branch must not be read from the kernel's cached pages)."""
        old = node.st
        node.st = None
        try:
            new = self.union.stat(node)
        except OSError:
            return False
        return old is not None and (old.st_ino, old.st_size, old.st_mtime_ns, old.st_ctime_ns) == (
            new.st_ino, new.st_size, new.st_mtime_ns, new.st_ctime_ns)

    def _readable(self, flags: int) -> int:
        """*flags* for the real file: with the writeback cache the kernel reads the rest of a page
        a write covers in part through the writing handle, so a write-only open reads too."""
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            return (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.union.read(fh, off, size)

    @_handler
    async def release(self, fh: int) -> None:
        h = self.union.handles[fh]
        self.passthrough.release(h)
        if h.node.links or os.fstat(h.fd).st_blocks * 512 < FREE_BIG:
            self.union.release(h)
            return
        # Its names are all gone: this may be the last reference, and freeing a big file's blocks
        # takes long.  A duplicate closed on a worker thread after the answer is then the last one
        # (the kernel does not wait for a release: an answer after the unmount would fail).
        last = os.dup(h.fd)
        self.union.release(h)
        self.offload.close_soon(last)

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
        node = self._node(inode)
        if name == CAPABILITY and self._caps_known:
            # Asked at every write(2) (FUSE has no SB_NOSEC) and, by a diff of a container's
            # layer, for every entry: the shim answers "none" itself for the nodes that have none,
            # until one is set or the node forgotten; once asked, listings tell it of their entries.
            self._caps_asked = True
            if self.union.has_xattr(node, CAPABILITY) is False:
                compat.no_capability(inode, True)
        return self.union.getxattr(node, name)

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
        written = await self.union.write(fh, off, buf)
        h = self.union.handles[fh]
        if h.flags & os.O_DIRECT:
            await self._drop_cached_data(h.node.id)
        return written

    async def _drop_cached_data(self, node_id: int) -> None:
        """Drop the kernel's cached pages of a file after a direct write, before answering it.

        The kernel drops them itself around a synchronous direct write, but not when an
        asynchronous one completes: a buffered read that raced with the write may have cached
        what was there before, for every later reader (files keep their cache across opens).  On a
        worker thread: the kernel waits for pages a read has locked, and that read may need this
        loop to be answered."""
        try:
            await self.offload.run(pyfuse3.invalidate_inode, node_id, False)
        except OSError:
            log.debug("invalidate_inode(%d) failed", node_id, exc_info=True)

    def _sync_done(self, at: int, started: int, failed: bool) -> None:
        """Count a request the libfuse shim called synchronously (outside `_handler`)."""
        r = self.stats.requests[at]
        r.add(perf_counter_ns() - started)
        r.errors += failed

    def fallocate(self, req: int, inode: int, fh: int, mode: int, offset: int, length: int) -> int | None:
        """FUSE_FALLOCATE, called synchronously by the libfuse shim: the errno to answer (0: done),
        or None when a task answers request *req* later (counted when called: the time is of its
        synchronous part)."""
        started = perf_counter_ns()
        err = self._fallocate(req, inode, fh, mode, offset, length)
        self._sync_done(_FALLOCATE, started, bool(err))
        return err

    def _fallocate(self, req: int, inode: int, fh: int, mode: int, offset: int, length: int) -> int | None:
        """The work of `fallocate`.

        A range of BIG_IO bytes or more may take long (a punched hole frees its blocks, a zeroed
        range is written back first): it is done on a worker thread by a trio system task, which
        trio waits for before `trio.run` returns, so the answer goes out before the session closes.
        """
        args = (inode, fh, mode, offset, length)
        if self.debug:
            log.debug("fallocate%r", args)
        self.union.table.next_request()
        try:
            h = self.union.handles[fh]
            fd = self.union.fallocate_fd(h)
            if length < BIG_IO:
                fallocate(fd, mode, offset, length)
                return 0
        except Exception as e:
            return _errno_for(e, "fallocate", args, self.debug)
        # The task gets its own duplicate of the upper file now: whatever happens to the handle
        # before the task first runs (a shutdown closing every branch fd), the call has its file.
        try:
            dup = os.dup(fd)
        except OSError as e:
            return _errno_for(e, "fallocate", args, self.debug)
        trio.lowlevel.spawn_system_task(self._fallocate_later, req, h, dup, args)
        return None

    async def _fallocate_later(self, req: int, h: Handle, fd: int, args: tuple[int, int, int, int, int]
                               ) -> None:
        err = errno.EINTR       # cancelled: the mount is going away
        try:
            await self.offload.on_fd(fd, fallocate, *args[2:])
            err = 0
        except Exception as e:
            err = _errno_for(e, "fallocate", args, self.debug)
        finally:
            os.close(fd)
            h.node.st = None
            compat.reply_err(req, err)

    def lseek(self, inode: int, fh: int, offset: int, whence: int) -> int:
        """FUSE_LSEEK (SEEK_DATA, SEEK_HOLE), called synchronously by the libfuse shim: the new
        offset, or the errno negated."""
        started = perf_counter_ns()
        found = self._lseek(inode, fh, offset, whence)
        self._sync_done(_LSEEK, started, found < 0)
        return found

    def _lseek(self, inode: int, fh: int, offset: int, whence: int) -> int:
        args = (inode, fh, offset, whence)
        if self.debug:
            log.debug("lseek%r", args)
        try:
            return self.union.lseek(self.union.handles[fh], offset, whence)
        except Exception as e:
            return -_errno_for(e, "lseek", args, self.debug)

    def use_shim(self) -> None:
        """Hand the next FUSE session fallocate, lseek, modes without the umask applied (the union
        applies it where no default ACL replaces it) and, with caching on, kernel-cached listings."""
        compat.configure_session(cache_dirs=self.timeout > 0, fallocate=self.fallocate, lseek=self.lseek,
                                 passthrough=self.passthrough.enabled,
                                 writeback=self.enable_writeback_cache)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.union.fsync(fh, datasync)

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        h, node, st = self.union.create(self._node(parent_inode), name, mode, self._readable(flags),
                                        self._creds(ctx))
        self.passthrough.open(h, new=True)
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
        parent = self._node(parent_inode)
        pin = self.union.pin_big_file(parent, name)
        try:
            self.union.unlink(parent, name)
        finally:
            if pin is not None:
                await self.offload.close(pin)   # frees the blocks off the loop

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.union.rmdir(self._node(parent_inode), name)

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        new_parent = self._node(parent_inode_new)
        pin = self.union.pin_big_file(new_parent, name_new)   # a file renamed over may be big
        try:
            await self.union.rename(self._node(parent_inode_old), name_old, new_parent, name_new, flags)
        finally:
            if pin is not None:
                await self.offload.close(pin)

    @_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_ctime and fields.update_mtime and not (
                fields.update_atime or fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid):
            kept = self._times_kept(node, attr.st_mtime_ns)
            if kept is not None:
                return self._attr(node, kept)
        st = await self.union.setattr(
            node,
            kill_setid=self._kills_setid(node, attr, fields),
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            handle=self.union.handles.get(fh) if fh is not None else None,
        )
        return self._attr(node, st)

    @staticmethod
    def _kills_setid(node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> bool:
        """Whether a SETATTR must clear the set-id bits of *node* (see `Attributes.setattr`).

        With FUSE_HANDLE_KILLPRIV_V2 (asked for with passthrough, see the libfuse shim) the kernel
        no longer reads the attributes and sends the new mode itself: a write or fallocate by a
        caller without CAP_FSETID, and chown(f, -1, -1), send a SETATTR of nothing to a
        non-directory; a truncate by such a caller carries FATTR_KILL_SUIDGID, which the shim hands
        on as the st_mode `compat.KILL_SUIDGID_MARK` (and a chown with an owner clears the bits in
        the upper filesystem itself)."""
        if node.is_dir or not compat.killpriv():
            return False
        if fields.update_mode:
            return False
        if attr.st_mode == compat.KILL_SUIDGID_MARK:
            return True
        return not (fields.update_size or fields.update_uid or fields.update_gid or fields.update_atime
                    or fields.update_mtime or fields.update_ctime)

    def _times_kept(self, node: Node, mtime_ns: int) -> Stat | None:
        """The attributes to answer a SETATTR of mtime and ctime alone with, when it changes
        nothing we can change; None when it must be carried out.

        Only the kernel's writeback cache sends ctime (with mtime: a utimensat of mtime alone; alone:
        a chown to -1:-1, which copies up as on overlayfs).  It writes back the times it keeps after
        a write, and after an unlink, rename or link, also of files that stayed in a lower branch
        (the mtime it holds is theirs: copying them up for it would be wrong) or whose last name
        is gone (no file to set it on; failing would make the kernel report EIO at the next close
        of any descriptor of it).  ctime cannot be set, and the real one moves with any change."""
        try:
            st = self.union.stat(node)
        except OSError:
            return node.st if not node.links else None   # gone: nothing left to set a time on
        return st if st.st_mtime_ns == mtime_ns else None

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        self.passthrough.xattr_changed(node.id, name)
        await self.union.setxattr(node, name, value, self._kills_sgid(node, name, ctx))

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        self.passthrough.xattr_changed(node.id, name)
        await self.union.removexattr(node, name, self._kills_sgid(node, name, ctx))

    def _kills_sgid(self, node: Node, name: bytes, ctx: pyfuse3.RequestContext) -> bool:
        """Whether changing xattr *name* clears the setgid bit, as on overlayfs: a change of the
        access ACL by a caller neither in the file's group nor holding CAP_FSETID."""
        if name != ACL_ACCESS:
            return False
        st = self.union.stat(node)
        return bool(st.st_mode & stat.S_ISGID) and not in_group_or_capable(ctx.pid, ctx.gid, st.st_gid)

    # ------------------------------------------------------------------ statistics

    def stats_snapshot(self) -> dict[str, Any]:
        """The mount's live statistics as a JSON-serialisable dict (``{"version": 1, ...}``; see
        `unionfs.server.stats`, whose `format_snapshot` renders it)."""
        union, table, st = self.union, self.union.table, self.stats
        layers = union.stack.layers
        listings, tally, proc = table.listings, union.copyup.tally, stats.process()
        top_mode = "ro" if union.readonly else "rw"
        return {
            "version": stats.VERSION,
            "started": st.started,
            "uptime_s": time.monotonic() - st.started_mono,
            "mount": {
                "branches": [{"index": i, "path": layer.path, "mode": top_mode if layer.writable else "ro"}
                             for i, layer in enumerate(layers)],
                "whiteouts": union.writer.dialect.value,
                "readonly": union.readonly,
                "timeout": self.timeout,
                "max_cached_entries": listings.capacity,
            },
            "requests": st.requests_dict(),
            "histogram_bounds_ns": stats.bucket_bounds_ns(),
            "copy_ups": {"files": tally.files, "dirs": tally.dirs, "bytes": tally.bytes,
                         "total_ns": tally.ns, "max_ns": tally.max_ns},
            "lookups": {
                "by_branch": [{"index": i, "path": layers[i].path if i < len(layers) else None, "count": n}
                              for i, n in enumerate(st.lookups) if n],
                "negative": st.negative,
            },
            "caches": {
                "stats": {"hits": table.stat_hits, "misses": table.stat_reads, "kept": table.stats_kept(),
                          "ceiling": STATS_KEPT},
                "listings": {"hits": listings.hits, "misses": listings.built, "dropped": listings.dropped,
                             "entries": listings.total, "dirs": len(listings), "ceiling": listings.capacity},
                "replies": {"hits": st.replies_hit, "misses": st.replies_built, "kept": len(self._replies),
                            "ceiling": REPLIES_KEPT},
                "xattr_names": {"hits": union.xattr_hits, "misses": union.xattr_lists},
                "dir_fds": {"hits": None, "misses": table.fds.reopened, "open": len(table.fds),
                            "ceiling": table.fds.capacity},
                "snapshots": {"taken": self.snapshots.taken, "continued": self.snapshots.continued,
                              "dirs": len(self.snapshots.by_node)},
            },
            "nodes": len(table),
            "handles": {"files": len(union.handles), "dirs": len(self.dirs)},
            "fds": {"total": proc["fds"], "branch_dirs": len(table.fds) + len(layers),
                    "files": len(union.handles)},
            "memory": {"rss_bytes": proc["rss_bytes"], "peak_rss_bytes": proc["peak_rss_bytes"]},
        }
