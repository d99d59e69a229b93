"""Live statistics of a real mount: work done through the mount moves the counters a snapshot
shows.  The server (`stats_server.py`) answers its snapshot on a pipe, standing in for the mount's
control channel; `unionfs stats MNT` itself is tested with the channel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import stats_server
import util

from unionfs.conformance import harness
from unionfs.server import stats

pytestmark = pytest.mark.fuse


@contextmanager
def stats_mount(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """Mount a union of an empty upper over a lower with ``a`` (10 bytes) and ``d/x``, ``d/y``;
    yield (its mount point, its lower, the server); unmount."""
    upper, lower, work, mnt = (tmp_path / n for n in ("upper", "lower", "work", "mnt"))
    for d in (upper, lower, work, mnt, lower / "d"):
        d.mkdir()
    (lower / "a").write_bytes(b"0123456789")
    for n in ("x", "y"):
        (lower / "d" / n).write_bytes(n.encode())
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, stats_server.__file__, str(upper), str(lower), str(work),
                                 str(mnt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    harness.started_logs.append(str(log))     # the log checker reads it after the test
    try:
        util.wait_for_mount(mnt, proc)
        yield mnt, lower, proc
    finally:
        util.umount(mnt, proc if proc.poll() is None else None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def snapshot(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"stats\n")
    proc.stdin.flush()
    snap: dict[str, Any] = json.loads(proc.stdout.readline())
    return snap


def test_work_through_a_mount_shows_in_its_statistics(tmp_path: Path, need_fuse: None) -> None:
    with stats_mount(tmp_path) as (mnt, lower, proc):
        first = snapshot(proc)
        assert first["version"] == stats.VERSION and first["copy_ups"]["files"] == 0
        assert sorted(os.listdir(mnt / "d")) == ["x", "y"]
        assert (mnt / "a").read_bytes() == b"0123456789"
        with open(mnt / "a", "ab") as f:            # copy-up of 10 bytes, then a write
            f.write(b"!")
        assert not (mnt / "missing").exists()       # a negative lookup
        (mnt / "new").write_bytes(b"n" * 5000)
        held = open(mnt / "new", "rb")              # noqa: SIM115 - held open across the snapshot
        try:
            snap = snapshot(proc)
        finally:
            held.close()
        text = stats.format_snapshot(snap)

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
