"""The write-path tests' vocabulary: the layers most of them start from and small builders of an
operation to run on each side of a `util.Pair`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from util import (
    D,
    F,
    H,
    L,
    N,
    Side,
    W,
    call,
    run_tool,
)

T0 = 1_500_000_000

LOWER = [
    F("lf", b"lower file\n", mode=0o640, uid=1000, gid=1001, xattrs={"user.x": b"1", "user.y": b"2"}, mtime=T0),
    F("lf2", b"second lower file\n", mode=0o600, mtime=T0 + 1),
    D("ld", mode=0o750, uid=11, gid=12, xattrs={"user.d": b"dir"}),
    F("ld/inner", b"inner", mtime=T0 + 2),
    D("ld/sub/deep", mode=0o700, uid=13, gid=14),
    F("ld/sub/deep/file", b"deep", mode=0o604, uid=15, gid=16, xattrs={"user.deep": b"x"}, mtime=T0 + 3),
    D("empty", mode=0o711, uid=17, gid=18),
    L("llink", "lf", uid=19, gid=20),
    N("lfifo", "fifo", mode=0o620, uid=21, gid=22),
    N("ldev", "chr", 1, 3, mode=0o666),
    D("merged"), F("merged/low", b"low"),
    D("wo"), F("wo/a", b"a"),
    F("hl1", b"hard", uid=5), H("hl2", "hl1"),
    F("hidden-below", b"under a whiteout"),
    D("wodir"), F("wodir/inner", b"under a whited-out dir"),
]
LOWER_BOTTOM = [F("merged/bottom", b"b"), F("bottom-only", b"bo"), F("hidden-below", b"x")]
UPPER = [F("uf", b"upper file\n", mode=0o644), F("uf2", b"upper 2\n"), D("ud"), F("ud/x", b"x"),
         D("ud2"), D("merged"), F("merged/up", b"up"), W("hidden-below"), D("uempty"), W("wodir")]

WR = os.O_WRONLY


def w(path: str, flags: int = os.O_WRONLY, data: bytes | None = None, mode: int = 0o644,
      off: int | None = None) -> Callable[[Side], Any]:
    def op(s: Side) -> Any:
        fd = os.open(s.p(path), flags, mode)
        try:
            if data is not None:
                return os.pwrite(fd, data, off) if off is not None else os.write(fd, data)
            return None
        finally:
            os.close(fd)
    return op


def seq(*ops: Callable[[Side], Any]) -> Callable[[Side], Any]:
    def op(s: Side) -> Any:
        return [call(o, s) for o in ops]
    return op


def p(fn: Callable[..., Any], *rels: str, **kw: Any) -> Callable[[Side], Any]:
    """``fn`` applied to the given paths on the side's mount."""
    def op(s: Side) -> Any:
        return fn(*[s.p(r) for r in rels], **kw)
    return op


def mknod(rel: str, kind: int, dev: tuple[int, int] = (0, 0), mode: int = 0o640) -> Callable[[Side], Any]:
    return lambda s: os.mknod(s.p(rel), mode | kind, os.makedev(*dev))


def rmtree_mkdir(rel: str) -> Callable[[Side], Any]:
    def op(s: Side) -> Any:
        shutil.rmtree(s.p(rel))
        os.mkdir(s.p(rel), 0o755)
    return op


def sh(cmd: list[str]) -> Callable[[Side], Any]:
    def op(s: Side) -> Any:
        rc, out, errout = run_tool(cmd, cwd=s.p())
        return rc, out.replace(os.fsencode(s.mnt), b"MNT"), errout.replace(os.fsencode(s.mnt), b"MNT")
    return op


def fsync_path(rel: str, flags: int, data_only: bool = False) -> Callable[[Side], Any]:
    def op(s: Side) -> Any:
        fd = os.open(s.p(rel), flags)
        try:
            (os.fdatasync if data_only else os.fsync)(fd)
        finally:
            os.close(fd)
    return op


def fallocate(rel: str, off: int, ln: int) -> Callable[[Side], Any]:
    def op(s: Side) -> Any:
        fd = os.open(s.p(rel), os.O_WRONLY)
        try:
            os.posix_fallocate(fd, off, ln)
        finally:
            os.close(fd)
    return op


def mmap_write(path: bytes, off: int, data: bytes) -> bytes:
    import mmap
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            mm[off:off + len(data)] = data
            mm.flush()
            return bytes(mm[:])
    finally:
        os.close(fd)
