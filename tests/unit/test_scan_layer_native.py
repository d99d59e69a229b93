"""`merge.scan_layer` read in C (unionfs/core/_native.c, ``scan_dir``) against the pure Python
reading it falls back to: the same visible names in the same order with the same is-dir, the same
whited-out names and the same opaque marker, for every kind of entry a branch may hold; and the
directory fd it was given left usable, at its start."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from unionfs.core import merge
from unionfs.core.branches import DirFd

Scan = Callable[[int], tuple[list[tuple[bytes, bool]], set[bytes], bool]]

native = pytest.mark.skipif(merge._scan_dir is None, reason="unionfs.core._native not built")


@pytest.fixture
def branch(tmp_path: Path) -> Iterator[DirFd]:
    """Every kind of entry: files, a directory, a symlink, a fifo, a 0/0 and a 1/3 character device,
    an AUFS whiteout of a name present too, the opaque marker, another meta name, non-UTF-8 bytes."""
    root = os.fsencode(tmp_path)
    for name in (b"file", b"a", b"\xff\xfename", b"dir-like-file.wh.", b"x" * 255):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"data")
    os.mkdir(os.path.join(root, b"dir"))
    os.symlink(b"dir", os.path.join(root, b"link"))
    os.mkfifo(os.path.join(root, b"fifo"))
    os.mknod(os.path.join(root, b"gone"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(os.path.join(root, b"null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    for name in (b".wh.a", b".wh.hidden", b".wh..wh..opq", b".wh..wh.plnk"):
        open(os.path.join(root, name), "wb").close()
    fd = DirFd(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
    try:
        yield fd
    finally:
        os.close(fd)


@native
def test_the_c_reading_is_the_python_one(branch: DirFd) -> None:
    python = merge._scan_layer_py(branch)
    assert merge.scan_layer(branch) == python
    names, whiteouts, opaque = python
    assert opaque
    assert whiteouts == {b"a", b"hidden", b"gone"}
    assert dict(names) == {b"file": False, b"\xff\xfename": False, b"dir-like-file.wh.": False,
                           b"x" * 255: False, b"dir": True, b"link": False, b"fifo": False,
                           b"null": False}


@native
def test_an_empty_branch_and_one_without_markers(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    fd = DirFd(os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY))
    try:
        assert merge.scan_layer(fd) == merge._scan_layer_py(fd) == ([], set(), False)
        (tmp_path / "d" / "f").write_bytes(b"")
        assert merge.scan_layer(fd) == ([(b"f", False)], set(), False)
    finally:
        os.close(fd)


@native
def test_the_fd_is_left_at_its_start_and_open(branch: DirFd) -> None:
    first = merge.scan_layer(branch)
    assert merge.scan_layer(branch) == first        # read again from the start
    assert len(os.listdir(branch)) == 14            # and the fd itself still reads everything
    assert os.fstat(branch).st_ino != 0


@native
def test_a_bad_fd_fails_as_scandir_does() -> None:
    with pytest.raises(OSError):
        merge.scan_layer(987654)
    with pytest.raises(NotADirectoryError):
        with open("/dev/null") as f:
            merge.scan_layer(f.fileno())
