"""Rename of merged directories with ``-o redirect_dir=on``, beside kernel overlayfs mounted with
``redirect_dir=on``: the visible tree, the errnos and the upper layer (redirects included) agree,
and an upper written by one is read the same by the other."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from util import IMPL, D, F, Pair, Side, W, err, mount_impl, mount_kernel, snapshot, unmount

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(IMPL != "unionfs", reason="unionfs option")]

ON = ["redirect_dir=on"]
REDIRECT = "trusted.overlay.redirect"

LOWER = [D("a"), F("a/f", b"lower f"), D("a/sub"), F("a/sub/g", b"g"), D("b"), F("b/h", b"h"),
         D("x"), F("x/y", b"y"), D("deep/er"), F("deep/er/z", b"z")]


def _build(pair: Pair, lowers: list[list[Any]] | None = None, upper: list[Any] | None = None,
           dialect: str = "overlay") -> Pair:
    return pair.build(lowers or [LOWER], upper or [], dialect=dialect, options=ON, kernel_options=ON)


def _redirects(upper: Path) -> dict[str, bytes]:
    """Every redirect in an upper layer, in either dialect, by path."""
    out: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        try:
            out[rel] = os.getxattr(dirpath, REDIRECT)
        except OSError:
            pass
        if ".wh..wh..redirect" in files:
            out[rel] = os.fsencode(os.readlink(os.path.join(dirpath, ".wh..wh..redirect")))
    return out


def _same(pair: Pair, ops: list[Callable[[Side], Any]]) -> None:
    for op in ops:
        pair.same(op)
        pair.assert_same_tree()


def _mv(a: str, b: str) -> Callable[[Side], Any]:
    def mv(s: Side) -> None:
        os.rename(s.p(a), s.p(b))
    mv.__name__ = f"mv {a} {b}"
    return mv


def test_without_the_option_a_merged_directory_is_exdev(pair: Pair) -> None:
    pair.build([LOWER], [])
    assert pair.same(_mv("a", "a2")) == err("EXDEV")


@pytest.mark.parametrize("dialect", ["overlay", "aufs"])
def test_rename_same_parent_and_across(pair: Pair, dialect: str) -> None:
    _build(pair, dialect=dialect)
    _same(pair, [_mv("a", "a2"), _mv("b", "x/b2"), _mv("a2/sub", "a2/sub2"), _mv("deep/er", "er")])
    pair.same(lambda s: os.listdir(s.p("a2/sub2")))
    pair.same(lambda s: open(s.p("x/b2/h"), "rb").read())
    ku, uu = pair.k.upper, pair.u.upper
    assert ku is not None and uu is not None
    pair.assert_same_upper()
    assert _redirects(uu) == _redirects(ku) == {"a2": b"a", "x/b2": b"/b", "a2/sub2": b"sub", "er": b"/deep/er"}


def test_nested_renames_and_rename_back(pair: Pair) -> None:
    _build(pair)
    _same(pair, [_mv("a", "a2"), _mv("a2", "x/a3"), _mv("x/a3/sub", "sub"), _mv("x", "x2"),
                 _mv("x2/a3", "a"), _mv("sub", "a/sub")])
    pair.assert_same_upper()
    assert pair.k.upper is not None and pair.u.upper is not None
    assert _redirects(pair.u.upper) == _redirects(pair.k.upper)


def test_rmdir_readdir_and_new_names_after(pair: Pair) -> None:
    _build(pair)
    _same(pair, [_mv("a", "a2"),
                 lambda s: os.mkdir(s.p("a")),                       # over the whiteout left behind
                 lambda s: os.listdir(s.p("a")),
                 lambda s: os.unlink(s.p("a2/f")),
                 lambda s: os.rmdir(s.p("a2")),                      # ENOTEMPTY: sub is there
                 lambda s: shutil.rmtree(s.p("a2/sub")),
                 lambda s: os.rmdir(s.p("a2")),
                 lambda s: os.rename(s.p("b"), s.p("a")),             # onto an empty directory
                 lambda s: open(s.p("a/new"), "wb").close(),
                 _mv("x", "b")])
    pair.assert_same_upper()


def test_exchange_and_overwrite(pair: Pair) -> None:
    from unionfs.core.sysx import AT_FDCWD, RENAME_EXCHANGE, renameat2
    _build(pair, upper=[D("u"), F("u/k", b"k")])
    _same(pair, [lambda s: renameat2(AT_FDCWD, s.p("a"), AT_FDCWD, s.p("b"), RENAME_EXCHANGE),
                 lambda s: renameat2(AT_FDCWD, s.p("u"), AT_FDCWD, s.p("x"), RENAME_EXCHANGE),
                 _mv("deep", "u/deep"), _mv("b", "x")])
    pair.assert_same_upper()
    assert pair.k.upper is not None and pair.u.upper is not None
    assert _redirects(pair.u.upper) == _redirects(pair.k.upper)


def test_rotated_layers(pair: Pair) -> None:
    """The upper of one mount made the top lower of the next: its redirects are followed there, and
    its directories, lower now, move again."""
    _build(pair)
    _same(pair, [_mv("a", "a2"), _mv("x", "a2/x"), _mv("deep/er", "deep/er2")])
    pair.unmount()
    for side in pair.sides:
        assert side.upper is not None and side.work is not None
        side.lowers.insert(0, side.upper)
        side.upper = side.base / "upper2"
        side.upper.mkdir()
        shutil.rmtree(side.work)
        side.work.mkdir()
    pair.mount()
    pair.assert_same_tree()
    _same(pair, [_mv("a2", "a3"), _mv("a3/x", "x"), _mv("deep", "x/deep"),
                 lambda s: os.listdir(s.p("x/deep/er2")), _mv("x/deep/er2", "er"),
                 lambda s: os.rmdir(s.p("a3/sub")), lambda s: os.unlink(s.p("a3/sub/g")),
                 lambda s: os.rmdir(s.p("a3/sub"))])
    pair.assert_same_upper()
    assert pair.k.upper is not None and pair.u.upper is not None
    assert _redirects(pair.u.upper) == _redirects(pair.k.upper)


@pytest.mark.parametrize("writer", ["kernel", "unionfs"])
def test_upper_read_by_the_other(tmp_path: Path, need_fuse: None, need_overlay: None, writer: str) -> None:
    """An upper with redirects written by one implementation shows the same tree in the other."""
    from layers_util import render_layer
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    render_layer(lower, LOWER, "overlay")
    for d in (upper, work, mnt):
        d.mkdir()

    def mount(impl: str) -> Any:
        if impl == "kernel":
            return mount_kernel([lower], upper, work, mnt, ON)
        return mount_impl("overlay", [lower], upper, work, mnt, ON)

    m = mount(writer)
    try:
        for a, b in (("a", "a2"), ("b", "a2/b"), ("a2/sub", "sub"), ("deep", "x/deep"), ("x", "x2")):
            os.rename(mnt / a, mnt / b)
        written = snapshot(mnt)
    finally:
        unmount(m)
    assert _redirects(upper)
    m = mount("unionfs" if writer == "kernel" else "kernel")
    try:
        assert snapshot(mnt) == written
    finally:
        unmount(m)


@pytest.mark.parametrize("mode,expect", [("follow", "followed"), ("nofollow", "EPERM"), ("off", "ignored")])
def test_reading_modes(tmp_path: Path, need_fuse: None, need_overlay: None, mode: str, expect: str) -> None:
    """follow reads redirects without making them; nofollow refuses a redirected directory (EPERM),
    as overlayfs; off (the default) looks names up as they are."""
    from layers_util import render_layer
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    render_layer(lower, LOWER, "overlay")
    for d in (upper, work, mnt):
        d.mkdir()
    m = mount_kernel([lower], upper, work, mnt, ON)
    try:
        os.rename(mnt / "a", mnt / "a2")
    finally:
        unmount(m)
    m = mount_impl("overlay", [lower], upper, work, mnt, [f"redirect_dir={mode}"])
    try:
        try:
            names = sorted(os.listdir(mnt / "a2"))
        except OSError as e:
            names = [os.strerror(e.errno or 0)]
        assert names == {"followed": ["f", "sub"], "EPERM": [os.strerror(1)], "ignored": []}[expect]
        if mode == "follow":
            assert err("EXDEV") == _errno(lambda: os.rename(mnt / "b", mnt / "b2"))
    finally:
        unmount(m)


def _errno(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OSError as e:
        import errno
        return err(errno.errorcode[e.errno or 0])


def _rd(path: str, redirect: bytes, opaque: bool = False) -> D:
    return D(path, opaque=opaque, xattrs={REDIRECT: redirect})


@pytest.mark.parametrize("lowers", [
    # an opaque directory on an absolute redirect's path ends the stack after its branch
    [[_rd("c", b"/x/a")], [D("x", opaque=True), F("x/a/mid")], [F("x/a/bottom")]],
    # a relative redirect in a lower branch, followed by the branches below it
    [[_rd("c", b"b")], [_rd("b", b"d"), F("b/mid")], [F("d/bottom"), F("b/no")]],
    # an absolute redirect through a directory that has a redirect of its own
    [[_rd("c", b"/p/q")], [_rd("p", b"/r"), F("p/q/mid")], [F("r/q/bottom"), F("p/q/no")]],
    # a whiteout on the way ends the stack; a missing name skips a branch
    [[_rd("c", b"/m/n")], [W("m")], [F("m/n/no")]],
    [[_rd("c", b"/m/n")], [F("other")], [F("m/n/bottom")]],
], ids=["opaque-on-path", "relative-chain", "redirect-on-path", "whiteout", "missing"])
def test_redirects_in_lower_branches(pair: Pair, lowers: list[list[Any]]) -> None:
    pair.build(lowers, [], options=ON, kernel_options=ON)
    pair.assert_same_tree()
    pair.same(lambda s: sorted(os.listdir(s.p("c"))))
    _same(pair, [_mv("c", "c2"), lambda s: sorted(os.listdir(s.p("c2")))])
    pair.assert_same_upper()
