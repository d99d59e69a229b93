"""A reply's attributes built in C by the libfuse shim (`compat.attr_builder`) against the same reply
built through pyfuse3's properties one by one: every field the kernel gets must agree, for files,
lower hard links (shown st_ino not the node id), merged directories (st_nlink 1) and times before
1970; and the builder is not used where its self-check cannot vouch for it."""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from unionfs.core.attrs import Stat
from unionfs.core.branches import open_stack
from unionfs.core.whiteout import Dialect
from unionfs.server import compat
from unionfs.server.operations import Operations

FIELDS = ("st_ino", "generation", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
          "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "attr_timeout",
          "entry_timeout")

needs_builder = pytest.mark.skipif(compat.attr_builder() is None, reason="the shim cannot build replies")


def _seen(a: Any) -> tuple[Any, ...]:
    """What the kernel gets of *a*: the named fields and the st_ino its stat shows."""
    assert compat._SHOWN_INO_OFFSET is not None
    shown = ctypes.c_uint64.from_address(id(a) + compat._SHOWN_INO_OFFSET).value
    return (*(getattr(a, f) for f in FIELDS), shown)


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Operations]:
    """upper: file, dir/u; lower: dir/l, lfile, link (a hard link of lfile), old (mtime before 1970)."""
    upper, lower, work = tmp_path / "upper", tmp_path / "lower", tmp_path / "work"
    for d in (upper, lower, work, upper / "dir", lower / "dir"):
        d.mkdir()
    (upper / "file").write_bytes(b"x" * 5000)
    (upper / "dir" / "u").write_bytes(b"u")
    (lower / "dir" / "l").write_bytes(b"l")
    (lower / "lfile").write_bytes(b"lower")
    os.link(lower / "lfile", lower / "link")
    (lower / "old").write_bytes(b"o")
    os.utime(lower / "old", ns=(-1_500_000_001, -86_400_000_000_001))
    os.mknod(upper / "fifo", stat.S_IFIFO | 0o640)
    stack = open_stack([(str(upper), True), (str(lower), False)], str(work), aufs_work=False)
    try:
        o = Operations.over(stack, Dialect.OVERLAY, timeout=1.5)
        try:
            yield o
        finally:
            o.union.close()
    finally:
        stack.close()


@needs_builder
def test_replies_built_in_c_are_those_built_field_by_field(ops: Operations) -> None:
    assert ops._build_in_c is not None
    union = ops.union
    root = union.table.root
    for name in (b"file", b"dir", b"lfile", b"link", b"old", b"fifo"):
        found = union.lookup(root, name)
        assert found is not None
        node, st = found
        in_c = ops._build_attr(node, st)
        ops._build_in_c, kept = None, ops._build_in_c
        try:
            by_field = ops._build_attr(node, st)
        finally:
            ops._build_in_c = kept
        assert _seen(in_c) == _seen(by_field), name
    link = union.lookup(root, b"link")
    assert link is not None and link[0].id != link[0].ino     # the case that shows another st_ino
    merged = union.lookup(root, b"dir")
    assert merged is not None and ops._build_attr(*merged).st_nlink == 1
    old = union.lookup(root, b"old")
    assert old is not None and ops._build_attr(*old).st_mtime_ns == -86_400_000_000_001


@needs_builder
def test_the_builder_refuses_what_is_not_a_packed_stat() -> None:
    build = compat.attr_builder()
    assert build is not None
    with pytest.raises(ValueError):
        build(b"short", 2, 2, -1, 1.0)
    good = Stat.of(os.stat("/"))
    with pytest.raises(TypeError):
        build(good, 2, 2, -1)  # type: ignore[call-arg]
    assert build(good, 2, 2, -1, 1.0).st_size == os.stat("/").st_size


def test_no_builder_without_the_st_ino_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_SHOWN_INO_OFFSET", None)
    assert compat.attr_builder() is None


def test_metacopy_replies_are_built_field_by_field(tmp_path: Path) -> None:
    upper, lower, work = tmp_path / "upper", tmp_path / "lower", tmp_path / "work"
    for d in (upper, lower, work):
        d.mkdir()
    stack = open_stack([(str(upper), True), (str(lower), False)], str(work), aufs_work=False)
    try:
        o = Operations.over(stack, Dialect.OVERLAY, metacopy=True, redirect_dir="on")
        try:
            assert o._build_in_c is None
        finally:
            o.union.close()
    finally:
        stack.close()
