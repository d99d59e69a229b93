"""Redirects (-o redirect_dir) without a mount: what is written, and the lower directories of a
moved directory found again after the fd cache closed them (their routes).  What the kernel makes
of the same is in tests/fuse/test_redirect_dir.py."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from unionfs.core.branches import DirFd, open_stack
from unionfs.core.nodes import Node
from unionfs.core.redirect import WH_REDIRECT, read_redirect
from unionfs.core.union import Union
from unionfs.core.whiteout import Dialect


def _make(root: Path, *files: str) -> None:
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)


def _walk(u: Union, path: bytes) -> Node:
    node = u.table.root
    for part in [p for p in path.split(b"/") if p]:
        found = u.lookup(node, part)
        assert found is not None, part
        node = found[0]
    return node


def _union(tmp: Path, dialect: Dialect, mode: str = "on") -> tuple[Union, Path]:
    upper, lower, work = tmp / "upper", tmp / "lower", tmp / "work"
    for d in (upper, work):
        d.mkdir(exist_ok=True)
    _make(lower, "a/f", "a/sub/g", "x/y")
    stack = open_stack([(str(upper), True), (str(lower), False)], str(work), aufs_work=False)
    return Union(stack, dialect, redirect_dir=mode), upper


@pytest.mark.parametrize("dialect", [Dialect.OVERLAY, Dialect.AUFS])
async def test_moved_directory_found_again_after_its_fds_were_closed(tmp_path: Path, dialect: Dialect) -> None:
    u, upper = _union(tmp_path, dialect)
    try:
        root = u.table.root
        await u.rename(root, b"a", _walk(u, b"x"), b"a2", 0)
        fd = os.open(upper / "x/a2", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert read_redirect(DirFd(fd)) == b"/a"
        finally:
            os.close(fd)
        if dialect is Dialect.AUFS:
            assert os.readlink(upper / "x/a2" / os.fsdecode(WH_REDIRECT)) == "/a"
        moved = _walk(u, b"x/a2")
        sub = _walk(u, b"x/a2/sub")
        assert [bd.route for bd in moved.dirs] == [None, (b"a",)]
        # Every cached branch directory closed: the lower ones are found again by their routes.
        u.table.next_request()
        u.table.fds.capacity = 0
        u.table.fds.trim()
        moved.listing = sub.listing = None
        u.table.next_request()
        assert sorted(u.listing(sub)) == [b"g"]
        assert sorted(u.listing(moved)) == [b"f", b"sub"]
        assert sorted(u.listing(root)) == [b"x"]
    finally:
        u.close()
        u.stack.close()


async def test_follow_reads_but_does_not_move(tmp_path: Path) -> None:
    u, _ = _union(tmp_path, Dialect.OVERLAY, "follow")
    try:
        with pytest.raises(OSError) as exc:
            await u.rename(u.table.root, b"a", u.table.root, b"b", 0)
        assert exc.value.errno == errno.EXDEV
    finally:
        u.close()
        u.stack.close()


def test_invalid_redirects_are_eio(tmp_path: Path) -> None:
    for value in (b"a/b", b"/a//b", b"/"):
        d = tmp_path / f"d{len(value)}{value.count(b'/')}"
        d.mkdir()
        os.setxattr(d, "user.overlay.redirect", value)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(OSError) as exc:
                read_redirect(DirFd(fd))
            assert exc.value.errno == errno.EIO
        finally:
            os.close(fd)
