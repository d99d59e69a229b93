"""Resolution and open files: what every request of the union needs, and copy-up.

`Resolver` holds the state the parts of a `Union` share: the node table, the writer of whiteouts,
the open files (`Handle`), the executor of long calls and the kernel cache to correct.  It resolves
names to nodes and their stats, serves reads and writes on open files, and brings nodes into the
writable branch (copy-up: `ensure_upper`, `upper_dir`) for the parts that change the tree
(`namespace.Namespace`, `attributes.Attributes`).

Every method raises OSError with the errno a program should see.  No invariant is held across an
await: the only awaits are copy-ups, which hold the node's lock and re-check what they depend on
afterwards, and calls on open files handed to the executor.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from stat import S_ISDIR

from .attrs import Stat
from .branches import DirFd, LayerStack
from .copyup import CopyUp
from .interfaces import BIG_IO, FREE_BIG, INLINE, NO_KERNEL_CACHE, Executor, Invalidator
from .listings import DEFAULT_MAX_ENTRIES, NOTHING_BESIDE, Beside
from .merge import Entry, build_listing, open_dir_layers
from .metacopy import copy_data_up, data_blocks, data_layer, meta_xattr, open_data, set_move_redirect
from .nodes import Key, Node, NodeTable, Superseded
from .redirect import Redirects
from .udba import NO_WATCHES, NONE, WATCHED, Udba, Watches
from .whiteout import Dialect, WhiteoutWriter

log = logging.getLogger(__name__)

# Flags the kernel has already acted on, or that would change what a pread/pwrite at an offset means
# (O_APPEND) or require aligned buffers pyfuse3 does not give (O_DIRECT: the kernel still bypasses
# its page cache for such an open).
OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND | os.O_DIRECT
PREFETCH = 128 << 10    # what the first open of a file for reading asks the disk for ahead
#: Distinct sets of xattr names kept shared between nodes (see Resolver.xattr_names).
XATTR_SETS_SHARED = 1024


def err(code: int, what: str = "", name: bytes = b"") -> OSError:
    return OSError(code, what or os.strerror(code), os.fsdecode(name))


class Handle:
    """An open file: the real fd and the branch it was opened in (it follows the node up)."""

    __slots__ = ("fh", "node", "fd", "layer", "flags")

    def __init__(self, fh: int, node: Node, fd: int, layer: int, flags: int) -> None:
        self.fh = fh
        self.node = node
        self.fd = fd
        self.layer = layer
        self.flags = flags


class Resolver:
    """Names to nodes, open files, copy-up: the state and the steps every part of a union uses.

    *executor* runs long calls (big reads, writes, copies, truncates) and makes the per-node locks
    of copy-up; *invalidator* is told of what the kernel may have cached and a change made stale
    (a copy-up changes a file's link count; other names of a lower hard link then show it no more);
    *beside* is what the floor above keeps per directory beside its listing (see `Listings`).
    """

    def __init__(self, stack: LayerStack, dialect: Dialect, readonly: bool = False,
                 max_listed: int = DEFAULT_MAX_ENTRIES, executor: Executor = INLINE,
                 invalidator: Invalidator = NO_KERNEL_CACHE, beside: Beside = NOTHING_BESIDE,
                 udba: str = NONE, watches: Watches = NO_WATCHES, metacopy: bool = False,
                 redirect_dir: str = "off") -> None:
        self.stack = stack
        self.table = NodeTable(stack, max_listed, beside)
        self.udba = Udba(self.table, udba, watches)
        self.revalidate = self.udba.active
        if self.revalidate:
            self.table.on_free = self.udba.freed
        self.readonly = readonly or stack.upper is None
        self.work_fd = stack.work_fd
        self.privileged = os.geteuid() == 0
        self.writer = WhiteoutWriter(dialect, stack.work_fd, self.privileged)
        self.executor = executor
        self.invalidator = invalidator
        self.copyup = CopyUp(stack.work_fd, self.writer, executor)
        self.metacopy = metacopy
        self.redirects = Redirects(redirect_dir, self.table, self.writer)
        self.handles: dict[int, Handle] = {}
        self._next_fh = 0
        self._xattr_sets: dict[frozenset[bytes], frozenset[bytes]] = {}
        self.xattr_hits = 0     # xattr name sets answered from the node (`xattr_names`)
        self.xattr_lists = 0    # ... and listed from the branch

    def close(self) -> None:
        """Close every fd this union holds on its branches (open files, then nodes)."""
        for h in self.handles.values():
            os.close(h.fd)
        self.handles.clear()
        self.table.close()

    # ------------------------------------------------------------------ resolution

    def listing(self, d: Node) -> dict[bytes, Entry]:
        """*d*'s merged listing, built from its branches when it has none (never built yet, or
        dropped under the ceiling of `Listings`).  Kept until the next request starts; a caller that
        awaits in between reads it again after (or pins it: `Listings.pinned`)."""
        if not d.is_dir:
            raise err(errno.ENOTDIR)
        listing = d.listing
        listings = self.table.listings
        if listing is not None and self.revalidate and d.stamp is not WATCHED and not self.udba.fresh(d):
            listing = None
        if listing is None:
            listing = d.listing = build_listing(self.table.branch_fds(d))
            listings.built += 1
            listings.use(d, grown=True)
            if self.revalidate:
                self.udba.listed(d)
        else:
            listings.hits += 1
            listings.use(d)
        return listing

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, Stat] | None:
        """The node for *name* in *parent* and its real stat, or None when the name is not visible."""
        if name == b".":
            return parent, self.stat(parent)
        if name == b"..":
            up = parent.links[-1][0] if parent.links else self.table.root
            return up, self.stat(up)
        if len(name) > 255:
            raise err(errno.ENAMETOOLONG, name=name)
        e = self.listing(parent).get(name)
        if e is None:
            return None
        return self.node_for(parent, name, e)

    def node_for(self, parent: Node, name: bytes, e: Entry, fresh: bool = False
                 ) -> tuple[Node, Stat]:
        """The node behind the visible name *name* (listing entry *e*) of *parent*, and its stat."""
        table = self.table
        known = parent.children.get(name)
        if known is not None and known.st is not None and known.layer == e.layer and (
                not self.revalidate or parent.stamp is WATCHED):
            table.stat_hits += 1
            return known, known.st
        try:
            st, dev, ino, mode = table.dirfd(parent, e.layer).lstat_packed(name)
        except FileNotFoundError:
            return self._read_again(parent, name, fresh)
        if S_ISDIR(mode) != e.is_dir:
            return self._read_again(parent, name, fresh)
        key: Key = (dev, ino) if e.is_dir or e.layer == 0 else (parent.id, name)
        node = table.by_key.get(key)
        if node is None and not e.is_dir:
            # the common case of a cold listing: a file not known under any name
            node = table.new_child(parent, name, e.layer, key, dev, ino, mode)
            return node, table.remember(node, st)
        if node is None or node.is_dir != e.is_dir:
            if e.is_dir and self.redirects.active:
                return self._new_dir_following_redirects(parent, name, e, key, st, fresh)
            dirfds = open_dir_layers(lambda layer: self.table.dirfd_or_none(parent, layer), name,
                                     e.dir_layers) if e.is_dir else []
            if e.is_dir and not dirfds:
                return self._read_again(parent, name, fresh)
            node = table.new_of(e.is_dir, e.layer, key, dev, ino, mode)
            if e.is_dir:
                table.set_dirs(node, dirfds)
        elif self.revalidate and e.is_dir and tuple(bd.layer for bd in node.dirs) != e.dir_layers:
            # A directory of this name appeared or went in a branch below the top one, directly.
            dirfds = open_dir_layers(lambda layer: self.table.dirfd_or_none(parent, layer), name,
                                     e.dir_layers)
            if not dirfds:
                return self._read_again(parent, name, fresh)
            self.udba.regroup(node)
            table.set_dirs(node, dirfds)
        table.add_link(node, parent, name)
        return node, table.remember(node, st)

    def _new_dir_following_redirects(self, parent: Node, name: bytes, e: Entry, key: Key,
                                     st: Stat, fresh: bool) -> tuple[Node, Stat]:
        """`node_for` for a directory not known yet, its lower directories found through the
        redirects (see `redirect.Redirects.open_stack`)."""
        stack, own = self.redirects.open_stack(parent, name, e.layer)
        if not stack or stack[0][0] != e.layer:
            for _, fd, _ in stack:
                os.close(fd)
            return self._read_again(parent, name, fresh)
        node = self.table.new(True, e.layer, key, st)
        self.table.set_dirs(node, [(layer, fd) for layer, fd, _ in stack])
        for bd, (_, _, route) in zip(node.dirs, stack, strict=True):
            bd.route = route
        node.redirect = own
        self.table.add_link(node, parent, name)
        return node, self.table.remember(node, st)

    def _read_again(self, parent: Node, name: bytes, fresh: bool) -> tuple[Node, Stat]:
        """*name* is not what *parent*'s listing says: a branch changed underneath the mount.
        Read the listing again, once, and resolve the name from that; ENOENT if it is gone."""
        if fresh:
            raise err(errno.ENOENT, name=name)
        log.info("a branch changed underneath: reading the listing of %r again", os.fsdecode(name))
        parent.listing = None
        again = self.listing(parent).get(name)
        if again is None:
            raise err(errno.ENOENT, name=name)
        return self.node_for(parent, name, again, fresh=True)

    def touch(self, *nodes: Node | None) -> None:
        """These nodes changed through the union: forget their cached stat (and, for a directory
        re-checked under -o udba=reval, take its new stamp: the change is not news)."""
        for n in nodes:
            if n is not None:
                n.st = None
                if n.stamp:
                    self.udba.restamp(n)

    def unsure(self, node: Node) -> bool:
        """Whether what is cached of *node* must be checked against its branches before it answers
        (-o udba=reval, or notify where it is not watched: a directory by its own marks, anything
        else by its directory's)."""
        if not self.revalidate:
            return False
        where = node if node.is_dir or not node.links else node.links[-1][0]
        return where.stamp is not WATCHED

    def recheck(self, node: Node) -> None:
        """Forget *node*'s cached stat, and for a directory its listing if a branch changed (see
        `unsure`)."""
        node.st = None
        if node.is_dir and node.listing is not None and node.stamp is not WATCHED:
            self.udba.fresh(node)

    def stat(self, node: Node) -> Stat:
        if node.st is not None:
            self.table.stat_hits += 1
            return node.st
        if node.is_dir:
            if not node.dirs and isinstance(node.links, Superseded):
                raise self.gone(node)
            st = os.fstat(self.table.top_dirfd(node))
        elif node.links:
            pfd, name = self.real_parent_fd(node)
            st = pfd.lstat(name)
        else:
            h = self.any_handle(node)   # unlinked but open: not cached, nothing names it
            return Stat.of(os.fstat(h.fd))
        return self.table.remember(node, st)

    def open_handles(self, node: Node) -> list[Handle]:
        return [h for h in self.handles.values() if h.node is node] if node.handles else []

    def gone(self, node: Node, other: OSError | None = None) -> OSError:
        """The error for a request on *node* that needs a name it no longer has, or that its
        directory lost: when a branch change took the name of *node* or of an ancestor (the
        topmost such, see `Superseded`), ESTALE if that name shows an object again (the kernel,
        asked by a path, walks it again and finds that object), else ENOENT (gone, as after an
        unlink or rmdir: so also for a process that holds it open or as its current directory).
        Otherwise *other*, or ENOENT."""
        taken: tuple[Node, bytes] | None = None
        n = node
        for _ in range(4096):   # a bound, should the links ever form a loop
            links = n.links
            if isinstance(links, Superseded):
                taken = links.was
                n = taken[0]
            elif links:
                n = links[-1][0]
            else:
                break
        if taken is None:
            return other or err(errno.ENOENT)
        parent, name = taken
        try:
            # A directory dropped meanwhile cannot tell: the kernel's walk will.
            shown = self.table.nodes.get(parent.id) is not parent or name in self.listing(parent)
        except OSError:
            shown = False
        return err(errno.ESTALE if shown else errno.ENOENT, name=name)

    def real_parent_fd(self, node: Node) -> tuple[DirFd, bytes]:
        """`NodeTable.real_parent_fd`, or the error `gone` says when a branch change took the
        node's name or its directory's."""
        try:
            return self.table.real_parent_fd(node)
        except OSError as e:
            if e.errno != errno.ESTALE:
                raise
            raise self.gone(node, e) from None

    def any_handle(self, node: Node) -> Handle:
        """An open file of *node*, the only way left to an object whose names are all gone (else
        `gone`)."""
        for h in self.open_handles(node):
            return h
        raise self.gone(node)

    def nlink(self, node: Node, nlink: int) -> int:
        """The link count shown for *node*, whose real object has *nlink*: overlayfs reports 1 for
        a merged directory (its real count is unknowable)."""
        if node.is_dir and len(node.dirs) > 1:
            return 1
        return nlink

    def readlink(self, node: Node) -> bytes:
        pfd, name = self.real_parent_fd(node)
        return pfd.readlink(name)

    def xattr_target(self, node: Node, fn: Callable[[str | int], object]) -> object:
        """``fn(target)``, *target* naming *node*'s real object (an fd, or a path of an O_PATH fd)."""
        if node.is_dir:
            return fn(self.table.top_dirfd(node))
        if not node.links:
            # Unlinked but open (fgetxattr and friends reach us with the node alone): an open file
            # in the branch the node lives in is the only way left to the object.
            for h in self.open_handles(node):
                if h.layer == node.layer:
                    return fn(h.fd)
            raise self.gone(node)
        pfd, name = self.real_parent_fd(node)
        return pfd.on_path(name, fn)

    def xattr_names(self, node: Node) -> frozenset[bytes]:
        """The names of *node*'s real xattrs (as stored in the branch), cached on the node."""
        if node.xattrs is None:
            self.xattr_lists += 1
            if node.is_dir or not node.links:
                names = self.xattr_target(node, os.listxattr)
                found = frozenset(os.fsencode(n) for n in names)  # type: ignore[attr-defined]
            else:
                pfd, name = self.real_parent_fd(node)
                found = frozenset(pfd.listxattr(name))
            # Most objects share a handful of name sets (none at all, or security.selinux): keep
            # one copy of each (a frozenset costs 216 bytes) while there are few distinct ones.
            shared = self._xattr_sets.get(found)
            if shared is None and len(self._xattr_sets) < XATTR_SETS_SHARED:
                self._xattr_sets[found] = shared = found
            node.xattrs = found if shared is None else shared
        else:
            self.xattr_hits += 1
        return node.xattrs

    def data_layer(self, node: Node) -> int:
        """The branch that holds *node*'s data: its own, but for a metadata-only copy (-o metacopy)."""
        layer = node.lowerdata
        if layer is None:
            if not self.metacopy or node.is_dir:
                return node.layer
            layer = node.lowerdata = data_layer(self, node, self.stat(node).st_mode)
        return layer or node.layer

    def set_move_redirect(self, node: Node, parent: Node, name: bytes, samedir: bool,
                          absolute: bool = False) -> None:
        """Before a rename or link of *node*: see `metacopy.set_move_redirect`."""
        if self.metacopy and not node.is_dir:
            set_move_redirect(self, node, parent, name, samedir, absolute)

    def shown_blocks(self, node: Node, mode: int, blocks: int) -> int:
        """st_blocks as overlayfs shows it: a metadata-only copy shows its data's."""
        if not self.metacopy or not stat.S_ISREG(mode):
            return blocks
        if self.data_layer(node) == node.layer:
            return blocks
        return data_blocks(self, node)

    # ------------------------------------------------------------------ copy-up

    def check_writable(self) -> None:
        if self.readonly:
            raise err(errno.EROFS)

    def upper_dir(self, d: Node) -> DirFd:
        """The writable branch's directory for *d*, copying it (and its parents) up first.

        The ancestors still missing there are gathered walking up and copied walking down, so a
        tree of any depth is copied up without recursion, holding a few fds: once a level is
        made, the fds the walk began to use for it are released, but its new directory's, which
        the next level is made in (and the caller gets, at the end).
        """
        self.check_writable()
        fd = self.table.dirfd_or_none(d, 0)
        if fd is not None:
            return fd
        missing = [d]
        parent = d.name_in()[0]
        while parent.branch_dir(0) is None:
            missing.append(parent)
            parent = parent.name_in()[0]
        with self.table.fds.pins() as pins:
            for node in reversed(missing):
                self._copy_up_dir(node)
                pins.release(keep=node.dirs[0])
        return self.table.dirfd(d, 0)

    def _copy_up_dir(self, d: Node) -> None:
        """Copy the directory *d*, whose parent is in the writable branch already, up."""
        parent, name = d.name_in()
        fd = self.copyup.dir(self.table.top_dirfd(d), self.table.dirfd(parent, 0), name)
        self.table.add_upper_dir(d, fd)
        d.xattrs = None
        if self.revalidate:
            self.udba.grew(d)
        self.touch(d, parent)
        st = os.fstat(fd)
        self.table.rekey(d, (st.st_dev, st.st_ino))
        self.invalidator.invalidate_attr(d.id)
        e = parent.listing.get(name) if parent.listing is not None else None
        if e is not None:
            e.layer = 0
            e.dir_layers = (0, *e.dir_layers)

    async def ensure_upper(self, node: Node, keep: int | None = None, meta: bool = False) -> None:
        """Make sure *node* lives in the writable branch (copy-up); *keep* bounds the data copied.

        *meta*: the caller changes metadata only, so with -o metacopy a regular file's data may
        stay below (see `metacopy`); otherwise the data of a metadata-only copy is copied up now."""
        self.check_writable()
        if node.is_dir:
            self.upper_dir(node)
            return
        if node.layer == 0 and (meta or self.data_layer(node) == 0):
            return
        if node.lock is None:
            node.lock = self.executor.lock()
        async with node.lock:
            if node.layer != 0:
                await self._copy_up_file(node, keep, meta and self.metacopy)
            if not meta and self.data_layer(node) != 0:
                await copy_data_up(self, node, keep)

    async def _copy_up_file(self, node: Node, keep: int | None, meta: bool = False) -> None:
        """Copy the non-directory *node* up: parents first, then a complete copy made in the work
        directory, placed under its name once the name is known to still stand for *node* (with
        *meta*, of a regular file, a metadata-only copy, its data left where it is)."""
        try:
            parent, name = node.name_in()
            self.upper_dir(parent)
            src_pfd = self.table.dirfd(parent, node.layer)
        except OSError as e:
            if e.errno != errno.ESTALE:
                raise
            raise self.gone(node, e) from None
        data = self.data_layer(node)
        meta = meta and stat.S_ISREG(self.stat(node).st_mode)
        source = self.stack.layers[node.layer]
        made = await self.copyup.file(
            src_pfd, name, keep,
            data=None if data == node.layer or meta else open_data(self, node, os.O_RDONLY),
            meta_xattr=meta_xattr(self.privileged) if meta else None)
        try:
            # The copy may have awaited: make sure the name still stands for this node, and the
            # node for the object copied (a branch change may have rebound it to another branch's).
            if node.layer == 0 or (parent, name) not in node.links:
                raise self.gone(node)
            if node.layer < 0 or self.stack.layers[node.layer] is not source:
                raise OSError(errno.ESTALE, "copy-up: the name's object changed branch", os.fsdecode(name))
            upper_pfd = self.upper_dir(parent)
            self.copyup.place(made.tmp, upper_pfd, name)
        except BaseException:
            self.copyup.discard(made.tmp)
            raise
        new = upper_pfd.lstat(name)
        node.lowerdata = data if meta else 0
        self._moved_up(node, parent, name, (new.st_dev, new.st_ino), made.st.st_nlink)

    def _moved_up(self, node: Node, parent: Node, name: bytes, key: tuple[int, int], lower_nlink: int
                  ) -> None:
        """Record that *node* now lives in the writable branch under *parent*/*name*.

        As overlayfs does, the copy keeps showing the lower inode number, unless the lower object
        had other names (their inode number would then be shown twice for different files).
        """
        node.layer = 0
        node.xattrs = None
        if lower_nlink > 1:
            node.ino = self.table.ino_of(*key)
        # Files opened before the copy-up follow it now, while the copy still has a name.
        for h in self.open_handles(node):
            self.refresh(h)
        self.touch(node, parent)
        self.table.rekey(node, key)
        # Other names of a lower hard link keep showing the lower object (overlayfs, index=off):
        # forget them here and make the kernel look them up again.
        others = [link for link in node.links if link != (parent, name)]
        for link in others:
            self.table.drop_link(node, *link)
            self.invalidator.invalidate_entry(link[0].id, link[1])
        self.invalidator.invalidate_attr(node.id)   # the copy has a link count (and blocks) of its own
        e = parent.listing.get(name) if parent.listing is not None else None
        if e is not None:
            e.layer = 0
            e.has_lower = True

    # ------------------------------------------------------------------ open files

    def new_handle(self, node: Node, fd: int, flags: int, layer: int | None = None) -> Handle:
        """A handle of *node* open as *fd* in branch *layer* (default: the node's)."""
        node.handles += 1
        self._next_fh += 1
        layer = node.layer if layer is None else layer
        h = self.handles[self._next_fh] = Handle(self._next_fh, node, fd, layer, flags)
        return h

    async def open(self, node: Node, flags: int) -> Handle:
        if node.is_dir:
            raise err(errno.EISDIR)
        trunc = flags & os.O_TRUNC   # libfuse asks for atomic O_TRUNC: it arrives here
        if flags & os.O_ACCMODE != os.O_RDONLY or trunc:
            await self.ensure_upper(node, keep=0 if trunc else None)
        layer = self.data_layer(node)
        if layer != node.layer:    # a metadata-only copy opened for reading: its data below
            fd = open_data(self, node, flags & ~OPEN_STRIP)
            if not node.prefetched:
                _prefetch(node, fd)
            return self.new_handle(node, fd, flags, layer)
        pfd, name = self.real_parent_fd(node)
        if trunc and flags & os.O_ACCMODE != os.O_RDONLY and pfd.lstat(name).st_blocks * 512 >= FREE_BIG:
            # Truncating a big file frees its blocks, which takes long: on a worker thread.
            fd = pfd.open_file(name, flags & ~OPEN_STRIP)
            try:
                await self.executor.on_fd(fd, os.ftruncate, 0, bulk=True)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = pfd.open_file(name, (flags & ~OPEN_STRIP) | trunc)
            if not node.prefetched and flags & os.O_ACCMODE == os.O_RDONLY:
                _prefetch(node, fd)
        if trunc:
            self.touch(node)
        return self.new_handle(node, fd, flags)

    def refresh(self, h: Handle) -> None:
        """A handle opened before its node was copied up reads the upper copy from then on (the
        copy's data: below, for a metadata-only copy, until it is copied up too)."""
        layer = self.data_layer(h.node) if h.node.links else h.layer
        if h.layer != layer:
            if layer == h.node.layer:
                pfd, name = self.real_parent_fd(h.node)
                fd = pfd.open_file(name, h.flags & ~OPEN_STRIP)
            else:
                fd = open_data(self, h.node, h.flags & ~OPEN_STRIP)
            os.close(h.fd)
            h.fd = fd
            h.layer = layer

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        """pread(2) of the open file *fh* that does not stall the caller's loop on the disk.

        Small reads are served inline, and so are large ones whose first and last bytes the page
        cache holds (asked with `os.RWF_NOWAIT`, which also starts reading them when it does not):
        a read that has to wait for the disk goes to the executor.  A page missing in the middle of
        a range cached at both ends is possible but rare (the kernel reads ahead in whole windows);
        it only costs a wait inline.
        """
        h = self.handles[fh]
        if h.layer != (h.node.lowerdata or h.node.layer):
            self.refresh(h)
        if h.layer == 0:
            h.node.st = None   # a read may move the atime of a file in the writable branch
        fd = h.fd
        if size < BIG_IO or (_cached(fd, offset) and _cached(fd, offset + size - 1)):
            return os.pread(fd, size, offset)
        return await self.executor.on_fd(fd, os.pread, size, offset)

    async def write(self, fh: int, offset: int, buf: bytes) -> int:
        """pwrite(2) to the open file *fh* (the upper copy: it was opened for writing); a big
        write on the executor."""
        h = self.handles[fh]
        if h.layer != (h.node.lowerdata or h.node.layer):
            self.refresh(h)
        h.node.st = None
        if len(buf) < BIG_IO:
            return os.pwrite(h.fd, buf, offset)
        written = await self.executor.on_fd(h.fd, os.pwrite, buf, offset)
        h.node.st = None   # a getattr answered meanwhile saw the old size
        return written

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.executor.on_fd(self.handles[fh].fd, os.fdatasync if datasync else os.fsync)

    async def fsyncdir(self, node: Node) -> None:
        """fsync(2) *node*'s directory in the writable branch, if it has one (nothing below changes)."""
        fd = self.table.dirfd_or_none(node, 0)
        if fd is not None:
            await self.executor.on_fd(fd, os.fsync)

    def fallocate_fd(self, h: Handle) -> int:
        """The fd to fallocate(2) the open file *h* on (the kernel sends fallocate only for an open
        for writing, which is in the writable branch already)."""
        self.refresh(h)
        if h.layer != 0:
            raise err(errno.EBADF)
        h.node.st = None
        return h.fd

    def lseek(self, h: Handle, offset: int, whence: int) -> int:
        """SEEK_DATA or SEEK_HOLE on an open file, answered by its real file (the copy, once
        copied up): the real fd's position is never used, reads and writes say their offset."""
        self.refresh(h)
        return os.lseek(h.fd, offset, whence)

    def release(self, h: Handle) -> None:
        del self.handles[h.fh]
        os.close(h.fd)
        h.node.handles -= 1
        self.table.maybe_free(h.node)


def _prefetch(node: Node, fd: int) -> None:
    """Start reading the head of *node*'s file, just opened as *fd* for reading, the first time it
    is opened: the kernel has none of its pages yet, and its READ follows the OPEN reply.  Begun
    now, the disk reads while the reply goes out and the READ comes in (a cold `tar c` waited for
    the disk about a quarter as long), where pread(2) alone would start it only then.  Bounded
    by the kernel's readahead window and by PREFETCH; the daemon does not wait for it."""
    node.prefetched = True
    try:
        os.posix_fadvise(fd, 0, PREFETCH, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass    # not a regular file's fd: nothing to read ahead


def _cached(fd: int, offset: int) -> bool:
    """Whether reading the byte at *offset* of *fd* needs no disk (past the end of the file: yes)."""
    try:
        os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return False    # no RWF_NOWAIT here: any large read may wait
        raise
    return True
