"""`mount -o remount,ro|rw MNT` through mount(8), on unionfs as on the kernel's overlayfs.

mount(8) hands a remount of a FUSE mount to mount.fuse3, which runs the mount's program with
``SOURCE MNT -o ro,remount,...``: each case here goes that way, for a ``fuse.unionfs`` mount made by
``mount -t fuse.unionfs A:B MNT``, a ``fuse.unionfs-overlay`` one, and the kernel's overlayfs.
"""
from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from util import is_mounted, program, umount, wait_for_mount

from unionfs.core import mountinfo

KINDS = ["kernel", "unionfs", "unionfs-overlay"]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def flags(mnt: Path) -> set[str]:
    found = mountinfo.mount_at(os.fsencode(mnt))
    assert found is not None, f"{mnt} is not mounted"
    return set(found.options.split(","))


def mount(kind: str, tmp: Path, *options: str) -> Path:
    lower, upper, work, mnt = (tmp / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(exist_ok=True)
    (lower / "old").write_text("old\n")
    opts = [*options, f"lowerdir={lower},upperdir={upper},workdir={work}"]
    if kind == "kernel":
        cmd = ["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(mnt)]
    elif kind == "unionfs-overlay":
        cmd = ["mount", "-t", "fuse.unionfs-overlay", "overlay", "-o", ",".join(opts), str(mnt)]
    else:
        # Under -o ro only a top branch marked =rw is opened for writing (A:B alone is all read-only).
        cmd = ["mount", "-t", "fuse.unionfs", *(["-o", ",".join(options)] if options else []),
               f"{upper}=rw:{lower}", str(mnt)]
    r = run(*cmd)
    assert r.returncode == 0, r.stderr
    if kind != "kernel":
        wait_for_mount(mnt)
    return mnt


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    mnt = tmp_path / "mnt"
    if is_mounted(mnt):
        umount(mnt)


def write(path: Path) -> int:
    """0 when *path* could be created, else the errno."""
    try:
        path.write_text("new\n")
    except OSError as e:
        return e.errno or -1
    return 0


@pytest.mark.parametrize("kind", KINDS)
def test_remount_read_only_and_back(kind: str, tmp: Path) -> None:
    mnt = mount(kind, tmp)
    before = flags(mnt) - {"rw"}
    assert write(mnt / "a") == 0
    r = run("mount", "-o", "remount,ro", str(mnt))
    assert r.returncode == 0, r.stderr
    assert "ro" in flags(mnt) and flags(mnt) - {"ro"} == before   # the other flags kept
    assert write(mnt / "b") == errno.EROFS
    assert (mnt / "old").read_text() == "old\n" and (mnt / "a").read_text() == "new\n"
    r = run("mount", "-o", "remount,rw", str(mnt))
    assert r.returncode == 0, r.stderr
    assert "rw" in flags(mnt)
    assert write(mnt / "c") == 0
    assert {"a", "c"} <= {p.name for p in (tmp / "upper").iterdir()}
    assert not (tmp / "upper" / "b").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_mounted_read_only_then_read_write(kind: str, tmp: Path) -> None:
    mnt = mount(kind, tmp, "ro")
    assert "ro" in flags(mnt)
    assert write(mnt / "a") == errno.EROFS
    r = run("mount", "-o", "remount,rw", str(mnt))
    assert r.returncode == 0, r.stderr
    assert write(mnt / "a") == 0
    (mnt / "old").write_text("changed\n")   # a copy-up after the remount
    assert (tmp / "upper" / "old").read_text() == "changed\n"
    assert (tmp / "lower" / "old").read_text() == "old\n"


@pytest.mark.parametrize("kind", KINDS)
def test_read_only_refused_while_a_file_is_open_for_writing(kind: str, tmp: Path) -> None:
    mnt = mount(kind, tmp)
    with open(mnt / "busy", "w") as f:
        r = run("mount", "-o", "remount,ro", str(mnt))
        assert r.returncode != 0
        assert "rw" in flags(mnt)
        f.write("still writable\n")
    assert (mnt / "busy").read_text() == "still writable\n"


def test_unionfs_remount_command(tmp: Path) -> None:
    mnt = mount("unionfs", tmp, "nosuid")
    r = run(program("unionfs"), "remount", "-o", "ro", str(mnt))
    assert r.returncode == 0, r.stderr
    assert {"ro", "nosuid"} <= flags(mnt)
    r = run(program("unionfs"), "remount", "-o", "rw,noexec", str(mnt))
    assert r.returncode == 0, r.stderr
    assert {"rw", "nosuid", "noexec"} <= flags(mnt)
    assert write(mnt / "a") == 0


def test_remount_of_what_is_not_unionfs(tmp_path: Path) -> None:
    other = tmp_path / "tmpfs"
    other.mkdir()
    assert run("mount", "-t", "tmpfs", "tmpfs", str(other)).returncode == 0
    try:
        r = run(program("unionfs"), "remount", "-o", "ro", str(other))
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [f"unionfs: {str(other)!r} is a tmpfs mount, not unionfs"]
        assert "rw" in flags(other)
    finally:
        run("umount", str(other))
    r = run(program("unionfs"), "remount", "-o", "ro", str(tmp_path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is not a mount point" in r.stderr


def test_mount_helper_form_mounts(tmp: Path) -> None:
    """`unionfs SOURCE MNT -o OPTS`, as mount.fuse3 runs it, is `unionfs mount -o OPTS SOURCE MNT`."""
    (tmp / "lower").mkdir()
    (tmp / "lower" / "f").write_text("f\n")
    (tmp / "upper").mkdir()
    (tmp / "mnt").mkdir()
    r = run(program("unionfs"), f"{tmp}/upper:{tmp}/lower", str(tmp / "mnt"), "-o", "rw,nodev")
    assert r.returncode == 0, r.stderr
    assert (tmp / "mnt" / "f").read_text() == "f\n"
    assert "nodev" in flags(tmp / "mnt")
    r = run(program("unionfs"), "mout", "a", "b")    # a typo is still a typo, not a mount
    assert r.returncode == 2 and "No such command 'mout'" in r.stderr


def test_read_only_default_branches_stay_untouched(tmp: Path) -> None:
    """`-o ro A:B`: no branch is writable, nothing is made in A (no work dir), and a later
    remount read-write leaves every change refused (overlayfs without an upper refuses the remount)."""
    for d in ("a", "b", "mnt"):
        (tmp / d).mkdir()
    (tmp / "b" / "f").write_text("f\n")
    r = run("mount", "-t", "fuse.unionfs", "-o", "ro", f"{tmp}/a:{tmp}/b", str(tmp / "mnt"))
    assert r.returncode == 0, r.stderr
    wait_for_mount(tmp / "mnt")
    assert list((tmp / "a").iterdir()) == []
    assert run("mount", "-o", "remount,rw", str(tmp / "mnt")).returncode == 0
    assert write(tmp / "mnt" / "new") == errno.EROFS
    assert list((tmp / "a").iterdir()) == []
