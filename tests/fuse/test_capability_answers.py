"""security.capability is asked for at every write(2) of a FUSE file (FUSE has no SB_NOSEC) and, by
a diff of a container's layer (containers/storage), for every entry: the libfuse shim answers "none"
itself for the nodes the server knows have none, and once asked, listings tell it of their
entries.  What a user must see is only the right answer: a capability below is read, one set or
removed through the mount is seen at once, and a file that has none says ENODATA."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")
CAP = "security.capability"
# struct vfs_cap_data, revision 2, effective: CAP_NET_RAW (13) permitted
NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
# and CAP_NET_BIND_SERVICE (10)
BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


@contextmanager
def mounted(tmp_path: Path) -> Iterator[Path]:
    upper, lower, mnt = (tmp_path / n for n in ("upper", "lower", "mnt"))
    for d in (upper, lower, mnt, lower / "first", lower / "d"):
        d.mkdir(parents=True, exist_ok=True)
    (lower / "first" / "f").write_bytes(b"")
    for name in ("none", "other", "capable"):
        (lower / "d" / name).write_bytes(b"x")
    os.setxattr(lower / "d" / "capable", CAP, NET_RAW)
    subprocess.run([UNIONFS, "mount", f"{upper}:{lower}", str(mnt)], check=True, timeout=60)
    try:
        yield mnt
    finally:
        subprocess.run([UNIONFS, "umount", str(mnt)], check=True, timeout=60)


def cap_of(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, CAP, follow_symlinks=False)
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None


def test_capabilities_are_answered_right_after_a_listing(tmp_path: Path, need_fuse: None) -> None:
    with mounted(tmp_path) as mnt:
        assert cap_of(mnt / "first" / "f") is None          # the first ask: listings now tell the shim
        assert sorted(os.listdir(mnt / "d")) == ["capable", "none", "other"]
        before = util.requests_served(mnt, "getxattr")
        assert cap_of(mnt / "d" / "none") is None
        assert cap_of(mnt / "d" / "other") is None
        assert util.requests_served(mnt, "getxattr") == before, "the shim answers for the files listed without one"
        assert cap_of(mnt / "d" / "capable") == NET_RAW
        assert util.requests_served(mnt, "getxattr") > before


def test_a_capability_set_or_removed_through_the_mount_is_seen_at_once(tmp_path: Path,
                                                                       need_fuse: None) -> None:
    with mounted(tmp_path) as mnt:
        assert cap_of(mnt / "first" / "f") is None
        os.listdir(mnt / "d")
        assert cap_of(mnt / "d" / "none") is None
        os.setxattr(mnt / "d" / "none", CAP, BIND)
        assert cap_of(mnt / "d" / "none") == BIND
        os.removexattr(mnt / "d" / "capable", CAP)
        assert cap_of(mnt / "d" / "capable") is None
        os.setxattr(mnt / "d" / "capable", CAP, BIND)
        assert cap_of(mnt / "d" / "capable") == BIND
        with open(mnt / "d" / "other", "ab") as f:          # a write asks, and is answered none
            f.write(b"y")
        assert cap_of(mnt / "d" / "other") is None
    upper = tmp_path / "upper" / "d"
    assert os.getxattr(upper / "none", CAP) == BIND and os.getxattr(upper / "capable", CAP) == BIND
    assert os.getxattr(tmp_path / "lower" / "d" / "capable", CAP) == NET_RAW   # below: untouched


def test_a_file_made_again_under_a_known_name_is_asked_again(tmp_path: Path, need_fuse: None) -> None:
    """A name removed and made again is a new file: what the shim knew of the old one is not its."""
    with mounted(tmp_path) as mnt:
        assert cap_of(mnt / "first" / "f") is None
        os.listdir(mnt / "d")
        assert cap_of(mnt / "d" / "none") is None
        os.unlink(mnt / "d" / "none")
        (mnt / "d" / "none").write_bytes(b"new")
        os.setxattr(mnt / "d" / "none", CAP, BIND)
        assert cap_of(mnt / "d" / "none") == BIND
