"""Live statistics, from the handlers called directly (no mount): each request moves the counters it
should, and a real snapshot survives JSON and renders as the table `unionfs stats` prints."""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pytest
from pyfuse3 import FUSEError
from test_operations import CTX, Fs, fs  # noqa: F401 - fs is the fixture

from unionfs.server import stats


def _req(snap: dict[str, Any], name: str) -> dict[str, Any]:
    r: dict[str, Any] = snap["requests"][name]
    return r


def _by_branch(snap: dict[str, Any]) -> dict[int, int]:
    return {b["index"]: b["count"] for b in snap["lookups"]["by_branch"]}


async def test_lookups_count_by_serving_branch_and_negative(fs: Fs) -> None:  # noqa: F811
    await fs.lookup(b"ufile")           # upper (branch 0)
    await fs.lookup(b"lfile")           # lower (branch 1)
    await fs.lookup(b"ldir")
    await fs.lookup(b"nothing")         # negative
    await fs.lookup(b"gone")            # whited out: negative too
    snap = fs.ops.stats_snapshot()
    assert _by_branch(snap) == {0: 1, 1: 2}
    assert snap["lookups"]["negative"] == 2
    lookup = _req(snap, "lookup")
    assert lookup["count"] == 5 and lookup["errors"] == 0
    assert sum(lookup["hist"]) == 5
    assert 0 < lookup["max_ns"] <= lookup["total_ns"]
    assert snap["lookups"]["by_branch"][0]["path"] == str(fs.upper)


async def test_a_write_to_a_lower_file_counts_one_copy_up_of_its_bytes(fs: Fs) -> None:  # noqa: F811
    assert fs.ops.stats_snapshot()["copy_ups"]["files"] == 0
    fi = await fs.ops.open(await fs.ino(b"lfile"), os.O_WRONLY, CTX)
    await fs.ops.write(fi.fh, 0, b"L")
    during = fs.ops.stats_snapshot()
    await fs.ops.release(fi.fh)
    after = fs.ops.stats_snapshot()
    copied = after["copy_ups"]
    assert (copied["files"], copied["dirs"], copied["bytes"]) == (1, 0, len(b"lower data"))
    assert 0 < copied["max_ns"] <= copied["total_ns"]
    assert during["handles"]["files"] == 1 and after["handles"]["files"] == 0
    assert during["fds"]["files"] == 1 and after["fds"]["files"] == 0
    for name in ("open", "write", "release"):
        assert _req(after, name)["count"] == 1, name
    assert "copy-ups: 1 file, 0 directories, 10 B in " in stats.format_snapshot(after)


async def test_a_file_made_in_a_lower_directory_copies_the_directory_up(fs: Fs) -> None:  # noqa: F811
    fi, _ = await fs.ops.create(await fs.ino(b"ldir"), b"new", 0o100644, os.O_WRONLY, CTX)
    await fs.ops.release(fi.fh)
    copied = fs.ops.stats_snapshot()["copy_ups"]
    assert (copied["files"], copied["dirs"]) == (0, 1)


async def test_failed_requests_count_as_errors(fs: Fs) -> None:  # noqa: F811
    for _ in range(2):
        with pytest.raises(FUSEError) as e:
            await fs.ops.unlink(fs.root, b"nothing", CTX)
        assert e.value.errno == errno.ENOENT
    with pytest.raises(FUSEError):
        await fs.ops.opendir(await fs.ino(b"ufile"), CTX)   # ENOTDIR, raised as FUSEError itself
    snap = fs.ops.stats_snapshot()
    assert (_req(snap, "unlink")["count"], _req(snap, "unlink")["errors"]) == (2, 2)
    assert _req(snap, "opendir")["errors"] == 1


async def test_repeated_requests_are_answered_from_the_caches(fs: Fs) -> None:  # noqa: F811
    ino = await fs.ino(b"lfile")
    before = fs.ops.stats_snapshot()["caches"]
    for _ in range(3):
        await fs.ops.getattr(ino, CTX)
    await fs.lookup(b"ufile")
    after = fs.ops.stats_snapshot()["caches"]
    assert after["stats"]["hits"] - before["stats"]["hits"] >= 3
    assert after["stats"]["misses"] - before["stats"]["misses"] == 1    # ufile's first stat
    assert after["replies"]["hits"] - before["replies"]["hits"] >= 3
    assert after["listings"]["hits"] > before["listings"]["hits"]     # the root's, read again
    assert after["listings"]["misses"] == before["listings"]["misses"] == 1
    assert after["stats"]["kept"] >= 2


async def test_listing_and_open_directories_are_counted(fs: Fs) -> None:  # noqa: F811
    fh = await fs.ops.opendir(fs.root, CTX)
    assert fs.ops.stats_snapshot()["handles"]["dirs"] == 1
    await fs.ops.releasedir(fh)
    assert sorted(await fs.listdir()) == sorted([b".", b"..", b"ufile", b"dir", b"lfile", b"ldir"])
    snap = fs.ops.stats_snapshot()
    assert snap["handles"]["dirs"] == 0
    assert _req(snap, "readdir")["count"] == 1 and _req(snap, "opendir")["count"] == 2


async def test_a_snapshot_is_json_and_renders_as_a_table(fs: Fs) -> None:  # noqa: F811
    await fs.read_all(b"lfile")
    await fs.lookup(b"nothing")
    for _ in range(20):
        await fs.ops.getattr(fs.root, CTX)
    snap = json.loads(json.dumps(fs.ops.stats_snapshot()))
    assert snap["version"] == stats.VERSION
    assert snap["fds"]["total"] > snap["fds"]["branch_dirs"] >= 2
    assert snap["memory"]["peak_rss_bytes"] >= snap["memory"]["rss_bytes"] > 1 << 20
    assert snap["mount"]["branches"] == [{"index": 0, "path": str(fs.upper), "mode": "rw"},
                                         {"index": 1, "path": str(fs.lower), "mode": "ro"}]
    text = stats.format_snapshot(snap)
    lines = text.splitlines()
    assert f"  0  rw  {fs.upper}" in lines and f"  1  ro  {fs.lower}" in lines
    head = next(i for i, line in enumerate(lines) if line.startswith("request "))
    assert lines[head].split() == ["request", "count", "errors", "total", "mean", "p50<=", "p99<=", "max"]
    shown = [line.split()[0] for line in lines[head + 1:head + 1 + len(snap["requests"])]]
    by_time = sorted(snap["requests"], key=lambda n: (-snap["requests"][n]["total_ns"], n))
    assert shown == by_time
    getattr_row = lines[head + 1 + shown.index("getattr")].split()
    assert getattr_row[1:3] == ["20", "0"]
    assert len({len(lines[head + 1 + i]) for i in range(len(shown))} | {len(lines[head])}) == 1  # aligned
    assert "copy-ups: none" in lines
    assert "lookups answered: branch 1: 1, negative: 1" in lines
    assert "open: 0 files, 0 directories" in text


def test_a_snapshot_of_another_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version 2"):
        stats.format_snapshot({"version": 2})


def test_histogram_buckets_are_powers_of_four_nanoseconds() -> None:
    assert [stats.bucket(ns) for ns in (0, 1, 3, 4, 1023, 1024, 4095, 4096, (1 << 64) - 1)] == \
        [0, 1, 1, 2, 5, 6, 6, 7, 32]
    assert len(stats.Requests().hist) == stats.BUCKETS == 33
    assert stats.bucket_bounds_ns()[5:8] == [1024, 4096, 16384]
    hist = [0] * 6 + [98, 0, 1, 1]      # 98 requests of 1-4 µs, one of 16-64 µs, one of 64-256 µs
    assert stats.quantile_ns(hist, 200_000, 0.5) == 4096
    assert stats.quantile_ns(hist, 200_000, 0.99) == 65536
    assert stats.quantile_ns(hist, 200_000, 1.0) == 200_000    # no more than the longest
    assert stats.quantile_ns([], 0, 0.5) == 0
