"""Whiteouts and opaque directories: recognise every dialect found in the wild, write the chosen one.

Dialects read, in any branch:
- AUFS: an entry ``.wh.NAME`` hides NAME below; ``.wh..wh..opq`` makes its directory opaque; any other
  ``.wh..wh.*`` name is AUFS (or unionfs) bookkeeping and is never shown.
- overlayfs: a character device 0/0 named NAME hides NAME below; the xattr ``trusted.overlay.opaque``
  (or ``user.overlay.opaque`` from unprivileged overlayfs, or ``user.fuseoverlayfs.opaque``) set to
  ``y`` makes its directory opaque.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

from .branches import DirFd
from .config import Dialect as Dialect  # (defined there, for the mount's fast path)

log = logging.getLogger(__name__)

WH_PREFIX = b".wh."
WH_META_PREFIX = b".wh..wh."
WH_OPQ = b".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.", b"user.unionfs.")
WHITEOUT_DEV = os.makedev(0, 0)


# Every bookkeeping namespace is escaped the way overlayfs escapes its own, so a program may set any
# xattr through the union and none of them can turn into a marker in the branch.
ESCAPED_XATTR_PREFIXES = PRIVATE_XATTR_PREFIXES
ESCAPE = b"overlay."
# overlayfs's own namespace when it runs with trusted.* xattrs (as root): the others in
# ESCAPED_XATTR_PREFIXES are plain data to it.
OWN_XATTR_PREFIX = b"trusted.overlay."
XATTR_NAME_MAX = 255
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")


def is_private_xattr(name: bytes) -> bool:
    """Overlay and unionfs bookkeeping xattrs of a branch object: never shown, never copied up.

    Escaped overlay xattrs (``trusted.overlay.overlay.*``) are user data, not bookkeeping.
    """
    return unescape_xattr(name) is None


def escape_xattr(name: bytes) -> bytes:
    """The branch xattr that stores the union's xattr *name*; OSError where overlayfs refuses it.

    As overlayfs does since Linux 6.7, ``trusted.overlay.X`` set through the union is stored as
    ``trusted.overlay.overlay.X`` in the branch, so overlays can nest; the other bookkeeping
    namespaces are escaped alike.  As overlayfs answers for its own namespace: the bare
    ``trusted.overlay.`` is EINVAL, and a name too long to escape (over 255 bytes escaped)
    EOPNOTSUPP.  In the namespaces it leaves alone, such a name is stored unescaped (no bookkeeping
    name is that long); only one that already reads as escaped (``user.overlay.overlay.*``) cannot
    be stored either way.
    """
    if name == OWN_XATTR_PREFIX:
        raise OSError(errno.EINVAL, "bare xattr namespace", os.fsdecode(name))
    for prefix in ESCAPED_XATTR_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            escaped = prefix + ESCAPE + rest
            if len(escaped) <= XATTR_NAME_MAX:
                return escaped
            if prefix == OWN_XATTR_PREFIX or rest.startswith(ESCAPE):
                raise OSError(errno.EOPNOTSUPP, "xattr name too long to escape", os.fsdecode(name))
            return name
    return name


def missing_xattr_errno(name: bytes) -> int:
    """What getxattr of *name* answers when the object has no such xattr: ENODATA, unless the name
    itself is refused (a bare namespace: EINVAL; no namespace: EOPNOTSUPP), as the kernel does."""
    if name in XATTR_NAMESPACES[:3]:
        return errno.EINVAL
    if not name.startswith(XATTR_NAMESPACES):
        return errno.EOPNOTSUPP
    return errno.ENODATA


def unescape_xattr(real: bytes) -> bytes | None:
    """The name under which the branch xattr *real* shows in the union, or None when hidden."""
    for prefix in ESCAPED_XATTR_PREFIXES:
        if real.startswith(prefix):
            rest = real[len(prefix):]
            if rest.startswith(ESCAPE):
                return prefix + rest[len(ESCAPE):]
            if prefix != OWN_XATTR_PREFIX and len(real) + len(ESCAPE) > XATTR_NAME_MAX:
                return real     # too long to have been escaped: stored as it is (escape_xattr)
            return None
    return real


def is_reserved_name(name: bytes) -> bool:
    """Names the union cannot hold because they spell a whiteout in the AUFS dialect."""
    return name.startswith(WH_PREFIX)


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_DEV


def dir_is_opaque(fd: int) -> bool:
    """Whether the branch directory open as *fd* is opaque in any dialect."""
    return opaque_marker(fd) is not None


def opaque_marker(fd: int) -> str | None:
    """What makes the branch directory open as *fd* opaque: the xattr's name, or ``.wh..wh..opq``
    (AUFS); None when it is not opaque."""
    try:
        names = os.listxattr(fd)
    except OSError:
        names = []
    for attr in OPAQUE_XATTRS:
        if attr in names:
            try:
                if os.getxattr(fd, attr) == b"y":
                    return attr
            except OSError:
                pass
    return os.fsdecode(WH_OPQ) if DirFd(fd).exists(WH_OPQ) else None


def whiteouts_at(dirfd: DirFd, name: bytes) -> tuple[bool, bool]:
    """Which whiteouts for *name* the branch directory *dirfd* holds: (0/0 device, .wh.NAME)."""
    try:
        device = is_whiteout_stat(dirfd.lstat(name))
    except FileNotFoundError:
        device = False
    # A name of more than 251 bytes has no room for an AUFS whiteout.
    return device, len(name) <= 255 - len(WH_PREFIX) and dirfd.exists(WH_PREFIX + name)


class WhiteoutWriter:
    """Writes whiteouts and opaque markers in one dialect into the writable branch.

    *work_fd* is a directory on the same filesystem for assembling a whiteout that must replace an
    existing entry atomically (overlay dialect).
    """

    def __init__(self, dialect: Dialect, work_fd: DirFd | None, privileged: bool) -> None:
        self.dialect = dialect
        self.work_fd = work_fd
        self.opaque_xattr = "trusted.overlay.opaque" if privileged else "user.overlay.opaque"
        self._seq = 0

    def temp_name(self) -> bytes:
        self._seq += 1
        return b"wh.%d.%d" % (os.getpid(), self._seq)

    def write(self, dirfd: DirFd, name: bytes, replace: bool) -> None:
        """Leave a whiteout for *name* in *dirfd*; with *replace*, atomically over an existing entry."""
        if self.dialect is Dialect.AUFS:
            dirfd.touch(WH_PREFIX + name, 0o444)
            if replace:
                dirfd.remove(name)
            return
        if not replace:
            try:
                dirfd.mknod(name, stat.S_IFCHR, WHITEOUT_DEV)
                return
            except PermissionError:
                self._fall_back()
                return self.write(dirfd, name, replace)
        work = self.work_fd
        assert work is not None
        tmp = self.temp_name()
        try:
            work.mknod(tmp, stat.S_IFCHR, WHITEOUT_DEV)
        except PermissionError:
            self._fall_back()
            return self.write(dirfd, name, replace)
        try:
            st = dirfd.lstat(name)
            if stat.S_ISDIR(st.st_mode):
                # rename() cannot put a non-directory over a directory: the emptied directory goes first.
                dirfd.rmdir(name)
            work.rename(tmp, dirfd, name)
        except BaseException:
            try:
                work.unlink(tmp)
            except OSError:
                pass
            raise

    def _fall_back(self) -> None:
        log.warning("cannot create 0/0 character devices here; writing AUFS-style whiteouts instead")
        self.dialect = Dialect.AUFS

    def make_opaque(self, fd: DirFd) -> None:
        """Mark the branch directory open as *fd* opaque (its times stay as they were)."""
        if self.dialect is Dialect.AUFS:
            _touch_keeping_times(fd, WH_OPQ)
            return
        # trusted.* needs CAP_SYS_ADMIN in the initial namespace; a daemon that is root only in a
        # user namespace gets EPERM there and writes user.overlay.opaque, as unprivileged overlayfs.
        for attr in dict.fromkeys((self.opaque_xattr, "user.overlay.opaque")):
            try:
                os.setxattr(fd, attr, b"y")
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                    raise
        _touch_keeping_times(fd, WH_OPQ)


def _touch_keeping_times(dirfd: DirFd, name: bytes) -> None:
    """A marker inside a directory is bookkeeping: the directory's own times must not change."""
    st = os.fstat(dirfd)
    dirfd.touch(name, 0o444)
    os.utime(dirfd, ns=(st.st_atime_ns, st.st_mtime_ns))
