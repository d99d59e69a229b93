"""The write path as another user, attribute coherence after changes, and overlay-private xattr
names set through the union, against kernel overlayfs."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from util import (
    D,
    F,
    H,
    Pair,
    Side,
    call,
)
from write_ops import (
    T0,
    WR,
    p,
    sh,
    w,
)

pytestmark = pytest.mark.fuse


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
