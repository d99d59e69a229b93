"""What the kernel still holds of a name across a live branch change: an O_PATH descriptor (no open
file: the node alone), as a path walk the change overtook holds the node it found.

A file whose name another branch now serves with a file shows that file through the old node too
(fstat, and opening it again through /proc/self/fd); a name gone with its branch is ENOENT, as after
an unlink.  No error other than AUFS's reaches the user: before, the old node answered ENOENT to
the GETATTR of a name every branch list has (the race test's writers saw it at open, from the
kernel's permission check).
"""
from __future__ import annotations

import errno
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")


def ok(*args: str) -> None:
    r = subprocess.run([UNIONFS, *args], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def mnt(tmp_path: Path, need_fuse: None) -> Iterator[Path]:
    """U (writable top) over B (shared/f); P, to be added, with its own shared/f and own/x;
    mounted AUFS-style at M."""
    for d in ("U", "B/shared", "P/shared", "P/own", "M"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "B" / "shared" / "f").write_text("B\n")
    (tmp_path / "P" / "shared" / "f").write_text("P, longer\n")
    (tmp_path / "P" / "own" / "x").write_text("P\n")
    ok("mount", f"{tmp_path}/U=rw:{tmp_path}/B", str(tmp_path / "M"))
    yield tmp_path / "M"
    while util.is_mounted(tmp_path / "M"):
        util.umount(str(tmp_path / "M"))


def reopened(fd: int) -> str:
    with open(f"/proc/self/fd/{fd}") as f:
        return f.read()


def test_a_node_held_across_changes_shows_the_files_its_name_stands_for(mnt: Path) -> None:
    pool = mnt.parent / "P"
    fd = os.open(mnt / "shared" / "f", os.O_PATH)
    try:
        assert os.fstat(fd).st_size == 2
        ok("branch", "add", str(mnt), str(pool))
        assert os.fstat(fd).st_size == len("P, longer\n")      # was ENOENT
        assert os.fstat(fd).st_ino == os.stat(mnt / "shared" / "f").st_ino
        assert reopened(fd) == "P, longer\n"
        ok("branch", "del", str(mnt), str(pool))
        assert os.fstat(fd).st_size == 2
        assert reopened(fd) == "B\n"
    finally:
        os.close(fd)


def test_a_node_whose_name_went_with_its_branch_is_enoent(mnt: Path) -> None:
    pool = mnt.parent / "P"
    ok("branch", "add", str(mnt), str(pool))
    fds = [os.open(mnt / "own" / "x", os.O_PATH), os.open(mnt / "own", os.O_PATH)]
    try:
        ok("branch", "del", str(mnt), str(pool))
        for fd in fds:
            with pytest.raises(OSError) as e:
                os.fstat(fd)
            assert e.value.errno == errno.ENOENT
        assert not (mnt / "own").exists()
        ok("branch", "add", str(mnt), str(pool))
        assert (mnt / "own" / "x").read_text() == "P\n"          # a new walk finds it again
    finally:
        for fd in fds:
            os.close(fd)


def test_writeback_asks_a_rebound_file_for_its_capability(tmp_path: Path, need_fuse: None) -> None:
    """With -o writeback the shim answers the kernel's security.capability question for a node
    known to have none: a node rebound to a file that has one must be asked again (else a write by
    a user would not drop the capability)."""
    for d in ("U", "B/shared", "P/shared", "M"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "B" / "shared" / "f").write_text("B\n")
    (tmp_path / "P" / "shared" / "f").write_text("P\n")
    cap = struct.pack("<5I", 0x02000000, 1 << 10, 0, 0, 0)   # v2, cap_net_bind_service permitted
    os.setxattr(tmp_path / "P" / "shared" / "f", "security.capability", cap)
    mnt = tmp_path / "M"
    ok("mount", "-o", "writeback", f"{tmp_path}/U=rw:{tmp_path}/B", str(mnt))
    try:
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "shared" / "f", "security.capability")
        assert e.value.errno == errno.ENODATA
        fd = os.open(mnt / "shared" / "f", os.O_PATH)     # the same node throughout
        try:
            ok("branch", "add", str(mnt), str(tmp_path / "P"))
            assert os.getxattr(mnt / "shared" / "f", "security.capability") == cap
        finally:
            os.close(fd)
    finally:
        util.umount(str(mnt))
