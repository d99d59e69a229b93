"""Layer tars: decompress by magic, hash while streaming, unpack safely relative to directory fds.

Every member is resolved one component at a time below the layer's root fd with O_NOFOLLOW, so a
member can neither climb out (``..``, an absolute name), nor pass through a symlink that an earlier
member planted, nor hard-link to anything outside the layer.  OCI whiteouts (``.wh.NAME``,
``.wh..wh..opq``) are ordinary empty files in the tar and are kept as they are: unionfs reads them.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import logging
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

import zstandard

from unionfs.core.branches import DIR_FLAGS, clear_dir, fd_path, lstat_at
from unionfs.core.errors import QuietError

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20
XATTR_PAX = "SCHILY.xattr."
DEFAULT_ROOT_MODE = 0o555


class ImageError(QuietError):
    """A bad archive, layer or image reference: one line for the user."""


class HashingReader(io.RawIOBase):
    """Reads *raw*, hashing (sha256) and counting every byte that passes; *progress* gets each count."""

    def __init__(self, raw: IO[bytes], progress: Callable[[int], None] | None = None,
                 tee: IO[bytes] | None = None) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.progress = progress
        self.tee = tee

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        if n:
            self.sha.update(data)
            self.size += n
            if self.tee is not None:
                self.tee.write(data)
            if self.progress is not None:
                self.progress(n)
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def decompressed(raw: IO[bytes]) -> IO[bytes]:
    """*raw* (a buffered stream) decompressed according to its first bytes: gzip, zstd or plain."""
    head = _peek(raw, 4)
    if head.startswith(GZIP_MAGIC):
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if head.startswith(ZSTD_MAGIC):
        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _peek(raw: IO[bytes], n: int) -> bytes:
    peek = getattr(raw, "peek", None)
    if peek is None:
        raise TypeError("decompressed() needs a buffered stream")
    return bytes(peek(n)[:n])


STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile)


@dataclass
class Unpacked:
    """What unpacking one layer tar saw: its diff_id and size (uncompressed)."""

    diff_id: str
    size: int


def unpack_stream(raw: IO[bytes], root_fd: int, *, privileged: bool, what: str,
                  progress: Callable[[int], None] | None = None,
                  tee: IO[bytes] | None = None, devices: bool | None = None) -> tuple[str, Unpacked]:
    """Unpack the (possibly compressed) layer tar read from *raw* into the directory *root_fd*.

    *privileged*: owners are kept (root, or root of a user namespace mapping the user's subordinate
    ids); *devices* (default: *privileged*): device nodes may be made (root of the host only).

    Returns (digest of the bytes read from *raw*, the uncompressed tar's diff_id and size).  *tee*
    receives a copy of the raw bytes.  Raises ImageError naming *what* for a corrupt, truncated or
    malicious tar; the caller removes the half-made tree.
    """
    blob = HashingReader(raw, progress, tee)
    buffered = io.BufferedReader(blob, CHUNK)
    try:
        plain = HashingReader(decompressed(buffered))
        with tarfile.open(fileobj=plain, mode="r|", encoding="utf-8") as tf:
            LayerWriter(root_fd, privileged, what, privileged if devices is None else devices).unpack(tf)
        plain.drain()      # the tar's end-of-archive padding counts in the diff_id
        while buffered.read(CHUNK):
            pass
    except STREAM_ERRORS as e:
        raise ImageError(f"{what}: truncated or corrupt layer: {e}") from None
    return blob.digest(), Unpacked(plain.digest(), plain.size)


def member_parts(name: str, what: str) -> list[bytes]:
    """The components of a member name, refusing absolute names and ``..``."""
    if name.startswith("/"):
        raise ImageError(f"{what}: refusing absolute member name {name!r}")
    parts = [os.fsencode(p) for p in name.split("/") if p not in ("", ".")]
    if b".." in parts:
        raise ImageError(f"{what}: refusing member name with '..': {name!r}")
    return parts


@dataclass
class LayerWriter:
    """Creates the members of one layer tar below *root_fd*, never following a symlink."""

    root_fd: int
    privileged: bool
    what: str
    devices: bool = True
    dir_times: list[tuple[list[bytes], int, int]] = field(default_factory=list)   # (parts, mtime, mode)

    def unpack(self, tf: tarfile.TarFile) -> None:
        root_seen = False
        for member in tf:
            parts = member_parts(member.name, self.what)
            root_seen = root_seen or not parts
            self.add(tf, member, parts)
        if not root_seen:
            # As containers/storage makes a layer's root that its tar does not describe.
            os.chmod(fd_path(self.root_fd), DEFAULT_ROOT_MODE)
        # Directory times last (creating entries inside a directory changed its mtime), deepest
        # first; rootless, the modes too (the owner needed to write into a read-only directory).
        for parts, mtime, mode in sorted(self.dir_times, key=lambda t: -len(t[0])):
            with self.parent(parts, create=False) as (pfd, name):
                path: Any = fd_path(pfd) if name is None else name
                kw: dict[str, Any] = {} if name is None else {"dir_fd": pfd}
                if not self.privileged:
                    os.chmod(path, mode, **kw)
                os.utime(path, (mtime, mtime), **kw)

    def parent(self, parts: list[bytes], create: bool = True) -> _Parent:
        return _Parent(self, parts, create)

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parts: list[bytes]) -> None:
        with self.parent(parts) as (pfd, name):
            if name is None:        # the layer's root itself
                if m.isdir():
                    self.meta(pfd, None, m)
                    self.dir_times.append((parts, int(m.mtime), stat.S_IMODE(m.mode)))
                return
            self.make(tf, m, pfd, name, parts)

    def make(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, name: bytes,
             parts: list[bytes]) -> None:
        try:
            old: os.stat_result | None = lstat_at(pfd, name)
        except FileNotFoundError:
            old = None
        if old is not None and not (m.isdir() and stat.S_ISDIR(old.st_mode)):
            _remove(pfd, name, old)   # a later member of the same name replaces the earlier one
        if m.isdir():
            if old is None or not stat.S_ISDIR(old.st_mode):
                os.mkdir(name, 0o700, dir_fd=pfd)
            self.dir_times.append((parts, int(m.mtime), stat.S_IMODE(m.mode)))
        elif m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)
            try:
                src = tf.extractfile(m)
                assert src is not None
                while chunk := src.read(CHUNK):
                    os.write(fd, chunk)
            finally:
                os.close(fd)
        elif m.issym():
            os.symlink(os.fsencode(m.linkname), name, dir_fd=pfd)
        elif m.islnk():
            self.hardlink(m, pfd, name)
            return       # a hard link shares its target's inode and metadata
        elif m.ischr() or m.isblk() or m.isfifo():
            if not m.isfifo() and not (self.privileged and self.devices):
                raise ImageError(f"{self.what}: device node {m.name!r}: only root can import it")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
        else:
            raise ImageError(f"{self.what}: unsupported member type {m.type!r} for {m.name!r}")
        self.meta(pfd, name, m)

    def hardlink(self, m: tarfile.TarInfo, pfd: int, name: bytes) -> None:
        target = member_parts(m.linkname, self.what)
        if not target:
            raise ImageError(f"{self.what}: hard link {m.name!r} to the layer's root")
        with self.parent(target, create=False) as (tfd, tname):
            assert tname is not None
            try:
                st = lstat_at(tfd, tname)
            except FileNotFoundError:
                raise ImageError(f"{self.what}: hard link {m.name!r} points outside the layer "
                                 f"or to nothing: {m.linkname!r}") from None
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{self.what}: hard link {m.name!r} to a directory")
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def meta(self, pfd: int, name: bytes | None, m: tarfile.TarInfo) -> None:
        """Owner, mode (setuid included), xattrs and mtime; in that order, as chown clears setuid
        bits and security.capability."""
        link = m.issym()
        path: Any = fd_path(pfd) if name is None else name
        kw: dict[str, Any] = {} if name is None else {"dir_fd": pfd}
        if self.privileged:
            try:
                os.chown(path, m.uid, m.gid, follow_symlinks=False, **kw)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                raise ImageError(f"{self.what}: {m.name!r} belongs to {m.uid}:{m.gid}, outside the ids this "
                                 "user namespace maps (your /etc/subuid and /etc/subgid ranges)") from None
        if not link:
            mode = stat.S_IMODE(m.mode)
            if m.isdir() and not self.privileged:
                mode |= stat.S_IRWXU     # until the end of the layer (see unpack)
            os.chmod(path, mode, **kw)
        xattrs = {k[len(XATTR_PAX):]: v for k, v in m.pax_headers.items() if k.startswith(XATTR_PAX)}
        if xattrs:
            target = fd_path(pfd) if name is None else os.path.join(fd_path(pfd), os.fsdecode(name))
            for key, value in xattrs.items():
                raw = value.encode("utf-8", "surrogateescape")
                try:
                    os.setxattr(target, key, raw, follow_symlinks=False)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                        raise
                    log.warning("%s: cannot set xattr %s on %s: %s", self.what, key, m.name, e.strerror)
        if not m.isdir():
            os.utime(path, (int(m.mtime), int(m.mtime)), follow_symlinks=False, **kw)


class _Parent:
    """Context manager: (fd of the member's parent directory, last component or None for the root).

    Missing parents are created (mode 0755, root-owned), as docker does; a component that exists and
    is not a directory (a symlink included) is refused.
    """

    def __init__(self, w: LayerWriter, parts: list[bytes], create: bool) -> None:
        self.w, self.parts, self.create = w, parts, create
        self.fds: list[int] = []

    def __enter__(self) -> tuple[int, bytes | None]:
        if not self.parts:
            return self.w.root_fd, None
        cur = self.w.root_fd
        for i, comp in enumerate(self.parts[:-1]):
            try:
                nxt = os.open(comp, DIR_FLAGS, dir_fd=cur)
            except FileNotFoundError:
                if not self.create:
                    raise ImageError(f"{self.w.what}: {b'/'.join(self.parts).decode(errors='replace')!r} "
                                     "points outside the layer or to nothing") from None
                os.mkdir(comp, 0o755, dir_fd=cur)
                nxt = os.open(comp, DIR_FLAGS, dir_fd=cur)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = b"/".join(self.parts[:i + 1]).decode(errors="replace")
                    full = b"/".join(self.parts).decode(errors="replace")
                    raise ImageError(f"{self.w.what}: refusing {full!r}: its parent {where!r} "
                                     "is not a directory (a symlink?)") from None
                raise
            self.fds.append(nxt)
            cur = nxt
        return cur, self.parts[-1]

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)


def _remove(pfd: int, name: bytes, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        try:
            clear_dir(fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=pfd)
    else:
        os.unlink(name, dir_fd=pfd)


def remove_tree(parent_fd: int, name: str | bytes) -> None:
    """Remove *name* below *parent_fd* whatever it is, never following a symlink; gone already is fine."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        try:
            os.chmod(fd_path(fd), 0o700)
            _make_removable(fd)
            clear_dir(fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)


def _make_removable(fd: int) -> None:
    """A layer may hold directories without write permission; rootless removal needs it (root has it)."""
    if os.geteuid() == 0:
        return
    with os.scandir(fd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                sub = os.open(e.name, DIR_FLAGS, dir_fd=fd)
                try:
                    os.chmod(fd_path(sub), 0o700)
                    _make_removable(sub)
                finally:
                    os.close(sub)
