"""The union's logic, callable without a mount: resolve, read, and change the merged tree.

Every method raises OSError with the errno a program should see; `operations.py` turns that into
`FUSEError`.  No invariant is held across an await: the only awaits are copy-ups, which hold the
node's lock and re-check what they depend on afterwards.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from unionfs.server.offload import FREE_BIG, Offload

from .attrs import Stat
from .branches import (
    ACL_ACCESS,
    ACL_DEFAULT,
    LayerStack,
    clear_dir,
    fd_path,
    lstat_at,
    open_dir_at,
    open_file_at,
)
from .caller import in_group_or_capable
from .copyup import CopyUp
from .listings import DEFAULT_MAX_ENTRIES
from .merge import Entry, build_listing, open_dir_layers
from .nodes import Key, Node, NodeTable
from .sysx import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2
from .whiteout import (
    WH_PREFIX,
    Dialect,
    WhiteoutWriter,
    dir_is_opaque,
    escape_xattr,
    is_reserved_name,
    missing_xattr_errno,
    unescape_xattr,
    whiteouts_at,
)

log = logging.getLogger(__name__)

# Flags the kernel has already acted on, or that would change what a pread/pwrite at an offset means
# (O_APPEND) or require aligned buffers pyfuse3 does not give (O_DIRECT: the kernel still bypasses
# its page cache for such an open).
OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND | os.O_DIRECT
#: Distinct sets of xattr names kept shared between nodes (see Union._xattr_names).
XATTR_SETS_SHARED = 1024


def _err(code: int, what: str = "", name: bytes = b"") -> OSError:
    return OSError(code, what or os.strerror(code), os.fsdecode(name))


@dataclass
class Creds:
    """Who asked: new objects are owned by the caller, as on overlayfs, and get the caller's umask
    unless their parent's default ACL replaces it."""

    uid: int
    gid: int
    umask: int = 0
    pid: int = 0


class Handle:
    """An open file: the real fd and the branch it was opened in (it follows the node up)."""

    __slots__ = ("fh", "node", "fd", "layer", "flags")

    def __init__(self, fh: int, node: Node, fd: int, layer: int, flags: int) -> None:
        self.fh = fh
        self.node = node
        self.fd = fd
        self.layer = layer
        self.flags = flags


class Union:
    """A union of branches: the node table, the merged listings and every change."""

    def __init__(self, stack: LayerStack, dialect: Dialect, readonly: bool = False,
                 max_listed: int = DEFAULT_MAX_ENTRIES) -> None:
        self.stack = stack
        self.table = NodeTable(stack, max_listed)
        self.readonly = readonly or stack.upper is None
        self.work_fd = stack.work_fd
        self.writer = WhiteoutWriter(dialect, stack.work_fd, os.geteuid() == 0)
        self.copyup = CopyUp(self)
        self.offload = Offload()   # long syscalls: on worker threads
        self.privileged = os.geteuid() == 0
        self.handles: dict[int, Handle] = {}
        # Tells the kernel to drop a cached name (parent id, name); set by the FUSE layer.
        self.invalidate_entry: Callable[[int, bytes], None] = lambda parent, name: None
        self.invalidate_attr: Callable[[int], None] = lambda node_id: None
        self._next_fh = 0
        self._xattr_sets: dict[frozenset[bytes], frozenset[bytes]] = {}

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
            raise _err(errno.ENOTDIR)
        listing = d.listing
        if listing is None:
            listing = d.listing = build_listing(self.table.branch_fds(d))
            self.table.listings.use(d, grown=True)
        else:
            self.table.listings.use(d)
        return listing

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, Stat] | None:
        """The node for *name* in *parent* and its real stat, or None when the name is not visible."""
        if name == b".":
            return parent, self.stat(parent)
        if name == b"..":
            up = parent.links[-1][0] if parent.links else self.table.root
            return up, self.stat(up)
        if len(name) > 255:
            raise _err(errno.ENAMETOOLONG, name=name)
        e = self.listing(parent).get(name)
        if e is None:
            return None
        return self.node_for(parent, name, e)

    def node_for(self, parent: Node, name: bytes, e: Entry, fresh: bool = False
                 ) -> tuple[Node, Stat]:
        """The node behind the visible name *name* (listing entry *e*) of *parent*, and its stat."""
        known = parent.children.get(name)
        if known is not None and known.st is not None and known.layer == e.layer:
            return known, known.st
        try:
            st = lstat_at(self.table.dirfd(parent, e.layer), name)
        except FileNotFoundError:
            return self._read_again(parent, name, fresh)
        if stat.S_ISDIR(st.st_mode) != e.is_dir:
            return self._read_again(parent, name, fresh)
        key: Key = (st.st_dev, st.st_ino) if e.is_dir or e.layer == 0 else (parent.id, name)
        node = self.table.find(key)
        if node is None or node.is_dir != e.is_dir:
            dirfds = open_dir_layers(lambda layer: self.table.dirfd_or_none(parent, layer), name,
                                     e.dir_layers) if e.is_dir else []
            if e.is_dir and not dirfds:
                return self._read_again(parent, name, fresh)
            node = self.table.new(e.is_dir, e.layer, key, st)
            if e.is_dir:
                self.table.set_dirs(node, dirfds)
        self.table.add_link(node, parent, name)
        return node, self.table.remember(node, st)

    def _read_again(self, parent: Node, name: bytes, fresh: bool) -> tuple[Node, Stat]:
        """*name* is not what *parent*'s listing says: a branch changed underneath the mount.
        Read the listing again, once, and resolve the name from that; ENOENT if it is gone."""
        if fresh:
            raise _err(errno.ENOENT, name=name)
        log.info("a branch changed underneath: reading the listing of %r again", os.fsdecode(name))
        parent.listing = None
        again = self.listing(parent).get(name)
        if again is None:
            raise _err(errno.ENOENT, name=name)
        return self.node_for(parent, name, again, fresh=True)

    @staticmethod
    def touch(*nodes: Node | None) -> None:
        """These nodes changed through the union: forget their cached stat."""
        for n in nodes:
            if n is not None:
                n.st = None

    def stat(self, node: Node) -> Stat:
        if node.st is not None:
            return node.st
        if node.is_dir:
            st = os.fstat(self.table.top_dirfd(node))
        elif node.links:
            pfd, name = self.table.real_parent_fd(node)
            st = lstat_at(pfd, name)
        else:
            h = self.any_handle(node)   # unlinked but open: not cached, nothing names it
            return Stat.of(os.fstat(h.fd))
        return self.table.remember(node, st)

    def open_handles(self, node: Node) -> list[Handle]:
        return [h for h in self.handles.values() if h.node is node] if node.handles else []

    def any_handle(self, node: Node) -> Handle:
        """An open file of *node*, the only way left to an object whose names are all gone."""
        for h in self.open_handles(node):
            return h
        raise _err(errno.ENOENT)

    def nlink(self, node: Node, st: Stat) -> int:
        """overlayfs reports 1 link for a merged directory (its real count is unknowable)."""
        if node.is_dir and len(node.dirs) > 1:
            return 1
        return st.st_nlink

    def readlink(self, node: Node) -> bytes:
        pfd, name = self.table.real_parent_fd(node)
        return os.readlink(name, dir_fd=pfd)

    # ------------------------------------------------------------------ xattrs and statfs

    def _xattr_target(self, node: Node, fn: Callable[[str | int], object]) -> object:
        if node.is_dir:
            return fn(self.table.top_dirfd(node))
        if not node.links:
            # Unlinked but open (fgetxattr and friends reach us with the node alone): an open file
            # in the branch the node lives in is the only way left to the object.
            for h in self.open_handles(node):
                if h.layer == node.layer:
                    return fn(h.fd)
            raise _err(errno.ENOENT)
        pfd, name = self.table.real_parent_fd(node)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            return fn(fd_path(fd))
        finally:
            os.close(fd)

    def _xattr_names(self, node: Node) -> frozenset[bytes]:
        if node.xattrs is None:
            names = self._xattr_target(node, os.listxattr)
            found = frozenset(os.fsencode(n) for n in names)  # type: ignore[attr-defined]
            # Most objects share a handful of name sets (none at all, or security.selinux): keep
            # one copy of each (a frozenset costs 216 bytes) while there are few distinct ones.
            shared = self._xattr_sets.get(found)
            if shared is None and len(self._xattr_sets) < XATTR_SETS_SHARED:
                self._xattr_sets[found] = shared = found
            node.xattrs = found if shared is None else shared
        return node.xattrs

    def getxattr(self, node: Node, name: bytes) -> bytes:
        real = escape_xattr(name)
        try:
            names = self._xattr_names(node)
        except OSError as e:
            # The kernel reads the ACL of every object it checks access to; on a branch without
            # xattrs there is none, and the mode decides, as on overlayfs.
            if e.errno == errno.ENOTSUP and name in (ACL_ACCESS, ACL_DEFAULT):
                raise _err(errno.ENODATA) from None
            raise
        if real not in names:
            raise _err(missing_xattr_errno(name))
        return self._xattr_target(node, lambda p: os.getxattr(p, real))  # type: ignore[return-value]

    def listxattr(self, node: Node) -> list[bytes]:
        shown = (unescape_xattr(n) for n in self._xattr_names(node))
        return [n for n in shown if n is not None]

    async def setxattr(self, node: Node, name: bytes, value: bytes, kill_sgid: bool = False) -> None:
        """Set xattr *name*; with *kill_sgid*, first clear the setgid bit (see `_kill_sgid`)."""
        self.check_writable()
        real = escape_xattr(name)
        await self.ensure_upper(node)
        if kill_sgid:
            await self._kill_sgid(node)
        node.xattrs = None
        self.touch(node)
        self._xattr_target(node, lambda p: os.setxattr(p, real, value))

    async def removexattr(self, node: Node, name: bytes, kill_sgid: bool = False) -> None:
        self.check_writable()
        real = escape_xattr(name)
        self.getxattr(node, name)  # ENODATA before a needless copy-up
        await self.ensure_upper(node)
        if kill_sgid:
            await self._kill_sgid(node)
        node.xattrs = None
        self.touch(node)
        self._xattr_target(node, lambda p: os.removexattr(p, real))

    async def _kill_sgid(self, node: Node) -> None:
        """Clear *node*'s setgid bit: overlayfs does so before a change of the access ACL by a
        caller who is neither in the file's group nor holds CAP_FSETID (the FUSE request does not
        say so; the caller of setxattr decides)."""
        mode = self.stat(node).st_mode
        if mode & stat.S_ISGID:
            await self.setattr(node, mode=stat.S_IMODE(mode) & ~stat.S_ISGID)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.stack.layers[0].fd)

    # ------------------------------------------------------------------ copy-up

    def check_writable(self) -> None:
        if self.readonly:
            raise _err(errno.EROFS)

    def upper_dir(self, d: Node) -> int:
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
        fd = self.copyup.dir(d, self.table.dirfd(parent, 0), name)
        self.table.add_upper_dir(d, fd)
        d.xattrs = None
        self.touch(d, parent)
        st = os.fstat(fd)
        self.table.rekey(d, (st.st_dev, st.st_ino))
        self.invalidate_attr(d.id)
        e = parent.listing.get(name) if parent.listing is not None else None
        if e is not None:
            e.layer = 0
            e.dir_layers = (0, *e.dir_layers)

    async def ensure_upper(self, node: Node, keep: int | None = None) -> None:
        """Make sure *node* lives in the writable branch (copy-up); *keep* bounds the data copied."""
        self.check_writable()
        if node.is_dir:
            self.upper_dir(node)
            return
        if node.layer == 0:
            return
        if node.lock is None:
            node.lock = trio.Lock()
        async with node.lock:
            if node.layer != 0:
                await self.copyup.file(node, keep)

    def moved_up(self, node: Node, parent: Node, name: bytes, key: tuple[int, int], lower_nlink: int) -> None:
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
            self.invalidate_entry(link[0].id, link[1])
        self.invalidate_attr(node.id)   # the copy has a link count (and blocks) of its own
        e = parent.listing.get(name) if parent.listing is not None else None
        if e is not None:
            e.layer = 0
            e.has_lower = True

    # ------------------------------------------------------------------ creating names

    def _check_new_name(self, parent: Node, name: bytes) -> None:
        self.check_writable()
        if len(name) > 255:
            raise _err(errno.ENAMETOOLONG, name=name)
        if is_reserved_name(name):
            raise _err(errno.EPERM, "names beginning with .wh. are reserved for whiteouts", name)
        if name in self.listing(parent):
            raise _err(errno.EEXIST, name=name)

    def _owner(self, parent_fd: int, creds: Creds) -> tuple[int, int]:
        pst = os.fstat(parent_fd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else creds.gid
        return creds.uid, gid

    def _chown_new(self, dirfd: int, name: bytes, owner: tuple[int, int], mode: int = 0) -> None:
        """Give the new object *name* its caller's owner.

        chown(2) clears the set-id bits of a non-directory; overlayfs, which creates with the
        caller's credentials, keeps those the caller asked for: they are set again from *mode*.
        """
        if owner == (os.geteuid(), os.getegid()):
            return
        try:
            os.chown(name, owner[0], owner[1], dir_fd=dirfd, follow_symlinks=False)
        except PermissionError:
            if self.privileged:
                raise
            return
        setid = mode & (stat.S_ISUID | stat.S_ISGID)
        if setid:
            # chmod has no no-follow form: go through an O_PATH fd of the object itself.  Only the
            # set-id bits are added: the permission bits stay as made (a default ACL's mask among them).
            pf = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            try:
                st = os.fstat(pf)
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(fd_path(pf), stat.S_IMODE(st.st_mode) | setid)
            finally:
                os.close(pf)

    def _new_mode(self, parent: Node, mode: int, creds: Creds) -> tuple[int, bool]:
        """The mode to make a new object in *parent* with, and whether it inherits a default ACL.

        As on a local filesystem: the default ACL of the parent's upper directory replaces the
        caller's umask (the upper filesystem combines it with the mode when the object is made);
        without one, the umask applies.  The kernel sends modes unmasked when the shim asked it to
        (FUSE_CAP_DONT_MASK); otherwise it has masked them already, and masking again changes nothing.
        """
        try:
            inherit = ACL_DEFAULT in self._xattr_names(parent)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            inherit = False     # an upper filesystem without xattrs has no ACLs
        return (mode, True) if inherit else (mode & ~creds.umask, False)

    @contextlib.contextmanager
    def _assembly_dir(self, pfd: int, inherit: bool) -> Iterator[int]:
        """Where an object that is to replace a whiteout in the upper directory *pfd* is made: the
        work dir, or, when it must inherit *pfd*'s default ACL, a new directory inside the work dir
        carrying that ACL, so that the upper filesystem applies it just as it would in *pfd*."""
        work = self.work_fd
        assert work is not None
        if not inherit:
            yield work
            return
        sub = self.writer.temp_name()
        os.mkdir(sub, 0o700, dir_fd=work)
        try:
            fd = open_dir_at(work, sub)
            try:
                os.setxattr(fd, ACL_DEFAULT, os.getxattr(pfd, ACL_DEFAULT))
                yield fd
            finally:
                clear_dir(fd)   # empty unless making the object failed
                os.close(fd)
        finally:
            os.rmdir(sub, dir_fd=work)

    def _place_new(self, parent: Node, name: bytes, is_dir: bool,
                   make: Callable[[int, bytes, bool], None], inherit: bool = False) -> tuple[int, bool]:
        """Create a new object *name* in the upper directory of *parent* with *make*(dirfd, name, opaque).

        A whiteout left there for the name is replaced atomically (overlay dialect: the object is
        built in the work dir and renamed over it) or removed after (AUFS dialect).  *inherit*: the
        object takes the upper directory's default ACL (see `_new_mode`).  Returns the upper
        directory fd and whether the name still exists in a lower branch (there was a whiteout).
        """
        pfd = self.upper_dir(parent)
        chr_wh, aufs_wh = whiteouts_at(pfd, name)
        had = chr_wh or aufs_wh
        if chr_wh:
            with self._assembly_dir(pfd, inherit) as adir:
                tmp = self.writer.temp_name()
                make(adir, tmp, had)
                try:
                    if is_dir:
                        renameat2(adir, tmp, pfd, name, RENAME_EXCHANGE)
                        os.unlink(tmp, dir_fd=adir)
                    else:
                        os.rename(tmp, name, src_dir_fd=adir, dst_dir_fd=pfd)
                except BaseException:
                    if adir == self.work_fd:
                        self.copyup.discard(tmp)
                    raise
        else:
            make(pfd, name, had)
        if aufs_wh:
            os.unlink(WH_PREFIX + name, dir_fd=pfd)
        return pfd, had

    def _new_node(self, parent: Node, name: bytes, pfd: int, is_dir: bool, had_lower: bool
                  ) -> tuple[Node, Stat]:
        self.listing(parent)[name] = Entry(0, is_dir, had_lower)
        self.touch(parent)
        st = lstat_at(pfd, name)
        node = self.table.find((st.st_dev, st.st_ino))
        if node is None or node.is_dir != is_dir:
            node = self.table.new(is_dir, 0, (st.st_dev, st.st_ino), st)
            if is_dir:
                self.table.set_dirs(node, [(0, open_dir_at(pfd, name))])
                node.listing = {}
        self.table.add_link(node, parent, name)
        return node, self.table.remember(node, st)

    def create(self, parent: Node, name: bytes, mode: int, flags: int, creds: Creds
               ) -> tuple[Handle, Node, Stat]:
        self._check_new_name(parent, name)
        fds: list[int] = []
        owner = self._owner(self.upper_dir(parent), creds)
        mode, inherit = self._new_mode(parent, mode, creds)
        mode = _strip_sgid(mode, owner, creds)

        def make(dirfd: int, n: bytes, _opaque: bool) -> None:
            fd = open_file_at(dirfd, n, (flags & ~OPEN_STRIP) | os.O_CREAT | os.O_EXCL, mode & 0o7777)
            fds.append(fd)
            self._chown_new(dirfd, n, owner, mode)

        pfd, had = self._place_new(parent, name, False, make, inherit)
        node, st = self._new_node(parent, name, pfd, False, had)
        return self._handle(node, fds[0], flags), node, st

    def mkdir(self, parent: Node, name: bytes, mode: int, creds: Creds) -> tuple[Node, Stat]:
        self._check_new_name(parent, name)
        upper = self.upper_dir(parent)
        owner = self._owner(upper, creds)
        mode, inherit = self._new_mode(parent, mode, creds)
        # A directory made in a setgid directory is setgid too; one assembled in the work dir
        # (over a whiteout) must be given the bit by hand.
        setgid = os.fstat(upper).st_mode & stat.S_ISGID

        def make(dirfd: int, n: bytes, opaque: bool) -> None:
            os.mkdir(n, mode & 0o7777, dir_fd=dirfd)
            self._chown_new(dirfd, n, owner)
            if setgid and dirfd != upper:
                made = stat.S_IMODE(lstat_at(dirfd, n).st_mode)   # what a default ACL left of mode
                os.chmod(n, made | stat.S_ISGID, dir_fd=dirfd)
            if opaque:
                fd = open_dir_at(dirfd, n)
                try:
                    self.writer.make_opaque(fd)
                finally:
                    os.close(fd)

        pfd, had = self._place_new(parent, name, True, make, inherit)
        return self._new_node(parent, name, pfd, True, had)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, creds: Creds
              ) -> tuple[Node, Stat]:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM, "a 0/0 character device is a whiteout", name)
        self._check_new_name(parent, name)
        owner = self._owner(self.upper_dir(parent), creds)
        mode, inherit = self._new_mode(parent, mode, creds)
        mode = _strip_sgid(mode, owner, creds)

        def make(dirfd: int, n: bytes, _opaque: bool) -> None:
            os.mknod(n, mode, rdev, dir_fd=dirfd)
            self._chown_new(dirfd, n, owner, mode)

        pfd, had = self._place_new(parent, name, False, make, inherit)
        return self._new_node(parent, name, pfd, False, had)

    def symlink(self, parent: Node, name: bytes, target: bytes, creds: Creds) -> tuple[Node, Stat]:
        self._check_new_name(parent, name)
        owner = self._owner(self.upper_dir(parent), creds)

        def make(dirfd: int, n: bytes, _opaque: bool) -> None:
            os.symlink(target, n, dir_fd=dirfd)
            self._chown_new(dirfd, n, owner)

        pfd, had = self._place_new(parent, name, False, make)
        return self._new_node(parent, name, pfd, False, had)

    async def link(self, node: Node, parent: Node, name: bytes) -> tuple[Node, Stat]:
        if node.is_dir:
            raise _err(errno.EPERM)
        self._check_new_name(parent, name)
        await self.ensure_upper(node)
        self._check_new_name(parent, name)   # the copy-up may have awaited
        spfd, sname = self.table.real_parent_fd(node)

        def make(dirfd: int, n: bytes, _opaque: bool) -> None:
            os.link(sname, n, src_dir_fd=spfd, dst_dir_fd=dirfd, follow_symlinks=False)

        pfd, had = self._place_new(parent, name, False, make)
        return self._new_node(parent, name, pfd, False, had)

    # ------------------------------------------------------------------ removing names

    def _whiteout(self, dirfd: int, name: bytes, replace: bool) -> None:
        self.writer.write(dirfd, name, replace)

    def _to_remove(self, parent: Node, name: bytes, is_dir: bool) -> tuple[dict[bytes, Entry], Entry, Node]:
        """The listing, entry and node of *name*, which must exist and be (or not be) a directory."""
        self.check_writable()
        e = self.listing(parent).get(name)
        if e is None:
            raise _err(errno.ENOENT, name=name)
        if e.is_dir != is_dir:
            raise _err(errno.EISDIR if e.is_dir else errno.ENOTDIR, name=name)
        node, _ = self.node_for(parent, name, e)
        listing = self.listing(parent)      # read again if a branch changed underneath
        return listing, listing[name], node

    def pin_big_file(self, parent: Node, name: bytes) -> int | None:
        """An O_PATH fd of the upper file *name* of *parent* when it is a big file (FREE_BIG bytes
        allocated) with one link, None otherwise.  Held across an unlink or a rename over *name*,
        it keeps the file's blocks until it is closed, which the caller does off the loop."""
        pfd = self.table.dirfd_or_none(parent, 0)
        e = self.listing(parent).get(name)
        if pfd is None or e is None or e.is_dir or e.layer != 0:
            return None
        known = parent.children.get(name)
        try:
            st = known.st if known is not None and known.st is not None else lstat_at(pfd, name)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_blocks * 512 < FREE_BIG:
                return None
            return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        except OSError:
            return None     # the unlink or rename says what is wrong

    def unlink(self, parent: Node, name: bytes) -> None:
        listing, e, node = self._to_remove(parent, name, is_dir=False)
        if e.layer == 0:
            pfd = self.table.dirfd(parent, 0)
            if e.has_lower:
                self._whiteout(pfd, name, replace=True)
            else:
                os.unlink(name, dir_fd=pfd)
        else:
            self._whiteout(self.upper_dir(parent), name, replace=False)
        del listing[name]
        self.touch(node, parent)
        self.table.drop_link(node, parent, name)

    def rmdir(self, parent: Node, name: bytes) -> None:
        listing, e, node = self._to_remove(parent, name, is_dir=True)
        if self.listing(node):
            raise _err(errno.ENOTEMPTY, name=name)
        if e.layer == 0:
            clear_dir(self.table.dirfd(node, 0))   # only whiteouts and markers are left in it
            pfd = self.table.dirfd(parent, 0)
            if e.has_lower:
                self.writer.write(pfd, name, replace=True)
            else:
                os.rmdir(name, dir_fd=pfd)
        else:
            self.writer.write(self.upper_dir(parent), name, replace=False)
        del listing[name]
        self.table.listings.drop(node)
        node.listing = {}       # kept for good: its branch directories may still hold entries
        self.touch(node, parent)
        self.table.drop_link(node, parent, name)

    # ------------------------------------------------------------------ rename

    def _is_merged_or_lower(self, node: Node) -> bool:
        return node.layer != 0 or len(node.dirs) > 1

    async def rename(self, op: Node, on: bytes, np: Node, nn: bytes, flags: int) -> None:
        self.check_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL, "overlayfs takes no other rename flag (RENAME_WHITEOUT)", on)
        if is_reserved_name(nn):
            raise _err(errno.EPERM, name=nn)
        es = self.listing(op).get(on)
        if es is None:
            raise _err(errno.ENOENT, name=on)
        ed = self.listing(np).get(nn)
        exchange = bool(flags & RENAME_EXCHANGE)
        if flags & RENAME_NOREPLACE and ed is not None:
            raise _err(errno.EEXIST, name=nn)
        if exchange and ed is None:
            raise _err(errno.ENOENT, name=nn)
        src, _ = self.node_for(op, on, es)
        if es.is_dir and self._is_merged_or_lower(src):
            raise _err(errno.EXDEV, "directory has content in a lower branch", on)
        dst: Node | None = None
        if ed is not None:
            dst, _ = self.node_for(np, nn, ed)
            if dst is src and not exchange:
                return
            if exchange:
                if ed.is_dir and self._is_merged_or_lower(dst):
                    raise _err(errno.EXDEV, "directory has content in a lower branch", nn)
            elif ed.is_dir and not es.is_dir:
                raise _err(errno.EISDIR, name=nn)
            elif es.is_dir and not ed.is_dir:
                raise _err(errno.ENOTDIR, name=nn)
            elif ed.is_dir and self.listing(dst):
                raise _err(errno.ENOTEMPTY, name=nn)
        with self.table.listings.pinned(op, np):    # not dropped while awaiting: es, ed stay theirs
            if not es.is_dir:
                await self.ensure_upper(src)
            if exchange and dst is not None and not dst.is_dir:
                await self.ensure_upper(dst)
            # Re-read after the awaits: another request may have changed either name meanwhile.
            if self.listing(op).get(on) is not es or self.listing(np).get(nn) is not ed:
                raise _err(errno.EAGAIN, "rename raced with another change", on)
        if src.is_dir and src.branch_dir(0) is None:
            raise _err(errno.EXDEV, name=on)
        spfd = self.upper_dir(op)
        dpfd = self.upper_dir(np)
        for moving in (src, dst):
            if moving is not None and moving.is_dir:
                self.table.dirfd_or_none(moving, 0)   # opened (under its old name) for after the move
        self.touch(op, np, src, dst)
        if exchange:
            assert ed is not None and dst is not None
            renameat2(spfd, on, dpfd, nn, RENAME_EXCHANGE)
            self._after_exchange(op, on, es, src, np, nn, ed, dst)
            return
        dst_lower = False
        if ed is not None:
            dst_lower = ed.has_lower or ed.layer != 0
            if ed.is_dir and ed.layer == 0:
                assert dst is not None
                clear_dir(self.table.dirfd(dst, 0))
        else:
            dst_lower = self._clear_whiteout_for(dpfd, nn, es.is_dir)
        self._rename_leaving_whiteout(spfd, on, dpfd, nn, whiteout=es.has_lower or es.layer != 0)
        if es.is_dir:
            self._opaque_after_move(src, np, dst_lower)
        del self.listing(op)[on]
        new = Entry(0, es.is_dir, dst_lower)
        self.listing(np)[nn] = new
        if dst is not None:
            self.table.drop_link(dst, np, nn)
            if dst.is_dir:
                self.table.listings.drop(dst)
                dst.listing = {}
        self.table.drop_link(src, op, on)
        self.table.add_link(src, np, nn)

    def _opaque_after_move(self, moved: Node, new_parent: Node, name_below: bool) -> None:
        """A directory moved into a merged directory (or onto a name that exists below) becomes
        opaque, as overlayfs does, so nothing below can merge into it later."""
        if not (name_below or len(new_parent.dirs) > 1):
            return
        fd = self.table.dirfd(moved, 0)
        if not dir_is_opaque(fd):
            self.writer.make_opaque(fd)
        if len(moved.dirs) > 1:
            self.table.close_dirs(moved, keep=1)
            moved.listing = None

    def _rename_leaving_whiteout(self, spfd: int, on: bytes, dpfd: int, nn: bytes, whiteout: bool) -> None:
        """Rename in the writable branch; with *whiteout*, leave one at the old name.

        In the overlay dialect the kernel does both at once (RENAME_WHITEOUT), so no crash can let
        the lower object show again; elsewhere the whiteout follows the rename.
        """
        atomic = self.writer.dialect is Dialect.OVERLAY
        if whiteout and atomic:
            try:
                renameat2(spfd, on, dpfd, nn, RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
        os.rename(on, nn, src_dir_fd=spfd, dst_dir_fd=dpfd)
        if whiteout:
            self._whiteout(spfd, on, replace=False)

    def _clear_whiteout_for(self, dirfd: int, name: bytes, is_dir: bool) -> bool:
        """Before renaming onto *name*, remove a whiteout a rename cannot replace; True if one was there."""
        chr_wh, aufs = whiteouts_at(dirfd, name)
        if chr_wh and is_dir:
            os.unlink(name, dir_fd=dirfd)
        if aufs:
            os.unlink(WH_PREFIX + name, dir_fd=dirfd)
        return chr_wh or aufs

    def _after_exchange(self, op: Node, on: bytes, es: Entry, src: Node,
                        np: Node, nn: bytes, ed: Entry, dst: Node) -> None:
        lo, ln = self.listing(op), self.listing(np)
        src_lower = es.has_lower or es.layer != 0
        dst_lower = ed.has_lower or ed.layer != 0
        lo[on] = Entry(0, ed.is_dir, src_lower)
        ln[nn] = Entry(0, es.is_dir, dst_lower)
        for node, parent, lower in ((src, np, dst_lower), (dst, op, src_lower)):
            if node.is_dir:
                self._opaque_after_move(node, parent, lower)
        self.table.drop_link(src, op, on)
        self.table.drop_link(dst, np, nn)
        self.table.add_link(src, np, nn)
        self.table.add_link(dst, op, on)

    # ------------------------------------------------------------------ attributes

    async def setattr(self, node: Node, *, size: int | None = None, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      handle: Handle | None = None) -> Stat:
        """chmod, chown, truncate and utimes, after a copy-up (truncate copies only what it keeps)."""
        self.check_writable()
        await self.ensure_upper(node, keep=size)
        owner = None
        if uid is not None or gid is not None:
            owner = (-1 if uid is None else uid, -1 if gid is None else gid)
        times = None if atime_ns is None and mtime_ns is None else (atime_ns, mtime_ns)
        if handle is not None:
            self.refresh(handle)
        if size is not None and not node.is_dir:
            await self._truncate(node, size, handle)
            size = None
        if node.is_dir or not node.links:
            # A directory, or a file whose last name is gone but is still open: work on the fd.
            if node.is_dir:
                fd = self.table.dirfd(node, 0)
            else:
                # fchown and fchmod reach us without the handle: any open one of the node will do.
                fd = (handle or self.any_handle(node)).fd
            if size is not None:
                os.ftruncate(fd, size)      # a directory: the kernel refuses it before asking us
            if owner is not None:
                os.chown(fd, *owner)
            if mode is not None:
                os.chmod(fd, stat.S_IMODE(mode))
            if times is not None:
                os.utime(fd, ns=_fill_times(times, os.fstat(fd)))
            self.touch(node)
            return Stat.of(os.fstat(fd))
        pfd, name = self.table.real_parent_fd(node)
        if owner is not None:
            os.chown(name, *owner, dir_fd=pfd, follow_symlinks=False)
        if mode is not None:
            # chmod has no no-follow form: go through an O_PATH fd of the object itself.
            pf = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                if not stat.S_ISLNK(os.fstat(pf).st_mode):
                    os.chmod(fd_path(pf), stat.S_IMODE(mode))
            finally:
                os.close(pf)
        if times is not None:
            st = lstat_at(pfd, name) if None in times else None
            os.utime(name, ns=_fill_times(times, st), dir_fd=pfd, follow_symlinks=False)
        cached = self.table.remember(node, lstat_at(pfd, name))
        return cached

    async def _truncate(self, node: Node, size: int, handle: Handle | None) -> None:
        """truncate(2) the file *node* to *size*: through *handle* when it may write (or when the
        file has no name left), else through a new write open; on a worker thread when that frees
        FREE_BIG bytes or more (ext4 frees 1.5 GiB in about 0.4 s)."""
        own = None
        if not node.links:
            fd = (handle or self.any_handle(node)).fd
        elif handle is not None and handle.flags & os.O_ACCMODE != os.O_RDONLY:
            fd = handle.fd
        else:
            pfd, name = self.table.real_parent_fd(node)
            fd = own = open_file_at(pfd, name, os.O_WRONLY)
        try:
            if os.fstat(fd).st_blocks * 512 - size >= FREE_BIG:
                await self.offload.on_fd(fd, os.ftruncate, size, bulk=True)
            else:
                os.ftruncate(fd, size)
        finally:
            if own is not None:
                os.close(own)
        self.touch(node)

    # ------------------------------------------------------------------ files

    def _handle(self, node: Node, fd: int, flags: int) -> Handle:
        node.handles += 1
        self._next_fh += 1
        h = self.handles[self._next_fh] = Handle(self._next_fh, node, fd, node.layer, flags)
        return h

    async def open(self, node: Node, flags: int) -> Handle:
        if node.is_dir:
            raise _err(errno.EISDIR)
        trunc = flags & os.O_TRUNC   # libfuse asks for atomic O_TRUNC: it arrives here
        if flags & os.O_ACCMODE != os.O_RDONLY or trunc:
            await self.ensure_upper(node, keep=0 if trunc else None)
        pfd, name = self.table.real_parent_fd(node)
        if trunc and flags & os.O_ACCMODE != os.O_RDONLY and lstat_at(pfd, name).st_blocks * 512 >= FREE_BIG:
            # Truncating a big file frees its blocks, which takes long: on a worker thread.
            fd = open_file_at(pfd, name, flags & ~OPEN_STRIP)
            try:
                await self.offload.on_fd(fd, os.ftruncate, 0, bulk=True)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = open_file_at(pfd, name, (flags & ~OPEN_STRIP) | trunc)
        if trunc:
            self.touch(node)
        return self._handle(node, fd, flags)

    def refresh(self, h: Handle) -> None:
        """A handle opened before its node was copied up reads the upper copy from then on."""
        if h.layer != h.node.layer and h.node.links:
            pfd, name = self.table.real_parent_fd(h.node)
            fd = open_file_at(pfd, name, h.flags & ~OPEN_STRIP)
            os.close(h.fd)
            h.fd = fd
            h.layer = h.node.layer

    def fallocate_fd(self, h: Handle) -> int:
        """The fd to fallocate(2) the open file *h* on (the kernel sends fallocate only for an open
        for writing, which is in the writable branch already)."""
        self.refresh(h)
        if h.layer != 0:
            raise _err(errno.EBADF)
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


def _fill_times(times: tuple[int | None, int | None], st: os.stat_result | None) -> tuple[int, int]:
    """(atime, mtime) in ns, taking the one not being set from *st*."""
    atime, mtime = times
    if atime is None or mtime is None:
        assert st is not None
        atime = st.st_atime_ns if atime is None else atime
        mtime = st.st_mtime_ns if mtime is None else mtime
    return atime, mtime


def _strip_sgid(mode: int, owner: tuple[int, int], creds: Creds) -> int:
    """*mode* for a new non-directory owned by *owner*: without S_ISGID (when group-executable)
    unless the caller is in the new file's group or holds CAP_FSETID, as the kernel's
    inode_init_owner decides (kernels since 6.0 strip it before the request reaches us; older ones
    leave it to the filesystem)."""
    if mode & stat.S_ISGID and mode & stat.S_IXGRP and owner[1] != creds.gid and not in_group_or_capable(
            creds.pid, creds.gid, owner[1]):
        return mode & ~stat.S_ISGID
    return mode

