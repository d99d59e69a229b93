"""Copy-up: bring a lower object into the writable branch before its first change.

One entry point per kind: `CopyUp.dir` for a directory (sync: small), `CopyUp.file` for anything else
(async: data may be large and is copied on a worker thread).  Each object is assembled under a
temporary name in the work directory — data, owner, mode, xattrs, times — and renamed into place, so
no reader and no crash ever sees a partial copy.  The temporary is removed on any failure.  The
parent directory's times are restored after the rename, as overlayfs does.

Copy-up knows branch fds and names, not nodes: the caller (`Resolver`) copies parents first, hands
the fds, and records what was made (the directory's new fd; a file's `Copied` temporary, which it
places with `CopyUp.place` once it has checked, after the await, that the name still stands for the
node).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from .branches import DirFd, copy_data, fd_path
from .interfaces import Executor
from .whiteout import WhiteoutWriter, is_private_xattr

log = logging.getLogger(__name__)

# Copies up to this size stay on the caller's thread; larger ones go to the executor (a worker thread).
INLINE_COPY_MAX = 1 << 20


def copy_xattrs(src: str, dst: str) -> None:
    """Copy every xattr but the union's private ones from path *src* to path *dst*."""
    try:
        names = os.listxattr(src)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if is_private_xattr(os.fsencode(name)):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as e:
            # security.* and trusted.* may be refused to an unprivileged daemon; ACLs may be unsupported.
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise
            log.debug("copy-up: xattr %s not copied: %s", name, e)


def _chown_tolerant(chown: Callable[[], None]) -> None:
    """Give a copy its original owner where the daemon may; an unprivileged daemon, or one that is
    root only in a user namespace where the owner is unmapped (EINVAL), keeps its own."""
    try:
        chown()
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL):
            raise
        log.debug("copy-up keeps the daemon's owner: %s", e)


@dataclass(frozen=True)
class Copied:
    """A complete copy of a non-directory, under the temporary name *tmp* in the work directory."""

    tmp: bytes
    st: os.stat_result      # the original's


class Tally:
    """What copy-up has made since the union was made: objects, bytes of data and time (of the
    copies into the work directory, awaits included), for the server's statistics."""

    __slots__ = ("files", "dirs", "bytes", "ns", "max_ns")

    def __init__(self) -> None:
        self.files = 0
        self.dirs = 0
        self.bytes = 0
        self.ns = 0
        self.max_ns = 0

    def add(self, started_ns: int, size: int = 0, is_dir: bool = False) -> None:
        took = time.perf_counter_ns() - started_ns
        if is_dir:
            self.dirs += 1
        else:
            self.files += 1
        self.bytes += size
        self.ns += took
        self.max_ns = max(self.max_ns, took)


class CopyUp:
    """Copies objects into the writable branch, assembling them in *work_fd* (None: read-only
    union) under the writer's temporary names; big data is copied by *executor*.  *tally* counts
    the copies made."""

    def __init__(self, work_fd: DirFd | None, writer: WhiteoutWriter, executor: Executor) -> None:
        self.work_fd = work_fd
        self.writer = writer
        self.executor = executor
        self.tally = Tally()

    def _temp(self) -> bytes:
        return self.writer.temp_name()

    @property
    def work(self) -> DirFd:
        work = self.work_fd
        if work is None:
            raise OSError(errno.EROFS, "no work directory", "")
        return work

    def place(self, tmp: bytes, upper_parent_fd: DirFd, name: bytes) -> None:
        """Rename the finished temporary into place, keeping the parent's times."""
        work = self.work
        pst = os.fstat(upper_parent_fd)
        work.rename(tmp, upper_parent_fd, name)
        os.utime(upper_parent_fd, ns=(pst.st_atime_ns, pst.st_mtime_ns))

    def discard(self, tmp: bytes) -> None:
        work = self.work
        try:
            st = work.lstat(tmp)
        except OSError:
            return
        try:
            if stat.S_ISDIR(st.st_mode):
                work.rmdir(tmp)
            else:
                work.unlink(tmp)
        except OSError as e:
            log.warning("copy-up: could not remove temporary %r: %s", tmp, e)

    def dir(self, src_fd: DirFd, parent_upper_fd: DirFd, name: bytes) -> DirFd:
        """Copy the lower directory open as *src_fd* up, as *name* in *parent_upper_fd*; return
        the copy open."""
        started = time.perf_counter_ns()
        st = os.fstat(src_fd)
        work = self.work
        tmp = self._temp()
        work.mkdir(tmp, 0o700)
        try:
            fd = work.open_dir(tmp)
            try:
                self._own(fd, st)
                copy_xattrs(fd_path(src_fd), fd_path(fd))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                self.place(tmp, parent_upper_fd, name)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self.discard(tmp)
            raise
        self.tally.add(started, is_dir=True)
        return fd

    @staticmethod
    def _own(fd: int, st: os.stat_result) -> None:
        _chown_tolerant(lambda: os.chown(fd, st.st_uid, st.st_gid))
        os.chmod(fd, stat.S_IMODE(st.st_mode))

    async def file(self, src_pfd: DirFd, name: bytes, keep: int | None = None,
                   data: int | None = None, meta_xattr: str | None = None) -> Copied:
        """Copy the non-directory *name* of the branch directory *src_pfd* into a temporary of the
        work directory; *keep* limits the data copied (O_TRUNC copies none).  A regular file's data
        comes from the open file *data* when given (a metadata-only copy below keeps it elsewhere;
        closed here); with *meta_xattr*, none is copied: the copy is sparse, of the same size, and
        carries that xattr (a metadata-only copy, see `metacopy`).  *src_pfd* is used before the
        first await only.  The caller places the copy (`place`) or discards it."""
        started = time.perf_counter_ns()
        st = src_pfd.lstat(name)
        if data is not None and not stat.S_ISREG(st.st_mode):
            os.close(data)
            data = None
        work = self.work
        tmp = self._temp()
        size = 0
        try:
            if stat.S_ISREG(st.st_mode):
                size = await self._copy_regular(src_pfd, name, tmp, st, keep, data, meta_xattr)
            elif stat.S_ISLNK(st.st_mode):
                work.symlink(src_pfd.readlink(name), tmp)
                self._finish_special(src_pfd, name, tmp, st)
            else:
                work.mknod(tmp, st.st_mode, st.st_rdev)
                self._finish_special(src_pfd, name, tmp, st)
        except BaseException:
            self.discard(tmp)
            raise
        self.tally.add(started, size)
        return Copied(tmp, st)

    async def _copy_regular(self, src_pfd: DirFd, name: bytes, tmp: bytes, st: os.stat_result,
                            keep: int | None, data: int | None, meta_xattr: str | None) -> int:
        """Copy the data (and owner, xattrs, times); the bytes of data copied."""
        work = self.work
        # O_NONBLOCK kept: nothing on a regular file waits for it, and one fcntl less per copy.
        src = src_pfd.open_file(name, os.O_RDONLY | os.O_NONBLOCK) if data is None else data
        try:
            dst = work.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                length = st.st_size if keep is None else min(keep, st.st_size)
                if meta_xattr is not None:
                    os.ftruncate(dst, st.st_size)
                elif length > INLINE_COPY_MAX:
                    await self.executor.run(copy_data, src, dst, length)
                elif length:
                    copy_data(src, dst, length, dense=st.st_blocks * 512 >= st.st_size)
                self._own(dst, st)
                if data is None:
                    copy_xattrs(fd_path(src), fd_path(dst))
                else:
                    with src_pfd.path_of(name) as path:
                        copy_xattrs(path, fd_path(dst))
                if meta_xattr is not None:
                    os.setxattr(dst, meta_xattr, b"")
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return 0 if meta_xattr is not None else length

    def _finish_special(self, src_pfd: DirFd, name: bytes, tmp: bytes, st: os.stat_result) -> None:
        work = self.work
        _chown_tolerant(lambda: work.chown(tmp, st.st_uid, st.st_gid))
        if not stat.S_ISLNK(st.st_mode):
            work.chmod(tmp, st.st_mode)
        with src_pfd.path_of(name) as src, work.path_of(tmp) as dst:
            copy_xattrs(src, dst)
        work.utime(tmp, (st.st_atime_ns, st.st_mtime_ns))
