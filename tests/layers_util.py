"""Layers for the tests: the same branch contents rendered in any whiteout dialect, and snapshots of
trees (what a user sees, a branch's state, a writable branch with whiteouts normalised).

Everything here works on ``bytes`` names so that names with newlines or non-UTF-8 bytes survive.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------------
# Snapshots

PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
WH_PREFIX = b".wh."
WH_OPQ = b".wh..wh..opq"

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def file_sha256(path: bytes | str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def xattrs(path: bytes, strip_private: bool = False) -> dict[bytes, bytes]:
    """All xattrs of ``path`` (not following a symlink). With ``strip_private``, overlay-private
    ones are dropped."""
    res: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return res
        raise
    for name in names:
        bname = os.fsencode(name)
        if strip_private and bname.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        try:
            res[bname] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            res[bname] = f"<errno {errno.errorcode.get(e.errno or 0)}>".encode()
    return res


def describe(path: bytes, st: os.stat_result, *, times: bool, dir_meta: bool,
             strip_private: bool, ino: bool = False) -> dict[str, Any]:
    """What a user sees of one object, as a dict that makes pytest diffs readable."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
    d: dict[str, Any] = {
        "type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
    }
    if kind != "dir" or dir_meta:
        d["size"] = st.st_size
        d["nlink"] = st.st_nlink
    if kind == "file":
        d["sha256"] = file_sha256(path)
    elif kind == "symlink":
        d["target"] = os.readlink(path)
    elif kind in ("chardev", "blockdev"):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if times and (kind != "dir" or dir_meta):
        d["mtime_ns"] = st.st_mtime_ns
    if ino:
        d["ino"] = st.st_ino
        d["ctime_ns"] = st.st_ctime_ns
    xa = xattrs(path, strip_private=strip_private)
    if xa:
        d["xattrs"] = xa
    return d


def walk(root: bytes) -> Iterable[tuple[bytes, bytes, os.stat_result]]:
    """(relative path, absolute path, lstat) for ``root`` and everything below it, never following
    a symlink, in sorted order."""
    stack = [b""]
    while stack:
        rel = stack.pop()
        absp = os.path.join(root, rel) if rel else root
        st = os.lstat(absp)
        yield rel, absp, st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(absp), reverse=True)
            for n in names:
                stack.append(os.path.join(rel, n) if rel else n)


def snapshot(root: os.PathLike[str] | str | bytes, *, times: bool = False, dir_meta: bool = False,
             strip_private: bool = False) -> dict[bytes, dict[str, Any]]:
    """The visible tree under ``root``: type, mode, uid, gid, size, sha256, link target, nlink, rdev,
    xattrs (all of them: a leaked private xattr must show up as a difference), keyed by relative
    path as bytes. Directory st_size and st_nlink are left out unless ``dir_meta`` (a documented
    difference); mtimes only with ``times``."""
    r = os.fsencode(root)
    return {rel: describe(absp, st, times=times, dir_meta=dir_meta, strip_private=strip_private)
            for rel, absp, st in walk(r)}


def layer_state(root: os.PathLike[str] | str | bytes) -> dict[bytes, dict[str, Any]]:
    """Everything about a branch that must not change when it is used read-only: content,
    metadata, xattrs (private ones too), inode numbers, mtime and ctime (not atime)."""
    r = os.fsencode(root)
    res = {}
    for rel, absp, st in walk(r):
        d = describe(absp, st, times=True, dir_meta=True, strip_private=False, ino=True)
        res[rel] = d
    return res


def layer_digest(root: os.PathLike[str] | str | bytes) -> str:
    h = hashlib.sha256()
    for rel, d in sorted(layer_state(root).items()):
        h.update(repr((rel, sorted(d.items()))).encode())
    return h.hexdigest()


def normalise_upper(root: os.PathLike[str] | str | bytes, *, times: bool = False
                    ) -> dict[bytes, dict[str, Any]]:
    """A writable branch after unmount, whiteouts in one dialect: a 0/0 char device or a `.wh.NAME`
    file becomes ``{"type": "whiteout"}`` at NAME; a directory with any opaque xattr (value ``y``)
    or a `.wh..wh..opq` file gets ``"opaque": True``; private xattrs are dropped. AUFS's private
    directories at the branch root (`.wh..wh.*`) are dropped."""
    r = os.fsencode(root)
    res: dict[bytes, dict[str, Any]] = {}
    for rel, absp, st in walk(r):
        parent, name = os.path.split(rel)
        first = rel.split(b"/")[0]
        if first.startswith(b".wh..wh.") and rel != WH_OPQ:
            continue  # AUFS keeps private dirs (.wh..wh.aufs, .wh..wh.plnk, ...) at a branch root
        if name == WH_OPQ and stat.S_ISREG(st.st_mode):
            res.setdefault(parent, {})["opaque"] = True
            continue
        if name.startswith(WH_PREFIX) and stat.S_ISREG(st.st_mode):
            res[os.path.join(parent, name[len(WH_PREFIX):])] = {"type": "whiteout"}
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            res[rel] = {"type": "whiteout"}
            continue
        d = describe(absp, st, times=times, dir_meta=False, strip_private=True)
        if d["type"] == "dir":
            for xname in OPAQUE_XATTRS:
                try:
                    if os.getxattr(absp, xname, follow_symlinks=False) == b"y":
                        d["opaque"] = True
                except OSError:
                    pass
        prev = res.get(rel, {})
        d.update(prev)
        res[rel] = d
    return res


# --------------------------------------------------------------------------------------------------
# Layer specs: the same layers, rendered in any whiteout dialect


@dataclass
class F:
    path: str | bytes
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int | None = None


@dataclass
class D:
    path: str | bytes
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    opaque: bool = False
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int | None = None


@dataclass
class L:
    path: str | bytes
    target: str | bytes
    uid: int = 0
    gid: int = 0


@dataclass
class W:
    """A whiteout for ``path``."""

    path: str | bytes


@dataclass
class N:
    """A special file: kind is fifo, chr, blk or sock."""

    path: str | bytes
    kind: str
    major: int = 0
    minor: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass
class H:
    """A hard link ``path`` to ``target`` (an earlier entry of the same layer)."""

    path: str | bytes
    target: str | bytes


Entry = F | D | L | W | N | H
FIXED_MTIME = 1_600_000_000  # every built object gets this mtime unless the spec says otherwise

DIALECTS = ("overlay", "aufs", "user", "fuseoverlayfs")


def _mkparents(root: bytes, rel: bytes) -> None:
    parent = os.path.dirname(rel)
    if parent:
        os.makedirs(os.path.join(root, parent), mode=0o755, exist_ok=True)


def render_layer(root: os.PathLike[str] | str | bytes, entries: Sequence[Entry], dialect: str) -> None:
    """Create ``entries`` under ``root`` (which may exist). Whiteouts and opaque dirs are written
    in ``dialect``: overlay (0/0 char dev, trusted.overlay.opaque=y), aufs (.wh.NAME, .wh..wh..opq),
    user (0/0 char dev, user.overlay.opaque=y), fuseoverlayfs (0/0 char dev,
    user.fuseoverlayfs.opaque=y). All times are fixed so two renderings are identical."""
    assert dialect in DIALECTS, dialect
    r = os.fsencode(root)
    os.makedirs(r, exist_ok=True)
    explicit_mtime: dict[bytes, int] = {}
    for e in entries:
        rel = os.fsencode(e.path)
        p = os.path.join(r, rel)
        _mkparents(r, rel)
        if isinstance(e, F):
            with open(p, "wb") as f:
                f.write(e.data)
            os.chmod(p, e.mode)
            os.chown(p, e.uid, e.gid)
            for k, v in e.xattrs.items():
                os.setxattr(p, k, v)
            if e.mtime is not None:
                explicit_mtime[rel] = e.mtime
        elif isinstance(e, D):
            os.makedirs(p, exist_ok=True)
            os.chmod(p, e.mode)
            os.chown(p, e.uid, e.gid)
            for k, v in e.xattrs.items():
                os.setxattr(p, k, v)
            if e.opaque:
                if dialect == "aufs":
                    with open(os.path.join(p, WH_OPQ), "wb"):
                        pass
                else:
                    xname = {"overlay": "trusted.overlay.opaque", "user": "user.overlay.opaque",
                             "fuseoverlayfs": "user.fuseoverlayfs.opaque"}[dialect]
                    os.setxattr(p, xname, b"y")
            if e.mtime is not None:
                explicit_mtime[rel] = e.mtime
        elif isinstance(e, L):
            os.symlink(os.fsencode(e.target), p)
            os.chown(p, e.uid, e.gid, follow_symlinks=False)
        elif isinstance(e, W):
            if dialect == "aufs":
                d, n = os.path.split(p)
                wp = os.path.join(d, WH_PREFIX + n)
                with open(wp, "wb"):
                    pass
                os.chmod(wp, 0o444)
            else:
                os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        elif isinstance(e, N):
            if e.kind == "sock":
                import socket
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.bind(p)
                finally:
                    s.close()
                os.chmod(p, e.mode)
            else:
                kind = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}[e.kind]
                os.mknod(p, e.mode | kind, os.makedev(e.major, e.minor))
                os.chmod(p, e.mode)
            os.chown(p, e.uid, e.gid)
        elif isinstance(e, H):
            os.link(os.path.join(r, os.fsencode(e.target)), p)
        else:  # pragma: no cover
            raise TypeError(e)
    fix_times(r, explicit_mtime)


def fix_times(root: bytes, explicit: dict[bytes, int] | None = None) -> None:
    """Give everything below ``root`` a fixed atime/mtime (deepest first, so directories keep it)."""
    explicit = explicit or {}
    items = list(walk(root))
    for rel, absp, _st in reversed(items):
        t = explicit.get(rel, FIXED_MTIME)
        os.utime(absp, ns=(t * 10**9, t * 10**9), follow_symlinks=False)
