"""The write path, op for op against kernel overlayfs (mounted with redirect_dir=off,
index=off, metacopy=off): the result or errno of the call, the visible tree, and the upper layer after
unmount (whiteouts normalised to one dialect). Every test's lower branches are digested before and
checked after (the ``pair`` fixture)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import util
from util import (
    IMPL,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    D,
    F,
    H,
    L,
    N,
    Pair,
    Side,
    W,
    call,
    err,
    renameat2,
    run_tool,
)

pytestmark = pytest.mark.fuse

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


def _mmap_write(path: bytes, off: int, data: bytes) -> bytes:
    import mmap
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            mm[off:off + len(data)] = data
            mm.flush()
            return bytes(mm[:])
    finally:
        os.close(fd)


#: name -> (operation, compare non-directory mtimes too)
OPS: dict[str, tuple[Callable[[Side], Any], bool]] = {
    # create / open
    "create": (w("new", WR | os.O_CREAT, b"new data", 0o600), False),
    "create-in-lower-dir-copies-parents": (w("ld/sub/deep/new", WR | os.O_CREAT, b"n"), False),
    "create-excl-existing-lower": (w("lf", WR | os.O_CREAT | os.O_EXCL), True),
    "create-excl-over-whiteout": (w("hidden-below", WR | os.O_CREAT | os.O_EXCL, b"back"), False),
    "create-in-missing-dir": (w("nodir/new", WR | os.O_CREAT), True),
    "create-under-file": (w("lf/new", WR | os.O_CREAT), True),
    "open-trunc-lower": (w("lf", WR | os.O_TRUNC), False),
    "open-trunc-write-lower": (w("lf", WR | os.O_TRUNC, b"replaced"), False),
    "open-append-lower": (w("lf", WR | os.O_APPEND, b"appended\n"), False),
    "pwrite-middle-lower": (w("lf", WR, b"XY", off=3), False),
    "pwrite-past-end-lower": (w("lf", WR, b"far", off=100_000), False),
    "open-rdwr-lower-no-write": (w("lf", os.O_RDWR), True),
    "open-rdonly-lower": (w("lf", os.O_RDONLY), True),
    "open-wronly-lower-dir": (w("ld", WR), True),
    "open-lower-symlink-nofollow": (w("llink", WR | os.O_NOFOLLOW), True),
    "write-through-lower-symlink": (w("llink", WR | os.O_APPEND, b"via link"), False),
    "write-lower-fifo-nonblock": (w("lfifo", WR | os.O_NONBLOCK), True),
    "truncate-lower": (p(os.truncate, "lf", length=4), False),
    "truncate-extend-lower": (p(os.truncate, "lf", length=1 << 20), False),
    "truncate-same-size-lower": (p(os.truncate, "lf", length=11), False),
    "truncate-deep-lower": (p(os.truncate, "ld/sub/deep/file", length=0), False),
    "truncate-dir": (p(os.truncate, "ld", length=0), True),
    "fallocate-lower": (fallocate("lf", 0, 1 << 16), False),
    "fsync-rdonly-lower": (fsync_path("lf", os.O_RDONLY), True),
    "fdatasync-wronly-lower": (fsync_path("lf", WR, data_only=True), True),
    "fsync-upper": (fsync_path("uf", WR), True),
    "fsync-lower-dir": (fsync_path("ld", os.O_RDONLY | os.O_DIRECTORY), True),
    "fsync-merged-dir": (fsync_path("merged", os.O_RDONLY | os.O_DIRECTORY), True),
    # directories
    "mkdir": (p(os.mkdir, "newdir", mode=0o705), False),
    "mkdir-in-lower-dir": (p(os.mkdir, "ld/sub/newdir"), False),
    "mkdir-existing-lower": (p(os.mkdir, "ld"), True),
    "mkdir-over-whiteout-is-opaque": (p(os.mkdir, "hidden-below"), False),
    "rmdir-lower-empty": (p(os.rmdir, "empty"), False),
    "rmdir-lower-nonempty": (p(os.rmdir, "ld"), True),
    "rmdir-merged-nonempty": (p(os.rmdir, "merged"), True),
    "rmdir-upper-empty": (p(os.rmdir, "uempty"), False),
    "rmdir-file": (p(os.rmdir, "lf"), True),
    "rmdir-whiteout-only": (seq(p(os.unlink, "merged/low"), p(os.unlink, "merged/up"),
                                p(os.unlink, "merged/bottom"), p(os.rmdir, "merged")), False),
    "rmdir-then-mkdir-is-opaque": (seq(p(os.unlink, "wo/a"), p(os.rmdir, "wo"), p(os.mkdir, "wo")), False),
    "rm-rf-then-mkdir-is-opaque": (rmtree_mkdir("ld"), False),
    "rm-rf-merged-then-mkdir": (rmtree_mkdir("merged"), False),
    # special files
    "mknod-fifo": (mknod("fifo", stat.S_IFIFO), False),
    "mknod-sock": (mknod("sock", stat.S_IFSOCK), False),
    "mknod-chr": (mknod("chr", stat.S_IFCHR, (1, 5)), False),
    "mknod-blk": (mknod("ld/blk", stat.S_IFBLK, (7, 0)), False),
    "mknod-reg": (mknod("reg", stat.S_IFREG), False),
    "mknod-existing-lower": (mknod("lf", stat.S_IFIFO), True),
    "mknod-0-0-chardev": (mknod("wh-lookalike", stat.S_IFCHR, (0, 0)), False),
    # links
    "symlink": (lambda s: os.symlink(b"some/target", s.p("newlink")), False),
    "symlink-in-lower-dir": (lambda s: os.symlink(b"../lf", s.p("ld/sub/link")), False),
    "symlink-existing": (lambda s: os.symlink(b"x", s.p("lf")), True),
    "link-lower-file": (p(os.link, "lf", "lf-hardlink"), True),
    "link-upper-file": (p(os.link, "uf", "ld/uf-link"), True),
    "link-lower-dir": (p(os.link, "ld", "ld-link"), True),
    "link-onto-existing": (p(os.link, "uf", "lf"), True),
    "link-lower-then-write-other-name": (seq(p(os.link, "lf", "lf-hardlink"),
                                            w("lf-hardlink", WR | os.O_APPEND, b"via second name"),
                                            lambda s: open(s.p("lf"), "rb").read()), False),
    "mmap-write-lower": (lambda s: _mmap_write(s.p("lf"), 2, b"MM"), False),
    "link-lower-hardlinked": (p(os.link, "hl1", "hl3"), True),
    # unlink
    "unlink-lower": (p(os.unlink, "lf"), True),
    "unlink-upper-only": (p(os.unlink, "uf"), True),
    "unlink-in-merged": (seq(p(os.unlink, "merged/low"), p(os.unlink, "merged/up")), True),
    "unlink-lower-deep": (p(os.unlink, "ld/sub/deep/file"), True),
    "unlink-lower-symlink": (p(os.unlink, "llink"), True),
    "unlink-lower-fifo": (p(os.unlink, "lfifo"), True),
    "unlink-dir": (p(os.unlink, "ld"), True),
    "unlink-missing": (p(os.unlink, "nothing"), True),
    "unlink-whited-out": (p(os.unlink, "hidden-below"), True),
    "unlink-one-hardlink": (p(os.unlink, "hl2"), True),
    "unlink-then-recreate": (seq(p(os.unlink, "lf"), w("lf", WR | os.O_CREAT, b"again")), False),
    # rename
    "rename-upper-file": (p(os.rename, "uf", "uf-renamed"), True),
    "rename-lower-file": (p(os.rename, "lf", "lf-renamed"), True),
    "rename-lower-over-lower": (p(os.rename, "lf", "lf2"), True),
    "rename-upper-over-lower": (p(os.rename, "uf", "lf"), True),
    "rename-lower-into-lower-dir": (p(os.rename, "lf", "ld/sub/moved"), True),
    "rename-lower-over-whiteout": (p(os.rename, "lf", "hidden-below"), True),
    "rename-lower-symlink": (p(os.rename, "llink", "llink2"), True),
    "rename-lower-dir-exdev": (p(os.rename, "ld", "ld2"), True),
    "rename-lower-empty-dir-exdev": (p(os.rename, "empty", "empty2"), True),
    "rename-merged-dir-exdev": (p(os.rename, "merged", "merged2"), True),
    "rename-upper-dir": (p(os.rename, "ud", "ud-renamed"), True),
    "rename-upper-dir-into-lower-dir": (p(os.rename, "ud", "ld/ud"), True),
    "rename-upper-dir-over-empty-lower-dir": (p(os.rename, "ud", "empty"), True),
    "rename-upper-dir-over-nonempty-dir": (p(os.rename, "ud", "ld"), True),
    "rename-file-over-dir": (p(os.rename, "uf", "ud2"), True),
    "rename-dir-over-file": (p(os.rename, "ud2", "uf"), True),
    "rename-missing": (p(os.rename, "nothing", "x"), True),
    "rename-to-self-lower": (p(os.rename, "lf", "lf"), True),
    "rename-hardlink-to-sibling": (p(os.rename, "hl1", "hl2"), True),
    "mv-lower-dir-falls-back": (sh(["mv", "ld", "ld-moved"]), True),
    "mv-merged-dir-falls-back": (sh(["mv", "merged", "merged-moved"]), True),
    "noreplace-existing": (lambda s: renameat2(s.p("uf"), s.p("lf"), RENAME_NOREPLACE), True),
    "noreplace-over-whiteout": (lambda s: renameat2(s.p("uf"), s.p("hidden-below"), RENAME_NOREPLACE), True),
    "noreplace-new-name": (lambda s: renameat2(s.p("lf"), s.p("fresh"), RENAME_NOREPLACE), True),
    "exchange-upper-files": (lambda s: renameat2(s.p("uf"), s.p("uf2"), RENAME_EXCHANGE), True),
    "exchange-lower-files": (lambda s: renameat2(s.p("lf"), s.p("lf2"), RENAME_EXCHANGE), True),
    "exchange-upper-lower": (lambda s: renameat2(s.p("uf"), s.p("lf"), RENAME_EXCHANGE), True),
    "exchange-with-missing": (lambda s: renameat2(s.p("uf"), s.p("nothing"), RENAME_EXCHANGE), True),
    "exchange-upper-dirs": (lambda s: renameat2(s.p("ud"), s.p("ud2"), RENAME_EXCHANGE), True),
    "exchange-lower-dir": (lambda s: renameat2(s.p("ud"), s.p("ld"), RENAME_EXCHANGE), True),
    # more names over whiteouts, and odd corners
    "mkdir-over-whited-out-dir": (p(os.mkdir, "wodir"), False),
    "rename-upper-dir-over-whited-out-dir": (p(os.rename, "ud", "wodir"), True),
    "rename-lower-file-over-whited-out-dir": (p(os.rename, "lf", "wodir"), True),
    "create-over-whited-out-dir": (w("wodir", WR | os.O_CREAT, b"file now"), False),
    "mknod-over-whiteout": (mknod("hidden-below", stat.S_IFIFO), False),
    "symlink-over-whiteout": (lambda s: os.symlink(b"lf", s.p("hidden-below")), False),
    "link-over-whiteout": (p(os.link, "lf", "hidden-below"), True),
    "open-creat-existing-lower": (w("lf", WR | os.O_CREAT), True),
    "chmod-whited-out": (p(os.chmod, "hidden-below", mode=0o600), True),
    "hardlink-lower-symlink": (lambda s: os.link(s.p("llink"), s.p("llink-hard"), follow_symlinks=False), True),
    "rename-file-over-lower-dir": (p(os.rename, "uf", "ld"), True),
    "punch-hole-lower": (sh(["fallocate", "-p", "-o", "0", "-l", "4096", "lf"]), False),
    "zero-range-lower": (sh(["fallocate", "-z", "-o", "2", "-l", "3", "lf"]), False),
    "keep-size-lower": (sh(["fallocate", "-n", "-o", "0", "-l", "65536", "lf"]), False),
    "fallocate-extend-upper": (sh(["fallocate", "-o", "100", "-l", "65536", "uf"]), False),
    "collapse-range-lower": (sh(["fallocate", "-c", "-o", "0", "-l", "4096", "lf"]), False),
    "getfattr-dump-after-copy-up": (seq(p(os.chmod, "lf", mode=0o600),
                                        sh(["getfattr", "-d", "-m", "-", "--absolute-names", "lf"])), True),
    "file-in-rm-rf-recreated-dir": (seq(rmtree_mkdir("merged"), w("merged/low", WR | os.O_CREAT, b"n")), False),
    # metadata: copy-up of data, mode, owner, times, xattrs, symlinks, special files, parents
    "chmod-lower": (p(os.chmod, "lf", mode=0o4751), True),
    "chmod-lower-dir": (p(os.chmod, "ld", mode=0o700), True),
    "chmod-lower-deep": (p(os.chmod, "ld/sub/deep/file", mode=0o400), True),
    "chmod-lower-fifo": (p(os.chmod, "lfifo", mode=0o600), True),
    "chmod-lower-chardev": (p(os.chmod, "ldev", mode=0o600), True),
    "chown-lower": (p(os.chown, "lf", uid=4242, gid=4343), True),
    "chown-lower-keep": (p(os.chown, "lf", uid=-1, gid=-1), True),
    "lchown-lower-symlink": (lambda s: os.chown(s.p("llink"), 77, 88, follow_symlinks=False), True),
    "chown-through-symlink": (p(os.chown, "llink", uid=99, gid=98), True),
    "utime-lower": (lambda s: os.utime(s.p("lf"), ns=(T0 * 10**9 + 5, T0 * 10**9 + 7)), True),
    "utime-lower-deep": (lambda s: os.utime(s.p("ld/sub/deep/file"), ns=(1, 2)), True),
    "utime-lower-symlink": (lambda s: os.utime(s.p("llink"), ns=(3, 4), follow_symlinks=False), True),
    "utime-lower-dir": (lambda s: os.utime(s.p("ld/sub"), ns=(5, 6)), True),
    "setxattr-lower": (p(os.setxattr, "lf", attribute="user.new", value=b"v"), True),
    "setxattr-replace-missing": (p(os.setxattr, "lf", attribute="user.none", value=b"v",
                                   flags=os.XATTR_REPLACE), True),
    "setxattr-create-existing": (p(os.setxattr, "lf", attribute="user.x", value=b"v",
                                   flags=os.XATTR_CREATE), True),
    "setxattr-lower-dir": (p(os.setxattr, "ld/sub/deep", attribute="user.n", value=b"d"), True),
    "removexattr-lower": (p(os.removexattr, "lf", attribute="user.x"), True),
    "removexattr-missing": (p(os.removexattr, "lf", attribute="user.none"), True),
    "setxattr-private-name": (p(os.setxattr, "ld", attribute="trusted.overlay.opaque", value=b"y"), True),
    "copy-up-hardlinked-lower": (p(os.chmod, "hl1", mode=0o600), True),
    "cp-a-within-union": (sh(["cp", "-a", "ld", "ld-copy"]), False),
    "tar-x-over-lower": (lambda s: (run_tool(["tar", "-C", s.p(), "-cf", s.p("../t.tar"), "ld"]),
                                    run_tool(["tar", "-C", s.p("merged"), "-xf", s.p("../t.tar")]))[1][0], False),
}


#: Ops where the AUFS style (A:B branches, .wh. dialect, temporaries in the branch) can differ; the
#: default run repeats only these AUFS-style, --runslow repeats all of them.
AUFS_DEFAULT = {
    "create-in-lower-dir-copies-parents", "create-excl-over-whiteout", "open-trunc-lower", "pwrite-middle-lower",
    "mkdir-over-whiteout-is-opaque", "rmdir-lower-empty", "rmdir-merged-nonempty", "rmdir-whiteout-only",
    "rmdir-then-mkdir-is-opaque", "rm-rf-then-mkdir-is-opaque", "rm-rf-merged-then-mkdir", "unlink-lower",
    "unlink-in-merged", "unlink-whited-out", "unlink-then-recreate", "rename-lower-file",
    "rename-lower-over-whiteout", "rename-lower-dir-exdev", "rename-merged-dir-exdev", "rename-upper-dir",
    "mv-lower-dir-falls-back", "noreplace-over-whiteout", "exchange-lower-files", "chmod-lower",
    "chmod-lower-deep", "chmod-lower-fifo", "lchown-lower-symlink", "setxattr-lower", "link-lower-file",
    "copy-up-hardlinked-lower",
}
assert AUFS_DEFAULT <= set(OPS)
#: Differences that cannot be fixed in unionfs itself; each must also be documented for users.
KNOWN_LIMITS = {
    "collapse-range-lower": "the kernel's FUSE module answers EOPNOTSUPP to collapse and insert range itself, "
                            "before asking the server (here overlayfs on ext4 says EINVAL)",
}


def _marks(name: str, extra: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    if name in KNOWN_LIMITS:
        extra = (*extra, pytest.mark.xfail(reason=KNOWN_LIMITS[name], strict=True))
    return extra


OP_PARAMS = [pytest.param(n, "overlay", id=f"{n}-overlay", marks=_marks(n)) for n in OPS] + [
    pytest.param(n, "aufs", id=f"{n}-aufs", marks=_marks(n, () if n in AUFS_DEFAULT else (pytest.mark.slow,)))
    for n in OPS]
#: Ops whose result is re-read after a remount of both sides (what was written means the same)
REMOUNT = AUFS_DEFAULT | {n for n in OPS if "whiteout" in n or "whited" in n or "rename-upper-dir" in n}


# README, differences: the kernel copies an object up before refusing setxattr with XATTR_CREATE or
# XATTR_REPLACE; pyfuse3 refuses before unionfs sees the call, so nothing is copied up.
REFUSED_SETXATTR = {"setxattr-replace-missing", "setxattr-create-existing"}


@pytest.mark.parametrize("name,style", OP_PARAMS)
def test_op(pair: Pair, name: str, style: str) -> None:
    op, times = OPS[name]
    pair.build([LOWER, LOWER_BOTTOM], upper=UPPER, style=style, dialect="aufs" if style == "aufs" else "overlay")
    pair.same(op, name)
    if name in REFUSED_SETXATTR:
        # The documented difference, and only it: the lower file stays where it was on unionfs.
        assert not os.path.lexists(os.path.join(pair.u.upper, "lf"))  # type: ignore[arg-type]
        path = pair.u.p("lf")
        st = os.lstat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)  # copy it up as the kernel did
    pair.assert_same_tree(times=times)
    pair.assert_same_upper(times=times)
    if name in REMOUNT:
        pair.mount()
        pair.assert_same_tree(times=times)


def test_fallocate_modes_allocate_as_the_kernel_does(pair: Pair) -> None:
    """fallocate(2) reaches the upper file: sizes, allocated blocks and contents agree with overlayfs
    after plain, keep-size, punch-hole and zero-range calls on a lower file and on a new one."""
    pair.build([[F("big", bytes(range(256)) * 1024)]], upper=[])

    def calls(s: Side) -> list[tuple[int, int, bytes]]:
        seen = []
        for rel, args in [("big", ["-p", "-o", "4096", "-l", "8192"]), ("big", ["-z", "-o", "100", "-l", "50"]),
                          ("big", ["-n", "-o", "262144", "-l", "1048576"]), ("new", ["-l", "300000"]),
                          ("new", ["-p", "-o", "0", "-l", "65536"]), ("new", ["-o", "400000", "-l", "10"])]:
            rc, _, err = run_tool(["fallocate", *args, rel], cwd=s.p())
            assert rc == 0, err
            st = os.stat(s.p(rel))
            with open(s.p(rel), "rb") as f:
                seen.append((st.st_size, st.st_blocks, f.read()))
        return seen
    pair.same(calls)
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_copy_up_parents_keep_their_metadata(pair: Pair) -> None:
    pair.build([LOWER], upper=[])
    pair.same(p(os.chmod, "ld/sub/deep/file", mode=0o444))
    for s in pair.sides:
        assert s.upper is not None
    pair.assert_same_tree(times=True)
    pair.unmount()
    for rel in ["ld", "ld/sub", "ld/sub/deep", "ld/sub/deep/file"]:
        k, u = (os.lstat(os.path.join(s.upper, rel)) for s in pair.sides)  # type: ignore[arg-type]
        assert (u.st_mode, u.st_uid, u.st_gid, u.st_mtime_ns) == (k.st_mode, k.st_uid, k.st_gid, k.st_mtime_ns), rel
        assert util.xattrs(os.path.join(os.fsencode(pair.u.upper), os.fsencode(rel)), strip_private=True) == \
            util.xattrs(os.path.join(os.fsencode(pair.k.upper), os.fsencode(rel)), strip_private=True), rel


def test_open_handle_sees_copy_up(pair: Pair) -> None:
    """A reader that opened a lower file before copy-up sees the new data after it (as kernel
    overlayfs does since 4.19); fstat on it agrees too."""
    pair.build([[F("f", b"old contents\n"), F("g", b"g" * 10000)]], upper=[])
    with pair.opened("f", "g") as fd:
        pair.same(lambda s: os.pread(fd(s, "f"), 100, 0), "read before")
        pair.same(w("f", WR | os.O_TRUNC, b"new contents, longer\n"), "write")
        pair.same(lambda s: os.pread(fd(s, "f"), 100, 0), "old reader after copy-up")
        pair.same(lambda s: os.fstat(fd(s, "f")).st_size, "fstat old reader")
        pair.same(p(os.chmod, "g", mode=0o600), "chmod g")
        pair.same(w("g", WR, b"CHANGED", off=5000), "write g")
        pair.same(lambda s: os.pread(fd(s, "g"), 20, 4995), "reader of g after copy-up")
    pair.assert_same_upper()


def test_writer_then_reader_same_file(pair: Pair) -> None:
    pair.build([[F("f", b"0123456789")]], upper=[])
    with pair.opened("f", flags=os.O_RDWR) as fd:
        pair.same(lambda s: os.pwrite(fd(s, "f"), b"ab", 2), "pwrite")
        pair.same(lambda s: open(s.p("f"), "rb").read(), "read through another open")
        pair.same(lambda s: os.ftruncate(fd(s, "f"), 3), "ftruncate")
        pair.same(lambda s: os.fstat(fd(s, "f")).st_size, "fstat")
        pair.same(lambda s: os.fchmod(fd(s, "f"), 0o600), "fchmod")
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_unlinked_open_file_stays_readable(pair: Pair) -> None:
    pair.build([[F("f", b"still here")]], upper=[])
    with pair.opened("f") as fd:
        pair.same(p(os.unlink, "f"), "unlink")
        pair.same(lambda s: os.pread(fd(s, "f"), 100, 0), "read after unlink")
    pair.assert_same_upper()


# ---- whiteout dialect written


def _raw_upper(side: Side) -> dict[bytes, tuple[str, dict[bytes, bytes]]]:
    assert side.upper is not None
    res = {}
    for rel, absp, st in util.walk(os.fsencode(side.upper)):
        kind = "whiteout-chardev" if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 else \
            util.describe(absp, st, times=False, dir_meta=False, strip_private=False)["type"]
        res[rel] = (kind, util.xattrs(absp))
    return res


@pytest.mark.skipif(IMPL != "unionfs", reason="unionfs options")
@pytest.mark.parametrize("style,option,expect", [
    ("overlay", None, "overlay"), ("overlay", "whiteout=aufs", "aufs"), ("overlay", "whiteout=overlay", "overlay"),
    ("aufs", None, "aufs"), ("aufs", "whiteout=overlay", "overlay"), ("aufs", "whiteout=aufs", "aufs"),
])
def test_whiteout_dialect_written(pair: Pair, style: str, option: str | None, expect: str) -> None:
    pair.build([[F("f", b"f"), F("d/x", b"x"), F("e/y", b"y")]], upper=[], style=style,
               options=[option] if option else [])
    pair.same(p(os.unlink, "f"))
    pair.same(rmtree_mkdir("d"))
    pair.same(seq(p(os.unlink, "e/y"), p(os.rmdir, "e"), p(os.mkdir, "e")))
    pair.assert_same_upper()
    raw = _raw_upper(pair.u)
    if expect == "overlay":
        assert raw.get(b"f", ("missing",))[0] == "whiteout-chardev", raw
        for d in (b"d", b"e"):
            assert raw[d][1].get(b"trusted.overlay.opaque") == b"y", raw
        assert not any(os.path.basename(r).startswith(b".wh.") for r in raw), raw
    else:
        assert raw.get(b".wh.f", ("missing",))[0] == "file", raw
        assert b"f" not in raw
        for d in (b"d", b"e"):
            assert raw.get(d + b"/.wh..wh..opq", ("missing",))[0] == "file", raw
            assert not any(k.startswith(b"trusted.overlay") for k in raw[d][1]), raw
        assert not any(v[0] == "whiteout-chardev" for v in raw.values()), raw


@pytest.mark.skipif(IMPL != "unionfs", reason="aufs dialect is unionfs-only")
@pytest.mark.parametrize("style,option", [("aufs", None), ("overlay", "whiteout=aufs")])
def test_aufs_dialect_refuses_whiteout_names(tmp_path: Path, need_fuse: None, style: str,
                                             option: str | None) -> None:
    """AUFS refuses every name that begins with `.wh.` with EPERM (au_test_shwh at lookup)."""
    upper, lower, work, mnt = (tmp_path / n for n in ("upper", "lower", "work", "mnt"))
    for d in (upper, lower, work, mnt):
        d.mkdir()
    (lower / "x").write_bytes(b"x")
    digest = util.layer_digest(lower)
    m = util.mount_impl(style, [lower], upper, work if style == "overlay" else None, mnt,
                        [option] if option else [])
    try:
        ops = {
            "create": lambda: os.close(os.open(mnt / ".wh.new", os.O_CREAT | os.O_WRONLY)),
            "create-opq": lambda: os.close(os.open(mnt / ".wh..wh..opq", os.O_CREAT | os.O_WRONLY)),
            "mkdir": lambda: os.mkdir(mnt / ".wh.dir"),
            "symlink": lambda: os.symlink("x", mnt / ".wh.link"),
            "mknod": lambda: os.mknod(mnt / ".wh.fifo", 0o600 | stat.S_IFIFO),
            "link": lambda: os.link(mnt / "x", mnt / ".wh.hard"),
            "rename": lambda: os.rename(mnt / "x", mnt / ".wh.x"),
        }
        results = {k: call(v) for k, v in ops.items()}
        assert results == dict.fromkeys(ops, err("EPERM")), results
        assert sorted(os.listdir(mnt)) == ["x"]
    finally:
        util.unmount(m)
    assert util.normalise_upper(upper) == {b"": {"type": "dir", "mode": "0o755", "uid": 0, "gid": 0}}, \
        sorted(os.listdir(upper))
    assert util.layer_digest(lower) == digest


# ---- read-only unions: EROFS for every change

RO_OPS = {
    "create": w("new", WR | os.O_CREAT), "open-wronly": w("f", WR), "open-rdwr": w("f", os.O_RDWR),
    "open-trunc": w("f", WR | os.O_TRUNC), "truncate": p(os.truncate, "f", length=0),
    "mkdir": p(os.mkdir, "nd"), "rmdir": p(os.rmdir, "d"), "unlink": p(os.unlink, "f"),
    "rename": p(os.rename, "f", "g"), "link": p(os.link, "f", "h"),
    "symlink": lambda s: os.symlink("x", s.p("sl")), "mknod": mknod("fifo", stat.S_IFIFO),
    "chmod": p(os.chmod, "f", mode=0o600), "chown": p(os.chown, "f", uid=1, gid=1),
    "utime": lambda s: os.utime(s.p("f"), ns=(1, 1)), "setxattr": p(os.setxattr, "f", attribute="user.a", value=b"1"),
    "removexattr": p(os.removexattr, "f", attribute="user.x"),
    "access-w": p(os.access, "f", mode=os.W_OK), "open-rdonly": w("f", os.O_RDONLY),
    "create-missing-parent": w("nope/new", WR | os.O_CREAT),
}


@pytest.mark.parametrize("how", ["no-upper", "aufs-all-ro", "o-ro"])
def test_read_only_union_gives_erofs(pair: Pair, how: str) -> None:
    layers = [[F("f", b"f", xattrs={"user.x": b"1"}), D("d")], [F("g2", b"")]]
    if how == "no-upper":
        pair.build(layers, upper=None)
    elif how == "aufs-all-ro":
        if IMPL != "unionfs":
            pytest.skip("AUFS branch modes are unionfs-only")
        pair.build(layers, upper=None, style="aufs-modes", dialect="aufs")
    else:
        pair.build(layers, upper=[F("u", b"u")], options=["ro"], kernel_options=["ro"])
    results = {name: pair.both(op) for name, op in RO_OPS.items()}
    bad = {n: r for n, r in results.items() if r[0] != r[1]}
    assert not bad, f"(kernel, {IMPL}) differ: {bad}"
    assert results["create"][0] == err("EROFS")
    pair.assert_same_tree()
    if how == "o-ro":
        pair.assert_same_upper()


# ---- crash safety


def _make_big_lower(path: Path, size: int, every: int = 4 << 20) -> None:
    """A file with real data spread through it (1 MiB of random data every ``every`` bytes, holes
    between)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for off in range(0, size, every):
            f.seek(off)
            f.write(chunk[: min(len(chunk), size - off)])
        f.truncate(size)


def _files_under(root: Path) -> dict[str, int]:
    res = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            fp = os.path.join(dirpath, n)
            try:
                st = os.lstat(fp)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                res[os.path.relpath(fp, root)] = st.st_size
    return res


def _sigkill_mid_copy_up(tmp_path: Path, size: int, style: str) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    big = lower / "big"
    _make_big_lower(big, size)
    lower_hash = util.file_sha256(big)
    digest = util.layer_digest(lower)
    workdir = work if style == "overlay" else None
    m = util.mount_impl(style, [lower], upper, workdir, mnt)
    assert m.proc is not None
    caught = False
    writer = None
    try:
        # chmod forces a full copy-up of the data; it runs in a child so it can hang or fail freely
        writer = subprocess.Popen([sys.executable, "-c", f"import os; os.chmod({str(mnt / 'big')!r}, 0o600)"],
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and writer.poll() is None:
            partial = {k: v for k, v in {**_files_under(upper), **_files_under(work)}.items() if v > 0}
            if partial:
                os.kill(m.proc.pid, signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
        m.proc.wait(timeout=30)
    finally:
        if m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait()
        util.umount(mnt)
        if writer is not None:
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
    if not caught:
        pytest.fail(f"the copy-up of {size} bytes finished before it could be interrupted; use a bigger file")
    assert util.layer_digest(lower) == digest, "lower branch changed"
    assert util.file_sha256(big) == lower_hash
    # the final name in the upper layer is either absent or complete
    up = upper / "big"
    if up.exists():
        assert up.stat().st_size == size and util.file_sha256(up) == lower_hash, "partial file at the final name"
    # remount: the union shows the whole file, then a normal copy-up works and is complete
    m = util.mount_impl(style, [lower], upper, workdir, mnt)
    try:
        st = os.stat(mnt / "big")
        assert st.st_size == size
        assert util.file_sha256(mnt / "big") == lower_hash, "union shows a partial file after the crash"
        assert sorted(os.listdir(mnt)) == ["big"], "temporary files are visible"
        os.chmod(mnt / "big", 0o600)
        assert util.file_sha256(mnt / "big") == lower_hash
    finally:
        util.unmount(m)
    assert util.file_sha256(upper / "big") == lower_hash
    assert util.layer_digest(lower) == digest


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_sigkill_during_copy_up(tmp_path: Path, need_fuse: None, style: str) -> None:
    _sigkill_mid_copy_up(tmp_path, 128 << 20, style)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_sigkill_during_copy_up_1gib(tmp_path: Path, need_fuse: None, style: str) -> None:
    _sigkill_mid_copy_up(tmp_path, 1 << 30, style)


@pytest.mark.parametrize("style", ["overlay", pytest.param("aufs", marks=pytest.mark.slow)])
def test_o_trunc_copies_no_data(tmp_path: Path, need_fuse: None, style: str) -> None:
    """Opening a big lower file with O_TRUNC copies it up without its data: no file with data ever
    appears in the upper or work dir while the open runs."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    _make_big_lower(lower / "big", 512 << 20, every=128 << 20)
    digest = util.layer_digest(lower)
    m = util.mount_impl(style, [lower], upper, work if style == "overlay" else None, mnt)
    seen: dict[str, int] = {}
    try:
        code = f"import os; fd = os.open({str(mnt / 'big')!r}, os.O_WRONLY | os.O_TRUNC); os.write(fd, b'x')"
        writer = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 120
        while writer.poll() is None and time.monotonic() < deadline:
            seen.update({k: v for k, v in {**_files_under(upper), **_files_under(work)}.items() if v > 1})
            time.sleep(0.001)
        assert writer.wait(timeout=60) == 0
        assert (mnt / "big").read_bytes() == b"x"
    finally:
        util.unmount(m)
    assert not seen, f"data was copied during an O_TRUNC copy-up: {seen}"
    assert (upper / "big").read_bytes() == b"x"
    assert util.layer_digest(lower) == digest


@pytest.mark.skipif(IMPL != "unionfs", reason="kernel overlayfs and fuse-overlayfs update lower atimes")
def test_reads_leave_lower_atime_alone(tmp_path: Path, need_fuse: None) -> None:
    """Lower branches are not written, not even their atimes where avoidable (O_NOATIME)."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    util.render_layer(lower, [F("f", b"data"), F("d/x", b"x"), L("link", "f")], "overlay")
    upper.mkdir()
    mnt.mkdir()
    before = {rel: os.lstat(os.path.join(os.fsencode(lower), rel)).st_atime_ns
              for rel in (b"", b"f", b"d", b"d/x")}
    m = util.mount_impl("aufs", [lower], upper, None, mnt)
    try:
        assert (mnt / "f").read_bytes() == b"data"
        assert (mnt / "d" / "x").read_bytes() == b"x"
        assert sorted(os.listdir(mnt)) == ["d", "f", "link"] and os.listdir(mnt / "d") == ["x"]
        assert os.readlink(mnt / "link") == "f"
    finally:
        util.unmount(m)
    after = {rel: os.lstat(os.path.join(os.fsencode(lower), rel)).st_atime_ns for rel in before}
    assert after == before


def test_big_copy_up_is_complete(pair: Pair) -> None:
    data = os.urandom(1 << 20) * 20
    pair.build([[F("big", data)]], upper=[])
    pair.same(w("big", WR, b"END", off=len(data)), "append to big lower file")
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_errno_of_failed_copy_up_on_full_upper(pair: Pair) -> None:
    """Copy-up into an upper that is too small fails with ENOSPC on both, leaving no partial file."""
    pair.build([[F("big", b"x" * (6 << 20)), F("small", b"s")]], upper=[], mount=False)
    for s in pair.sides:
        fs = s.base / "small-fs"
        fs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs)], check=True)
        pair.cleanup.append(fs)
        s.upper, s.work = fs / "upper", fs / "work"
        s.upper.mkdir()
        s.work.mkdir()
    pair.mount()
    res = pair.same(w("big", WR, b"!", off=0), "write triggering copy-up")
    assert res == err("ENOSPC")
    pair.same(w("small", WR, b"!", off=0), "a small copy-up still works")
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_many_ops_sequence(pair: Pair) -> None:
    """A shell session of mixed changes, like a container build step."""
    pair.build([LOWER, LOWER_BOTTOM], upper=[])
    script = ("set -e; rm -f lf; rm -rf ld && mkdir ld && echo new > ld/file; mv lf2 lf2.moved; "
              "chmod 700 lf2.moved; mkdir -p a/b/c; echo x > a/b/c/x; ln -s a/b/c link; ln lf2.moved hard; "
              "rm -rf merged; mkdir merged; touch -d @1234567890 merged; echo appended >> bottom-only; "
              "mv wo wo2; rm -rf wo2")
    res = pair.same(sh(["sh", "-c", script]), "script")
    assert res[0] == 0, res
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_errno_spot_checks(pair: Pair) -> None:
    """A few errnos people rely on, asserted against the kernel's own answers."""
    pair.build([LOWER], upper=[])
    assert pair.same(p(os.rename, "ld", "ld2")) == err("EXDEV")
    assert pair.same(p(os.rmdir, "ld")) == err("ENOTEMPTY")
    assert pair.same(lambda s: renameat2(s.p("lf"), s.p("lf2"), RENAME_NOREPLACE)) == err("EEXIST")
    assert errno.EXDEV


def _threads(fns: list[Callable[[], Any]]) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(fns)) as ex:
        futs = [ex.submit(call, fn) for fn in fns]
        return [f.result() for f in futs]


def test_concurrent_copy_up_of_one_file(pair: Pair) -> None:
    """Many writers hit the same lower file at once: one copy-up, every append kept, no leftovers."""
    pair.build([[F("shared", b"base\n"), F("d/f", b"f")]], upper=[])

    def run(s: Side) -> Any:
        def writer(i: int) -> Callable[[], Any]:
            def go() -> None:
                fd = os.open(s.p("shared"), os.O_WRONLY | os.O_APPEND)
                try:
                    for j in range(20):
                        os.write(fd, b"w%02d-%02d\n" % (i, j))
                finally:
                    os.close(fd)
            return go
        res = _threads([writer(i) for i in range(8)])
        with open(s.p("shared"), "rb") as f:
            lines = f.read().split(b"\n")
        return res, lines[0], sorted(lines[1:])
    pair.same(run, "8 concurrent appenders")  # same lines (the interleaving may differ)

    def without_shared_hash(tree: dict[bytes, dict[str, Any]]) -> dict[bytes, dict[str, Any]]:
        tree[b"shared"].pop("sha256")
        return tree
    util.assert_trees_equal(*(without_shared_hash(util.snapshot(s.p())) for s in pair.sides))
    pair.unmount()
    util.assert_trees_equal(*(without_shared_hash(util.normalise_upper(s.upper)) for s in pair.sides  # type: ignore
                              ), what="upper layer")


def test_concurrent_copy_up_of_siblings(pair: Pair) -> None:
    """Copy-ups of many files below the same lower directories at once: parents copied up once, with
    their metadata, every change kept."""
    files = [F(f"a/b/c/f{i:02d}", b"%d" % i, mode=0o644) for i in range(24)]
    pair.build([[D("a", mode=0o751, uid=3), D("a/b", mode=0o715, gid=4), D("a/b/c", mode=0o705), *files]],
               upper=[])

    def run(s: Side) -> Any:
        return _threads([lambda i=i: os.chmod(s.p(f"a/b/c/f{i:02d}"), 0o600 + i % 8) for i in range(24)])
    pair.same(run, "24 concurrent chmods")
    pair.assert_same_tree(times=True)
    pair.assert_same_upper(times=True)


@pytest.fixture
def shared_pair(need_fuse: None, need_overlay: None) -> Any:
    """A Pair in a directory other users can reach (pytest's tmp_path is private to root)."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="unionfs-perm-", dir="/var/tmp"))
    base.chmod(0o755)
    pr = Pair(base)
    for side in pr.sides:
        side.base.chmod(0o755)
    try:
        yield pr
    finally:
        try:
            pr.unmount(final=True)
        finally:
            pr.check_lowers()
            shutil.rmtree(base)


USER = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--"]

AS_USER = {
    "read-secret": "cat secret",
    "read-own": "cat userfile",
    "append-root-file": "echo x >> rootfile",
    "append-own-file": "echo x >> userfile",
    "create-in-root-dir": "touch rootdir/new",
    "create-in-own-dir": "touch userdir/new && mkdir userdir/sub && ln -s x userdir/link",
    "create-in-sticky": "touch sticky/mine",
    "unlink-in-own-dir": "rm userdir/x",
    "unlink-in-root-dir": "rm -f rootdir/y",
    "unlink-sticky-other": "rm -f sticky/rootowned",
    "chmod-root-file": "chmod 777 rootfile",
    "chmod-own-file": "chmod 700 userfile",
    "chown-own-file": "chown 0 userfile",
    "utime-own-file": "touch -d @1000000000 userfile",
    "utime-root-file": "touch -d @1000000000 rootfile",
    "rename-in-own-dir": "mv userdir/x userdir/x2",
    "write-group-writable": "echo g >> groupfile",
    "list-noexec-dir": "ls closed",
}


@pytest.mark.parametrize("name", list(AS_USER))
def test_permissions_as_another_user(shared_pair: Pair, name: str) -> None:
    """An unprivileged user gets the kernel's answers through the union (allow_other)."""
    shared_pair.build([[
        F("secret", b"s", mode=0o600), F("userfile", b"u", mode=0o600, uid=1000, gid=1000),
        F("rootfile", b"r", mode=0o644), F("groupfile", b"g", mode=0o664, gid=1000),
        D("rootdir"), F("rootdir/y", b"y"), D("userdir", uid=1000, gid=1000), F("userdir/x", b"x", uid=1000),
        D("sticky", mode=0o1777), F("sticky/rootowned", b"", mode=0o666), D("closed", mode=0o700),
        F("closed/in", b""),
    ]], upper=[], options=["allow_other"], kernel_options=[])
    for s in shared_pair.sides:
        assert s.upper is not None
        s.upper.chmod(0o755)
    shared_pair.same(sh([*USER, "sh", "-c", AS_USER[name]]), name)
    shared_pair.assert_same_tree(times=name.startswith("utime"))
    shared_pair.assert_same_upper()


def _st(s: Side, rel: str) -> Any:
    st = os.lstat(s.p(rel))
    return (stat.filemode(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else None, st.st_uid,
            st.st_gid, st.st_nlink if not stat.S_ISDIR(st.st_mode) else None)


def test_attributes_stay_coherent(pair: Pair) -> None:
    """After each change, what stat says (through the same and other names) matches the kernel:
    no stale size, mode, owner, link count or times from a cache."""
    pair.build([[F("f", b"0123456789", mtime=T0), H("f2", "f"), D("d", mtime=T0), F("d/x", b"x", mtime=T0),
                 F("g", b"g")]], upper=[])
    fds: dict[Path, int] = {}

    def fd(s: Side) -> int:
        if s.base not in fds:
            fds[s.base] = os.open(s.p("f"), os.O_RDWR)
        return fds[s.base]

    def changed_since(s: Side, rel: str, what: str) -> bool:
        return getattr(os.lstat(s.p(rel)), what) > T0 * 10**9

    steps: list[tuple[str, Callable[[Side], Any]]] = [
        ("stat f", lambda s: _st(s, "f")),
        ("open rdwr + stat", lambda s: (fd(s), _st(s, "f"), _st(s, "f2"))[1:]),
        ("write at end", lambda s: os.pwrite(fd(s), b"A" * 100, 10)),
        ("stat after write", lambda s: (_st(s, "f"), os.fstat(fd(s)).st_size, changed_since(s, "f", "st_mtime_ns"))),
        ("ftruncate", lambda s: os.ftruncate(fd(s), 5)),
        ("stat after ftruncate", lambda s: (_st(s, "f"), os.fstat(fd(s)).st_size)),
        ("chmod via f", lambda s: os.chmod(s.p("f"), 0o600)),
        ("stat f and f2", lambda s: (_st(s, "f"), _st(s, "f2"))),
        ("chown", lambda s: os.chown(s.p("f"), 7, 8)),
        ("stat after chown", lambda s: (_st(s, "f"), os.fstat(fd(s)).st_uid)),
        ("utime exact", lambda s: os.utime(s.p("f"), ns=(T0 * 10**9 + 1, T0 * 10**9 + 2))),
        ("stat times", lambda s: (os.lstat(s.p("f")).st_mtime_ns, os.lstat(s.p("f")).st_atime_ns)),
        ("link", lambda s: os.link(s.p("f"), s.p("f3"))),
        ("nlink after link", lambda s: (_st(s, "f"), _st(s, "f3"))),
        ("unlink f3", lambda s: os.unlink(s.p("f3"))),
        ("nlink after unlink", lambda s: _st(s, "f")),
        ("create in d", lambda s: open(s.p("d/new"), "wb").close()),
        ("d mtime moved", lambda s: (changed_since(s, "d", "st_mtime_ns"), sorted(os.listdir(s.p("d"))))),
        ("rename f", lambda s: os.rename(s.p("f"), s.p("f-renamed"))),
        ("stat old and new", lambda s: (call(_st, s, "f"), _st(s, "f-renamed"), os.fstat(fd(s)).st_size)),
        ("replace g by a dir", lambda s: (os.unlink(s.p("g")), os.mkdir(s.p("g")))),
        ("stat g", lambda s: (_st(s, "g"), os.listdir(s.p("g")))),
        ("setxattr", lambda s: os.setxattr(s.p("f-renamed"), "user.k", b"v")),
        ("listxattr", lambda s: (sorted(os.listxattr(s.p("f-renamed"))), os.getxattr(s.p("f-renamed"), "user.k"))),
        ("append via path", lambda s: (w("f-renamed", WR | os.O_APPEND, b"tail")(s), _st(s, "f-renamed"))),
        ("fstat old fd", lambda s: os.fstat(fd(s)).st_size),
        ("read via old fd", lambda s: os.pread(fd(s), 100, 0)),
    ]
    try:
        for name, step in steps:
            pair.same(step, name)
    finally:
        for x in fds.values():
            os.close(x)
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_user_overlay_xattrs_set_through_the_union_are_plain_data(pair: Pair) -> None:
    """A user may set user.overlay.* xattrs on files; for kernel overlayfs (trusted.* mode) they are
    ordinary data. unionfs treats user.overlay.opaque in a branch as a marker, so it must store what a
    user sets under another name: after a remount the directory is still merged and the value reads back."""
    pair.build([[F("merged/low", b"low"), F("f", b"f")]], upper=[D("merged"), F("merged/up", b"up")])
    pair.same(p(os.setxattr, "merged", attribute="user.overlay.opaque", value=b"y"), "setxattr opaque")
    pair.same(p(os.setxattr, "f", attribute="user.overlay.foo", value=b"1"), "setxattr other")
    pair.same(p(os.setxattr, "f", attribute="user.fuseoverlayfs.opaque", value=b"y"), "setxattr fo")
    pair.assert_same_tree()
    pair.unmount()
    pair.mount()
    k = pair.assert_same_tree()
    assert b"merged/low" in k
    pair.same(lambda s: os.getxattr(s.p("merged"), "user.overlay.opaque"), "value reads back")
