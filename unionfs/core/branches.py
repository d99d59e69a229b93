"""Branches held open as directory fds; every access is relative to an fd, one name at a time.

Nothing outside this module opens a branch by path, and nothing outside it resolves a name under a
branch directory: a directory of a branch (or the work directory) is a `DirFd`, and every system
call on one of its names is a `DirFd` method (a unit test holds the rest of the core to it).  Names
are bytes.  No call here follows a symlink inside a branch: directories are opened with
O_NOFOLLOW|O_DIRECTORY relative to their parent's fd, and every stat, open, change and xattr call
works on a single name under an fd (without following it) or on the fd itself.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from .attrs import Stat
from .sysx import AT_SYMLINK_NOFOLLOW, fchmodat2, listxattrat, renameat2

log = logging.getLogger(__name__)

T = TypeVar("T")

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
WORK_NAME = "unionfs-work"            # inside an overlay-style workdir
AUFS_WORK_NAME = b".wh..wh.unionfs.work"  # inside an AUFS-style writable branch (hidden)
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"


_have_fchmodat2 = True      # until the kernel says ENOSYS (before Linux 6.6)


class DirFd(int):
    """An open directory of a branch (or the work directory): the one way to a name inside it.

    Each method is one system call (or a short fixed sequence) on one name relative to this
    directory, never following a symlink: `*at` calls with AT_SYMLINK_NOFOLLOW, opens with
    O_NOFOLLOW, and what has no no-follow form (chmod, xattrs of a name) through an O_PATH fd of
    the object itself.  The value is the fd: calls on the directory itself (fstat, fsync, its
    own xattrs) take it as any int.
    """

    __slots__ = ()

    # ---------------------------------------------------------------- looking

    def lstat(self, name: bytes) -> os.stat_result:
        return os.stat(name, dir_fd=self, follow_symlinks=False)

    def lstat_packed(self, name: bytes) -> tuple[Stat, int, int, int]:
        """*name*'s stat as the union keeps it, and its (st_dev, st_ino, st_mode): `lstat` without
        the os.stat_result between (about half the cost, where the C helper is built)."""
        return _lstat_packed(Stat, self, name)

    def exists(self, name: bytes) -> bool:
        try:
            self.lstat(name)
        except FileNotFoundError:
            return False
        return True

    def readlink(self, name: bytes) -> bytes:
        return os.readlink(name, dir_fd=self)

    def listdir(self) -> list[bytes]:
        """The names in this directory, as bytes."""
        return listdir(self)

    # ---------------------------------------------------------------- opening

    def open_dir(self, name: bytes) -> DirFd:
        """The directory *name*, opened without following a symlink (ELOOP or ENOTDIR then)."""
        return DirFd(_open_noatime(name, DIR_FLAGS, 0, self))

    def open_file(self, name: bytes, flags: int, mode: int = 0o777) -> int:
        """The regular file *name*, opened with *flags* (see `open_file_at`)."""
        return open_file_at(self, name, flags, mode)

    def open_path(self, name: bytes) -> int:
        """An O_PATH fd of the object *name* itself (a symlink is not followed)."""
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self)

    @contextmanager
    def path_of(self, name: bytes) -> Iterator[str]:
        """A path naming exactly the object *name* (not followed), valid inside the block: for the
        calls that have no fd or no-follow form (xattrs of a name, chmod)."""
        fd = self.open_path(name)
        try:
            yield fd_path(fd)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- making and removing

    def mkdir(self, name: bytes, mode: int) -> None:
        os.mkdir(name, mode, dir_fd=self)

    def mknod(self, name: bytes, mode: int, device: int = 0) -> None:
        os.mknod(name, mode, device, dir_fd=self)

    def symlink(self, target: bytes, name: bytes) -> None:
        os.symlink(target, name, dir_fd=self)

    def touch(self, name: bytes, mode: int) -> None:
        """Create the empty file *name* (an AUFS whiteout or marker); an existing one is kept."""
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=self))

    def link(self, name: bytes, dst: DirFd, dst_name: bytes) -> None:
        """A hard link *dst*/*dst_name* to the object *name* (a symlink itself, not its target)."""
        os.link(name, dst_name, src_dir_fd=self, dst_dir_fd=dst, follow_symlinks=False)

    def rename(self, name: bytes, dst: DirFd, dst_name: bytes, flags: int = 0) -> None:
        """rename(2), or renameat2(2) with *flags* (RENAME_EXCHANGE, RENAME_WHITEOUT...)."""
        if flags:
            renameat2(self, name, dst, dst_name, flags)
        else:
            os.rename(name, dst_name, src_dir_fd=self, dst_dir_fd=dst)

    def unlink(self, name: bytes) -> None:
        os.unlink(name, dir_fd=self)

    def rmdir(self, name: bytes) -> None:
        os.rmdir(name, dir_fd=self)

    def clear(self) -> None:
        """Remove everything inside this directory (see `clear_dir`)."""
        clear_dir(self)

    def remove(self, name: bytes) -> None:
        """Remove *name*, an empty directory or anything else."""
        if stat.S_ISDIR(self.lstat(name).st_mode):
            self.rmdir(name)
        else:
            self.unlink(name)

    # ---------------------------------------------------------------- changing

    def chown(self, name: bytes, uid: int, gid: int) -> None:
        os.chown(name, uid, gid, dir_fd=self, follow_symlinks=False)

    def chmod(self, name: bytes, mode: int, add: bool = False) -> None:
        """Set *name*'s permission bits to *mode* (with *add*, add them to its own); a symlink
        is left alone (Linux has no mode for one; chmod has a no-follow form from Linux 6.6,
        fchmodat2, and before it the object is reached through an O_PATH fd)."""
        global _have_fchmodat2
        if not add and _have_fchmodat2:
            try:
                fchmodat2(self, name, stat.S_IMODE(mode), AT_SYMLINK_NOFOLLOW)
                return
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    return      # a symlink
                if e.errno != errno.ENOSYS:
                    raise
                _have_fchmodat2 = False
        fd = self.open_path(name)
        try:
            st = os.fstat(fd)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(fd_path(fd), stat.S_IMODE(st.st_mode) | mode if add else stat.S_IMODE(mode))
        finally:
            os.close(fd)

    def utime(self, name: bytes, ns: tuple[int, int]) -> None:
        os.utime(name, ns=ns, dir_fd=self, follow_symlinks=False)

    def listxattr(self, name: bytes) -> list[bytes]:
        """The xattr names of the object *name* itself (a symlink is not followed)."""
        names = listxattrat(self, name, AT_SYMLINK_NOFOLLOW)
        if names is None:
            return [os.fsencode(n) for n in self.on_path(name, os.listxattr)]
        return names

    def on_path(self, name: bytes, fn: Callable[[str], T]) -> T:
        """``fn(path)``, *path* naming exactly the object *name* (see `path_of`)."""
        with self.path_of(name) as path:
            return fn(path)


@dataclass(eq=False)
class Layer:
    """One branch: its root held open, whether it may be written, and the device it lives on."""

    index: int
    path: str
    fd: DirFd
    writable: bool
    dev: int
    rr: bool = False    # "real read-only" (AUFS's rr): read-only, and said to change only through us

    @property
    def mode(self) -> str:
        """The branch's mode as AUFS spells it: rw, ro or rr."""
        return "rw" if self.writable else "rr" if self.rr else "ro"


@dataclass(eq=False)
class LayerStack:
    """The ordered branches (top first) and, for a writable union, the work directory."""

    layers: list[Layer]
    work_fd: DirFd | None = None
    fsindex: dict[int, int] = field(default_factory=dict)
    remove_work: bytes | None = None   # AUFS style: the hidden work dir is removed at unmount

    @property
    def upper(self) -> Layer | None:
        top = self.layers[0]
        return top if top.writable else None

    def close(self) -> None:
        self.drop_work()
        for layer in self.layers:
            _close_quietly(layer.fd)

    def drop_work(self) -> None:
        """Let go of the work directory (removing an AUFS-style one from the top, where it was made)."""
        if self.remove_work is not None and self.layers:
            try:
                self.layers[0].fd.rmdir(self.remove_work)
            except OSError as e:
                log.debug("leaving the work dir in place: %s", e)
        self.remove_work = None
        if self.work_fd is not None:
            _close_quietly(self.work_fd)
            self.work_fd = None

    def fs_index(self, dev: int) -> int:
        """A small number per filesystem, in order of first appearance (for inode numbers)."""
        idx = self.fsindex.get(dev)
        if idx is None:
            idx = self.fsindex[dev] = len(self.fsindex)
        return idx


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def open_root(path: str) -> DirFd:
    """Open a branch root.  The path itself is the user's to resolve; below it we never follow."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return DirFd(os.open(path, flags | os.O_NOATIME))
    except PermissionError:
        return DirFd(os.open(path, flags))


def open_stack(branches: list[tuple[str, bool]], workdir: str | None, aufs_work: bool) -> LayerStack:
    """Open every branch (top first) and prepare a clean work directory for a writable top.

    *workdir* is the overlay-style work dir; with *aufs_work* the temporaries live in a hidden
    directory inside the writable branch instead.  Leftovers of an earlier crash are removed.
    """
    opened: list[tuple[str, int, bool]] = []
    work_fd: int | None = None
    try:
        for path, writable in branches:
            opened.append((path, open_root(path), writable))
        if workdir is not None and not aufs_work and opened and opened[0][2]:
            work_fd = open_root(workdir)
    except BaseException:
        for _, fd, _ in opened:
            _close_quietly(fd)
        raise
    return stack_from_fds(opened, work_fd, workdir, aufs_work)


def stack_from_fds(branches: list[tuple[str, int, bool]], work_root: int | None, workdir: str | None,
                   aufs_work: bool) -> LayerStack:
    """The stack of branches already open as (path, root fd, writable), top first, as `open_stack`
    makes it; *work_root* is the overlay-style work dir (*workdir*) open.  The stack owns every fd
    given, *work_root* included (closed here once the work directory inside it is made), also when
    this raises.  The paths only name the branches in messages.
    """
    layers: list[Layer] = []
    stack = LayerStack(layers)
    try:
        for i, (path, fd, writable) in enumerate(branches):
            layers.append(Layer(i, path, DirFd(fd), writable, -1))
        for layer in layers:
            layer.dev = os.fstat(layer.fd).st_dev
            stack.fs_index(layer.dev)
        upper = stack.upper
        if upper is not None:
            overlay_work = not aufs_work and work_root is not None
            where = workdir if overlay_work and workdir is not None else upper.path
            try:
                if overlay_work:
                    assert work_root is not None
                    stack.work_fd = _fresh_dir(DirFd(work_root), WORK_NAME.encode())
                else:
                    stack.work_fd = _fresh_dir(upper.fd, AUFS_WORK_NAME)
                    stack.remove_work = AUFS_WORK_NAME
            except OSError as e:
                # Name the directory the user gave, not our work dir inside it.
                raise OSError(e.errno, e.strerror, where) from None
    except BaseException:
        stack.close()
        raise
    finally:
        if work_root is not None:
            _close_quietly(work_root)
        for _, fd, _ in branches[len(layers):]:
            _close_quietly(fd)
    return stack


def aufs_work_dir(top: DirFd) -> DirFd:
    """The hidden work directory of an AUFS-style writable top, made (or emptied) and open."""
    return _fresh_dir(top, AUFS_WORK_NAME)


def identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of the object open as *fd*."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def ancestors(fd: int, limit: int = 4096) -> set[tuple[int, int]]:
    """The identities of the directories above the directory open as *fd*, up to its root (as
    this process sees it: "..", one level at a time, never a path)."""
    found: set[tuple[int, int]] = set()
    here = identity(fd)
    cur = os.open("..", DIR_FLAGS, dir_fd=fd)
    try:
        for _ in range(limit):
            up = identity(cur)
            if up == here:
                break
            found.add(up)
            nxt = os.open("..", DIR_FLAGS, dir_fd=cur)
            os.close(cur)
            cur, here = nxt, up
    finally:
        os.close(cur)
    return found


def _fresh_dir(parent_fd: DirFd, name: bytes) -> DirFd:
    """Create (or empty) *name* under *parent_fd* and return it open; it holds only our temporaries.

    It carries no ACL, whatever its parent's default ACL gave it (overlayfs strips its work dir
    alike): a copy assembled in it gets the ACLs of its original and no others.
    """
    try:
        st: os.stat_result | None = parent_fd.lstat(name)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        parent_fd.unlink(name)
        st = None
    if st is None:
        parent_fd.mkdir(name, 0o700)
    fd = DirFd(os.open(name, DIR_FLAGS, dir_fd=parent_fd))
    try:
        if st is not None:
            clear_dir(fd)
        for acl in (ACL_DEFAULT, ACL_ACCESS):
            try:
                os.removexattr(fd, acl)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
        if st is None:
            os.chmod(fd, 0o700)     # a default ACL of the parent may have cut the mode
    except BaseException:
        os.close(fd)
        raise
    return fd


def clear_dir(fd: int) -> None:
    """Remove everything inside the directory open as *fd* (never following symlinks).

    Depth first without recursion, so any depth will do: each directory being emptied is held open
    with the names of its subdirectories still to go.
    """
    levels: list[tuple[int, bytes, list[bytes]]] = [(fd, b"", _remove_files(fd))]
    try:
        while levels:
            dfd, name, subdirs = levels[-1]
            if subdirs:
                sub_name = subdirs.pop()
                sub = os.open(sub_name, DIR_FLAGS, dir_fd=dfd)
                levels.append((sub, sub_name, []))
                levels[-1][2].extend(_remove_files(sub))
                continue
            levels.pop()
            if levels:
                os.close(dfd)
                os.rmdir(name, dir_fd=levels[-1][0])
    finally:
        for dfd, _, _ in levels[1:]:
            os.close(dfd)


def _remove_files(fd: int) -> list[bytes]:
    """Remove every non-directory in the directory open as *fd*; return the names of its directories."""
    subdirs = []
    for name in listdir(fd):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(name)
        else:
            os.unlink(name, dir_fd=fd)
    return subdirs


def listdir(fd: int) -> list[bytes]:
    """The names in the directory open as *fd*, as bytes."""
    with os.scandir(fd) as it:
        return [os.fsencode(e.name) for e in it]


def _lstat_packed_py(cls: type[Stat], dirfd: int, name: bytes) -> tuple[Stat, int, int, int]:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    return cls.of(st), st.st_dev, st.st_ino, st.st_mode


try:
    from ._native import lstat_at as _lstat_packed
except ImportError:     # not built: the same answer through os.stat
    _lstat_packed = _lstat_packed_py


def lstat_at(dirfd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def exists_at(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _open_noatime(name: bytes, flags: int, mode: int, dirfd: int) -> int:
    """Open for reading without touching the atime (lower branches are never written, not even
    their atimes), where the daemon may: O_NOATIME needs ownership or CAP_FOWNER."""
    try:
        return os.open(name, flags | os.O_NOATIME, mode, dir_fd=dirfd)
    except PermissionError:
        return os.open(name, flags, mode, dir_fd=dirfd)


def open_dir_at(dirfd: int, name: bytes) -> DirFd:
    return DirFd(_open_noatime(name, DIR_FLAGS, 0, dirfd))


def open_file_at(dirfd: int, name: bytes, flags: int, mode: int = 0o777) -> int:
    """Open the regular file *name* under *dirfd*, never following a symlink.

    An existing object is opened non-blocking and checked to be a regular file, so a FIFO or a
    device swapped in under a live mount cannot stall the daemon (ESTALE instead).
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if flags & os.O_CREAT:
        return os.open(name, flags, mode, dir_fd=dirfd)
    if flags & (os.O_ACCMODE | os.O_TRUNC) == os.O_RDONLY:
        fd = _open_noatime(name, flags | os.O_NONBLOCK, mode, dirfd)
    else:
        fd = os.open(name, flags | os.O_NONBLOCK, mode, dir_fd=dirfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ESTALE, "no longer a regular file", os.fsdecode(name))
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int) -> str:
    """A path naming exactly the object open as *fd* (procfs jumps to it, resolving nothing)."""
    return f"/proc/self/fd/{fd}"


def raise_nofile_limit() -> None:
    """Directories are held open; let the daemon hold as many as the system allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = max(hard, min(int(f.read()), 1 << 20))
        except OSError:
            pass
    for want in (target, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return
        except (ValueError, OSError):
            continue
    log.debug("could not raise RLIMIT_NOFILE from %d", soft)


def data_extents(fd: int, length: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of *fd* below *length* that hold data; holes are skipped.

    Where the filesystem cannot tell (no SEEK_DATA), the whole range is data.
    """
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < length:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:   # only a hole is left
                    break
                raise
            if start >= length:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
            out.append((start, end))
            off = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, length)]
    return out


#: A file this small whose blocks cover its size is copied whole, without looking for holes.
DENSE_MAX = 1 << 16


def copy_data(src: int, dst: int, length: int, dense: bool = False) -> None:
    """Copy *length* bytes from fd *src* to fd *dst* (same offsets) without reading them whole.

    Only the data extents are copied, so holes stay holes; *dst* is then sized to *length*.
    *dense*: the caller knows *src* has no holes (its blocks cover its size): at most DENSE_MAX
    bytes are then copied as one range.  copy_file_range (a reflink where the filesystem can)
    first, then a bounded read/write loop.
    """
    extents = [(0, length)] if dense and length <= DENSE_MAX else data_extents(src, length)
    reached = 0
    for start, end in extents:
        reached = _copy_range(src, dst, start, end)
    if reached != length:
        os.ftruncate(dst, length)


def _copy_range(src: int, dst: int, off: int, end: int) -> int:
    """Copy [*off*, *end*) of *src* to *dst*; the offset reached (short of *end* when *src* ends
    first)."""
    chunk = 1 << 30
    try:
        while off < end:
            n = os.copy_file_range(src, dst, min(chunk, end - off), off, off)
            if n == 0:
                return off
            off += n
        return off
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            raise
    length = end
    while off < length:
        buf = os.pread(src, min(1 << 20, length - off), off)
        if not buf:
            break
        view = memoryview(buf)
        while view:
            w = os.pwrite(dst, view, off)
            off += w
            view = view[w:]
    return off


__all__ = [
    "ACL_ACCESS", "ACL_DEFAULT", "DirFd", "aufs_work_dir", "identity", "ancestors",
    "Layer", "LayerStack", "open_stack", "stack_from_fds", "listdir",
    "lstat_at", "exists_at", "open_dir_at", "open_file_at", "fd_path", "clear_dir", "copy_data",
    "raise_nofile_limit",
]
