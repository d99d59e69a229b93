"""Live statistics of a real mount: work done through the mount moves the counters that
``unionfs stats MNT`` (the table) and ``unionfs stats --json MNT`` (the snapshot) show, asked over the
mount's control channel as a user asks."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import util

from unionfs.server import stats

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")


@contextmanager
def stats_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Mount a union of an empty upper over a lower with ``a`` (10 bytes) and ``d/x``, ``d/y``;
    yield (its mount point, its lower); unmount."""
    upper, lower, mnt = (tmp_path / n for n in ("upper", "lower", "mnt"))
    for d in (upper, lower, mnt, lower / "d"):
        d.mkdir()
    (lower / "a").write_bytes(b"0123456789")
    for n in ("x", "y"):
        (lower / "d" / n).write_bytes(n.encode())
    # Without FUSE passthrough, so that writes reach the daemon to be counted (with it, as root, the
    # kernel writes open files of the upper branch itself).
    subprocess.run([UNIONFS, "mount", "-o", "passthrough=off", f"{upper}:{lower}", str(mnt)], check=True,
                   timeout=60)
    try:
        yield mnt, lower
    finally:
        subprocess.run([UNIONFS, "umount", str(mnt)], check=True, timeout=60)


def unionfs_stats(mnt: Path, *args: str) -> str:
    r = subprocess.run([UNIONFS, "stats", *args, str(mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def snapshot(mnt: Path) -> dict[str, Any]:
    snap: dict[str, Any] = json.loads(unionfs_stats(mnt, "--json"))
    return snap


def test_work_through_a_mount_shows_in_its_statistics(tmp_path: Path, need_fuse: None) -> None:
    with stats_mount(tmp_path) as (mnt, lower):
        first = snapshot(mnt)
        assert first["version"] == stats.VERSION and first["copy_ups"]["files"] == 0
        assert sorted(os.listdir(mnt / "d")) == ["x", "y"]
        assert (mnt / "a").read_bytes() == b"0123456789"
        with open(mnt / "a", "ab") as f:            # copy-up of 10 bytes, then a write
            f.write(b"!")
        assert not (mnt / "missing").exists()       # a negative lookup
        (mnt / "new").write_bytes(b"n" * 5000)
        held = open(mnt / "new", "rb")              # noqa: SIM115 - held open across the snapshot
        try:
            snap = snapshot(mnt)
        finally:
            held.close()
        text = unionfs_stats(mnt)

    copied = snap["copy_ups"]
    assert (copied["files"], copied["bytes"]) == (1, 10)
    by_branch = {b["path"]: b["count"] for b in snap["lookups"]["by_branch"]}
    assert by_branch[str(lower)] >= 2                # d and a (and d's entries, if looked up)
    assert snap["lookups"]["negative"] >= 1
    req = snap["requests"]
    assert req["create"]["count"] == 1
    assert req["write"]["count"] >= 2 and req["write"]["errors"] == 0
    assert req["lookup"]["count"] >= 3
    for r in req.values():
        assert sum(r["hist"]) == r["count"] and r["max_ns"] <= r["total_ns"]
    assert snap["handles"]["files"] >= 1            # `new`, held open
    assert snap["fds"]["total"] >= snap["fds"]["branch_dirs"] + snap["fds"]["files"]
    assert snap["memory"]["peak_rss_bytes"] >= snap["memory"]["rss_bytes"] > 1 << 20
    assert snap["uptime_s"] > first["uptime_s"]
    assert "copy-ups: 1 file, 0 directories, 10 B in " in text
    assert next(line for line in text.splitlines() if line.startswith("request ")).split()[1] == "count"


def test_stats_of_a_path_that_is_not_a_union(tmp_path: Path) -> None:
    r = subprocess.run([UNIONFS, "stats", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
