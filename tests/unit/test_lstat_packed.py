"""`DirFd.lstat_packed`: the stat a cold listing takes of each entry, packed in C straight from
fstatat (unionfs/core/_native.c), must be exactly `Stat.of(lstat)` with the (st_dev, st_ino,
st_mode) beside it, never follow a symlink, and fail as os.stat does; the pure Python fallback (the
C helper not built) must answer the same."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from unionfs.core import branches
from unionfs.core.attrs import Stat
from unionfs.core.branches import DirFd

Impl = Callable[[type[Stat], int, bytes], tuple[Stat, int, int, int]]


def _impls() -> list[Impl]:
    try:
        from unionfs.core._native import lstat_at
    except ImportError:
        return [branches._lstat_packed_py]
    return [lstat_at, branches._lstat_packed_py]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[DirFd]:
    (tmp_path / "file").write_bytes(b"x" * 12345)
    (tmp_path / "dir").mkdir()
    os.symlink("dir", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo", 0o640)
    (tmp_path / "old").write_bytes(b"")
    os.utime(tmp_path / "old", ns=(-1_500_000_001, -86_400_000_000_001))
    fd = DirFd(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", _impls())
def test_packed_as_stat_of_lstat(tree: DirFd, impl: Impl) -> None:
    for name in (b"file", b"dir", b"link", b"fifo", b"old"):
        st = os.stat(name, dir_fd=tree, follow_symlinks=False)
        packed, dev, ino, mode = impl(Stat, tree, name)
        assert type(packed) is Stat
        assert packed == Stat.of(st), name
        assert (dev, ino, mode) == (st.st_dev, st.st_ino, st.st_mode)
    assert stat.S_ISLNK(impl(Stat, tree, b"link")[3])
    assert impl(Stat, tree, b"old")[0].st_mtime_ns == -86_400_000_000_001
    assert impl(Stat, tree, b"file")[0].st_size == 12345


@pytest.mark.parametrize("impl", _impls())
def test_fails_as_os_stat_does(tree: DirFd, impl: Impl) -> None:
    with pytest.raises(FileNotFoundError):
        impl(Stat, tree, b"missing")
    with pytest.raises(NotADirectoryError):
        impl(Stat, tree, b"file/below")
    with pytest.raises(ValueError):
        impl(Stat, tree, b"nul\0name")
    with pytest.raises(OSError) as e:
        impl(Stat, 987654, b"file")
    assert e.value.errno == errno.EBADF


def test_dirfd_method_answers_the_packed_stat(tree: DirFd) -> None:
    packed, dev, ino, mode = tree.lstat_packed(b"dir")
    assert stat.S_ISDIR(mode) and packed.st_ino == ino and packed.st_dev == dev
