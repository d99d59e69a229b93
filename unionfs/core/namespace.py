"""Changes to the union's namespace: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.

New objects are made in the writable branch with their caller's owner and, as on a local
filesystem, their parent's default ACL in place of the umask.  A name that a lower branch still has
gets a whiteout when it is removed; a new object over such a whiteout replaces it atomically (built
in the work directory, then renamed over it) in the overlay dialect.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .attrs import Stat
from .branches import ACL_DEFAULT, DirFd
from .caller import in_group_or_capable
from .interfaces import FREE_BIG
from .merge import Entry
from .nodes import Node
from .resolve import OPEN_STRIP, Handle, Resolver, err
from .sysx import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from .whiteout import WH_PREFIX, Dialect, dir_is_opaque, is_reserved_name, whiteouts_at


@dataclass
class Creds:
    """Who asked: new objects are owned by the caller, as on overlayfs, and get the caller's umask
    unless their parent's default ACL replaces it."""

    uid: int
    gid: int
    umask: int = 0
    pid: int = 0


class Namespace:
    """The calls of a union that add, remove and move names, on the state of its *res*."""

    def __init__(self, res: Resolver) -> None:
        self.res = res

    # ------------------------------------------------------------------ creating names

    def _check_new_name(self, parent: Node, name: bytes) -> None:
        self.res.check_writable()
        if len(name) > 255:
            raise err(errno.ENAMETOOLONG, name=name)
        if is_reserved_name(name):
            raise err(errno.EPERM, "names beginning with .wh. are reserved for whiteouts", name)
        if name in self.res.listing(parent):
            raise err(errno.EEXIST, name=name)

    def _owner(self, parent_fd: DirFd, creds: Creds) -> tuple[int, int]:
        pst = os.fstat(parent_fd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else creds.gid
        return creds.uid, gid

    def _chown_new(self, dirfd: DirFd, name: bytes, owner: tuple[int, int], mode: int = 0) -> None:
        """Give the new object *name* its caller's owner.

        chown(2) clears the set-id bits of a non-directory; overlayfs, which creates with the
        caller's credentials, keeps those the caller asked for: they are set again from *mode*.
        """
        if owner == (os.geteuid(), os.getegid()):
            return
        try:
            dirfd.chown(name, owner[0], owner[1])
        except PermissionError:
            if self.res.privileged:
                raise
            return
        setid = mode & (stat.S_ISUID | stat.S_ISGID)
        if setid:
            # Only the set-id bits are added: the permission bits stay as made (a default ACL's
            # mask among them).
            dirfd.chmod(name, setid, add=True)

    def _new_mode(self, parent: Node, mode: int, creds: Creds) -> tuple[int, bool]:
        """The mode to make a new object in *parent* with, and whether it inherits a default ACL.

        As on a local filesystem: the default ACL of the parent's upper directory replaces the
        caller's umask (the upper filesystem combines it with the mode when the object is made);
        without one, the umask applies.  The kernel sends modes unmasked when the shim asked it to
        (FUSE_CAP_DONT_MASK); otherwise it has masked them already, and masking again changes nothing.
        """
        try:
            inherit = ACL_DEFAULT in self.res.xattr_names(parent)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            inherit = False     # an upper filesystem without xattrs has no ACLs
        return (mode, True) if inherit else (mode & ~creds.umask, False)

    @contextlib.contextmanager
    def _assembly_dir(self, pfd: DirFd, inherit: bool) -> Iterator[DirFd]:
        """Where an object that is to replace a whiteout in the upper directory *pfd* is made: the
        work dir, or, when it must inherit *pfd*'s default ACL, a new directory inside the work dir
        carrying that ACL, so that the upper filesystem applies it just as it would in *pfd*."""
        work = self.res.work_fd
        assert work is not None
        if not inherit:
            yield work
            return
        sub = self.res.writer.temp_name()
        work.mkdir(sub, 0o700)
        try:
            fd = work.open_dir(sub)
            try:
                os.setxattr(fd, ACL_DEFAULT, os.getxattr(pfd, ACL_DEFAULT))
                yield fd
            finally:
                fd.clear()   # empty unless making the object failed
                os.close(fd)
        finally:
            work.rmdir(sub)

    def _place_new(self, parent: Node, name: bytes, is_dir: bool,
                   make: Callable[[DirFd, bytes, bool], None], inherit: bool = False) -> tuple[DirFd, bool]:
        """Create a new object *name* in the upper directory of *parent* with *make*(dirfd, name, opaque).

        A whiteout left there for the name is replaced atomically (overlay dialect: the object is
        built in the work dir and renamed over it) or removed after (AUFS dialect).  *inherit*: the
        object takes the upper directory's default ACL (see `_new_mode`).  Returns the upper
        directory fd and whether the name still exists in a lower branch (there was a whiteout).
        """
        pfd = self.res.upper_dir(parent)
        chr_wh, aufs_wh = whiteouts_at(pfd, name)
        had = chr_wh or aufs_wh
        if chr_wh:
            with self._assembly_dir(pfd, inherit) as adir:
                tmp = self.res.writer.temp_name()
                make(adir, tmp, had)
                try:
                    if is_dir:
                        adir.rename(tmp, pfd, name, RENAME_EXCHANGE)
                        adir.unlink(tmp)
                    else:
                        adir.rename(tmp, pfd, name)
                except BaseException:
                    if adir == self.res.work_fd:
                        self.res.copyup.discard(tmp)
                    raise
        else:
            make(pfd, name, had)
        if aufs_wh:
            pfd.unlink(WH_PREFIX + name)
        return pfd, had

    def _new_node(self, parent: Node, name: bytes, pfd: DirFd, is_dir: bool, had_lower: bool
                  ) -> tuple[Node, Stat]:
        self.res.listing(parent)[name] = Entry(0, is_dir, had_lower)
        self.res.touch(parent)
        st = pfd.lstat(name)
        node = self.res.table.find((st.st_dev, st.st_ino))
        if node is None or node.is_dir != is_dir:
            node = self.res.table.new(is_dir, 0, (st.st_dev, st.st_ino), st)
            if is_dir:
                self.res.table.set_dirs(node, [(0, pfd.open_dir(name))])
                node.listing = {}
        self.res.table.add_link(node, parent, name)
        return node, self.res.table.remember(node, st)

    def create(self, parent: Node, name: bytes, mode: int, flags: int, creds: Creds
               ) -> tuple[Handle, Node, Stat]:
        self._check_new_name(parent, name)
        fds: list[int] = []
        owner = self._owner(self.res.upper_dir(parent), creds)
        mode, inherit = self._new_mode(parent, mode, creds)
        mode = _strip_sgid(mode, owner, creds)

        def make(dirfd: DirFd, n: bytes, _opaque: bool) -> None:
            fd = dirfd.open_file(n, (flags & ~OPEN_STRIP) | os.O_CREAT | os.O_EXCL, mode & 0o7777)
            fds.append(fd)
            self._chown_new(dirfd, n, owner, mode)

        pfd, had = self._place_new(parent, name, False, make, inherit)
        node, st = self._new_node(parent, name, pfd, False, had)
        return self.res.new_handle(node, fds[0], flags), node, st

    def mkdir(self, parent: Node, name: bytes, mode: int, creds: Creds) -> tuple[Node, Stat]:
        self._check_new_name(parent, name)
        upper = self.res.upper_dir(parent)
        owner = self._owner(upper, creds)
        mode, inherit = self._new_mode(parent, mode, creds)
        # A directory made in a setgid directory is setgid too; one assembled in the work dir
        # (over a whiteout) must be given the bit by hand.
        setgid = os.fstat(upper).st_mode & stat.S_ISGID
        # overlayfs with redirect_dir=on or metacopy (which allows no offline change of the lower
        # branches) makes every new directory in a merged one opaque (nothing below can show through
        # it once renamed elsewhere, or change underneath), whether or not the name is found below.
        in_merged = (self.res.redirects.create or self.res.metacopy) and len(parent.dirs) > 1

        def make(dirfd: DirFd, n: bytes, opaque: bool) -> None:
            dirfd.mkdir(n, mode & 0o7777)
            self._chown_new(dirfd, n, owner)
            if setgid and dirfd != upper:
                dirfd.chmod(n, stat.S_ISGID, add=True)     # to what a default ACL left of mode
            if opaque or in_merged:
                fd = dirfd.open_dir(n)
                try:
                    self.res.writer.make_opaque(fd)
                finally:
                    os.close(fd)

        pfd, had = self._place_new(parent, name, True, make, inherit)
        return self._new_node(parent, name, pfd, True, had)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, creds: Creds
              ) -> tuple[Node, Stat]:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise err(errno.EPERM, "a 0/0 character device is a whiteout", name)
        self._check_new_name(parent, name)
        owner = self._owner(self.res.upper_dir(parent), creds)
        mode, inherit = self._new_mode(parent, mode, creds)
        mode = _strip_sgid(mode, owner, creds)

        def make(dirfd: DirFd, n: bytes, _opaque: bool) -> None:
            dirfd.mknod(n, mode, rdev)
            self._chown_new(dirfd, n, owner, mode)

        pfd, had = self._place_new(parent, name, False, make, inherit)
        return self._new_node(parent, name, pfd, False, had)

    def symlink(self, parent: Node, name: bytes, target: bytes, creds: Creds) -> tuple[Node, Stat]:
        self._check_new_name(parent, name)
        owner = self._owner(self.res.upper_dir(parent), creds)

        def make(dirfd: DirFd, n: bytes, _opaque: bool) -> None:
            dirfd.symlink(target, n)
            self._chown_new(dirfd, n, owner)

        pfd, had = self._place_new(parent, name, False, make)
        return self._new_node(parent, name, pfd, False, had)

    async def link(self, node: Node, parent: Node, name: bytes) -> tuple[Node, Stat]:
        if node.is_dir:
            raise err(errno.EPERM)
        self._check_new_name(parent, name)
        await self.res.ensure_upper(node, meta=True)
        self._check_new_name(parent, name)   # the copy-up may have awaited
        old_parent, old_name = node.name_in()
        self.res.set_move_redirect(node, old_parent, old_name, samedir=False, absolute=True)
        spfd, sname = self.res.real_parent_fd(node)

        def make(dirfd: DirFd, n: bytes, _opaque: bool) -> None:
            spfd.link(sname, dirfd, n)

        pfd, had = self._place_new(parent, name, False, make)
        return self._new_node(parent, name, pfd, False, had)

    # ------------------------------------------------------------------ removing names

    def _whiteout(self, dirfd: DirFd, name: bytes, replace: bool) -> None:
        self.res.writer.write(dirfd, name, replace)

    def _to_remove(self, parent: Node, name: bytes, is_dir: bool) -> tuple[dict[bytes, Entry], Entry, Node]:
        """The listing, entry and node of *name*, which must exist and be (or not be) a directory."""
        self.res.check_writable()
        e = self.res.listing(parent).get(name)
        if e is None:
            raise err(errno.ENOENT, name=name)
        if e.is_dir != is_dir:
            raise err(errno.EISDIR if e.is_dir else errno.ENOTDIR, name=name)
        node, _ = self.res.node_for(parent, name, e)
        listing = self.res.listing(parent)      # read again if a branch changed underneath
        return listing, listing[name], node

    def pin_big_file(self, parent: Node, name: bytes) -> int | None:
        """An O_PATH fd of the upper file *name* of *parent* when it is a big file (FREE_BIG bytes
        allocated) with one link, None otherwise.  Held across an unlink or a rename over *name*,
        it keeps the file's blocks until it is closed, which the caller does off the loop."""
        pfd = self.res.table.dirfd_or_none(parent, 0)
        e = self.res.listing(parent).get(name)
        if pfd is None or e is None or e.is_dir or e.layer != 0:
            return None
        known = parent.children.get(name)
        try:
            st = known.st if known is not None and known.st is not None else pfd.lstat(name)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_blocks * 512 < FREE_BIG:
                return None
            return pfd.open_path(name)
        except OSError:
            return None     # the unlink or rename says what is wrong

    def unlink(self, parent: Node, name: bytes) -> None:
        listing, e, node = self._to_remove(parent, name, is_dir=False)
        if e.layer == 0:
            pfd = self.res.table.dirfd(parent, 0)
            if e.has_lower:
                self._whiteout(pfd, name, replace=True)
            else:
                pfd.unlink(name)
        else:
            self._whiteout(self.res.upper_dir(parent), name, replace=False)
        del listing[name]
        self.res.touch(node, parent)
        self.res.table.drop_link(node, parent, name)

    def rmdir(self, parent: Node, name: bytes) -> None:
        listing, e, node = self._to_remove(parent, name, is_dir=True)
        if self.res.listing(node):
            raise err(errno.ENOTEMPTY, name=name)
        if e.layer == 0:
            self.res.table.dirfd(node, 0).clear()   # only whiteouts and markers are left in it
            pfd = self.res.table.dirfd(parent, 0)
            if e.has_lower:
                self.res.writer.write(pfd, name, replace=True)
            else:
                pfd.rmdir(name)
        else:
            self.res.writer.write(self.res.upper_dir(parent), name, replace=False)
        del listing[name]
        self.res.table.listings.drop(node)
        node.listing = {}       # kept for good: its branch directories may still hold entries
        self.res.touch(node, parent)
        self.res.table.drop_link(node, parent, name)

    # ------------------------------------------------------------------ rename

    def _is_merged_or_lower(self, node: Node) -> bool:
        return node.layer != 0 or len(node.dirs) > 1

    async def rename(self, op: Node, on: bytes, np: Node, nn: bytes, flags: int) -> None:
        self.res.check_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise err(errno.EINVAL, "overlayfs takes no other rename flag (RENAME_WHITEOUT)", on)
        if is_reserved_name(nn):
            raise err(errno.EPERM, name=nn)
        es = self.res.listing(op).get(on)
        if es is None:
            raise err(errno.ENOENT, name=on)
        ed = self.res.listing(np).get(nn)
        exchange = bool(flags & RENAME_EXCHANGE)
        if flags & RENAME_NOREPLACE and ed is not None:
            raise err(errno.EEXIST, name=nn)
        if exchange and ed is None:
            raise err(errno.ENOENT, name=nn)
        src, _ = self.res.node_for(op, on, es)
        # With -o redirect_dir=on, a directory with content below moves in place (a redirect).
        in_place = self.res.redirects.create
        moved_below = [src] if es.is_dir and self._is_merged_or_lower(src) else []
        if moved_below and not in_place:
            raise err(errno.EXDEV, "directory has content in a lower branch", on)
        dst: Node | None = None
        if ed is not None:
            dst, _ = self.res.node_for(np, nn, ed)
            if dst is src and not exchange:
                return
            if exchange:
                if ed.is_dir and self._is_merged_or_lower(dst):
                    if not in_place:
                        raise err(errno.EXDEV, "directory has content in a lower branch", nn)
                    moved_below.append(dst)
            elif ed.is_dir and not es.is_dir:
                raise err(errno.EISDIR, name=nn)
            elif es.is_dir and not ed.is_dir:
                raise err(errno.ENOTDIR, name=nn)
            elif ed.is_dir and self.res.listing(dst):
                raise err(errno.ENOTEMPTY, name=nn)
        with self.res.table.listings.pinned(op, np):    # not dropped while awaiting: es, ed stay theirs
            if not es.is_dir:
                await self.res.ensure_upper(src, meta=True)
            if exchange and dst is not None and not dst.is_dir:
                await self.res.ensure_upper(dst, meta=True)
            # Re-read after the awaits: another request may have changed either name meanwhile.
            if self.res.listing(op).get(on) is not es or self.res.listing(np).get(nn) is not ed:
                raise err(errno.EAGAIN, "rename raced with another change", on)
        for below in moved_below:
            self.res.upper_dir(below)
        if src.is_dir and src.branch_dir(0) is None:
            raise err(errno.EXDEV, name=on)
        spfd = self.res.upper_dir(op)
        dpfd = self.res.upper_dir(np)
        for below in moved_below:
            self.res.redirects.before_move(below, same_parent=op is np)
        for moving in (src, dst):
            if moving is not None and moving.is_dir:
                self.res.table.dirfd_or_none(moving, 0)   # opened (under its old name) for after the move
        self.res.set_move_redirect(src, op, on, samedir=op is np)
        if exchange and dst is not None:
            self.res.set_move_redirect(dst, np, nn, samedir=op is np)
        self.res.touch(op, np, src, dst)
        if exchange:
            assert ed is not None and dst is not None
            spfd.rename(on, dpfd, nn, RENAME_EXCHANGE)
            self._after_exchange(op, on, es, src, np, nn, ed, dst, moved_below)
            return
        dst_lower = False
        if ed is not None:
            dst_lower = ed.has_lower or ed.layer != 0
            if ed.is_dir and ed.layer == 0:
                assert dst is not None
                self.res.table.dirfd(dst, 0).clear()
        else:
            dst_lower = self._clear_whiteout_for(dpfd, nn, es.is_dir)
        self._rename_leaving_whiteout(spfd, on, dpfd, nn, whiteout=es.has_lower or es.layer != 0)
        if es.is_dir and src not in moved_below:
            self._opaque_after_move(src, np, dst_lower)
        del self.res.listing(op)[on]
        new = Entry(0, es.is_dir, dst_lower)
        self.res.listing(np)[nn] = new
        if dst is not None:
            self.res.table.drop_link(dst, np, nn)
            if dst.is_dir:
                self.res.table.listings.drop(dst)
                dst.listing = {}
        self.res.table.drop_link(src, op, on)
        self.res.table.add_link(src, np, nn)

    def _opaque_after_move(self, moved: Node, new_parent: Node, name_below: bool) -> None:
        """A directory moved into a merged directory (or onto a name that exists below) becomes
        opaque, as overlayfs does, so nothing below can merge into it later."""
        if not (name_below or len(new_parent.dirs) > 1):
            return
        fd = self.res.table.dirfd(moved, 0)
        if not dir_is_opaque(fd):
            self.res.writer.make_opaque(fd)
        if len(moved.dirs) > 1:
            self.res.table.close_dirs(moved, keep=1)
            moved.listing = None

    def _rename_leaving_whiteout(self, spfd: DirFd, on: bytes, dpfd: DirFd, nn: bytes, whiteout: bool
                                 ) -> None:
        """Rename in the writable branch; with *whiteout*, leave one at the old name.

        In the overlay dialect the kernel does both at once (RENAME_WHITEOUT), so no crash can let
        the lower object show again; elsewhere the whiteout follows the rename.
        """
        atomic = self.res.writer.dialect is Dialect.OVERLAY
        if whiteout and atomic:
            try:
                spfd.rename(on, dpfd, nn, RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
        spfd.rename(on, dpfd, nn)
        if whiteout:
            self._whiteout(spfd, on, replace=False)

    def _clear_whiteout_for(self, dirfd: DirFd, name: bytes, is_dir: bool) -> bool:
        """Before renaming onto *name*, remove a whiteout a rename cannot replace; True if one was there."""
        chr_wh, aufs = whiteouts_at(dirfd, name)
        if chr_wh and is_dir:
            dirfd.unlink(name)
        if aufs:
            dirfd.unlink(WH_PREFIX + name)
        return chr_wh or aufs

    def _after_exchange(self, op: Node, on: bytes, es: Entry, src: Node,
                        np: Node, nn: bytes, ed: Entry, dst: Node, redirected: list[Node]) -> None:
        lo, ln = self.res.listing(op), self.res.listing(np)
        src_lower = es.has_lower or es.layer != 0
        dst_lower = ed.has_lower or ed.layer != 0
        lo[on] = Entry(0, ed.is_dir, src_lower)
        ln[nn] = Entry(0, es.is_dir, dst_lower)
        for node, parent, lower in ((src, np, dst_lower), (dst, op, src_lower)):
            if node.is_dir and node not in redirected:
                self._opaque_after_move(node, parent, lower)
        self.res.table.drop_link(src, op, on)
        self.res.table.drop_link(dst, np, nn)
        self.res.table.add_link(src, np, nn)
        self.res.table.add_link(dst, op, on)


def _strip_sgid(mode: int, owner: tuple[int, int], creds: Creds) -> int:
    """*mode* for a new non-directory owned by *owner*: without S_ISGID (when group-executable)
    unless the caller is in the new file's group or holds CAP_FSETID, as the kernel's
    inode_init_owner decides (kernels since 6.0 strip it before the request reaches us; older ones
    leave it to the filesystem)."""
    if mode & stat.S_ISGID and mode & stat.S_IXGRP and owner[1] != creds.gid and not in_group_or_capable(
            creds.pid, creds.gid, owner[1]):
        return mode & ~stat.S_ISGID
    return mode

