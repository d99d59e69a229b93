"""FUSE forget is honoured: what the kernel drops, the daemon drops (its memory does not grow without
bound), and inode numbers stay the same across a forget and a new lookup."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import util


def _open_dir_fds(pid: int) -> int:
    """Directory fds the daemon holds (each known merged directory holds one per branch)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.path.isdir(os.readlink(f"/proc/{pid}/fd/{fd}")):
                count += 1
        except OSError:
            continue
    return count


def _drop_kernel_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("2\n")   # dentries and inodes: the kernel forgets


def test_forget_releases_nodes_and_inode_numbers_stay(tmp_path: Path, need_fuse: None) -> None:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for i in range(300):
        sub = lower / f"d{i}"
        sub.mkdir()
        (sub / "f").write_text(str(i))
        (upper / f"d{i}").mkdir()      # merged: two branch fds per directory
    m = util.mount_impl("overlay", [lower], upper, work, mnt)
    try:
        assert m.proc is not None
        base = _open_dir_fds(m.proc.pid)
        inos = {p.name: p.stat().st_ino for p in mnt.iterdir()}
        file_ino = (mnt / "d7" / "f").stat().st_ino
        walked = sum(1 for _ in mnt.rglob("*"))
        assert walked == 600
        grown = _open_dir_fds(m.proc.pid)
        assert grown >= base + 2 * 300, (base, grown)
        # The kernel sends its FORGETs asynchronously: wait (bounded) for the daemon to process them.
        deadline = time.monotonic() + 20
        while True:
            _drop_kernel_caches()
            shrunk = _open_dir_fds(m.proc.pid)
            if shrunk < base + 30 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert shrunk < base + 30, f"daemon kept {shrunk - base} directory fds after the kernel forgot"
        # Looked up afresh, every object answers with the number it had.
        assert {p.name: p.stat().st_ino for p in mnt.iterdir()} == inos
        assert (mnt / "d7" / "f").stat().st_ino == file_ino
    finally:
        util.unmount(m)
