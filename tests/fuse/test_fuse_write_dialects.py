"""The write path, continued: the whiteout dialect written to the upper branch, and read-only
unions (EROFS for every change), against kernel overlayfs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import util
from util import (
    IMPL,
    D,
    F,
    Pair,
    Side,
    call,
    err,
)
from write_ops import (
    WR,
    mknod,
    p,
    rmtree_mkdir,
    seq,
    w,
)

pytestmark = pytest.mark.fuse


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
