"""The first open of a file for reading starts reading it from the disk before the kernel asks for
its data (a cold `tar c` then waits for the disk less): seen from outside as the real file's
pages arriving in the page cache after an open through the mount that reads nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.fuse

SIZE = 64 << 10


def _cached(path: Path) -> bool:
    """Whether any of the real file *path* is in the page cache (mincore(2), through fincore: a
    read that may not wait would start reading it)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out) > 0


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cached_soon(path: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not _cached(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_first_open_for_reading_reads_ahead(tmp_path: Path, need_fuse: None) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    data = os.urandom(SIZE)
    for name in ("opened", "untouched"):
        (lower / name).write_bytes(data)
    m = util.mount_impl("overlay", [lower], upper, work, mnt)
    try:
        for name in ("opened", "untouched"):
            assert os.stat(mnt / name).st_size == SIZE     # looked up: the daemon knows them
            _evict(lower / name)
        if _cached(lower / "untouched"):
            pytest.skip("this filesystem keeps pages that POSIX_FADV_DONTNEED was asked to drop")
        fd = os.open(mnt / "opened", os.O_RDONLY)
        try:
            assert _cached_soon(lower / "opened"), "an open for reading read nothing ahead"
            assert os.pread(fd, SIZE, 0) == data
        finally:
            os.close(fd)
        # a file only looked up is not read at all
        assert not _cached(lower / "untouched")
    finally:
        util.unmount(m)
