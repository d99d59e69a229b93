"""``-o writeback``, the kernel's writeback cache on a union: small writes gathered, the times the
kernel keeps written back without copy-ups or EIO, and the capability check of every write
answered right.

Each test runs the same steps on kernel overlayfs (the oracle) and on unionfs mounted with
``-o writeback``.  The one known difference (a truncate to the current size keeps the mtime, as on
fuse-overlayfs) is in docs/performance.md."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import util
from util import F, Pair

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")
WB = ["writeback"]
CAPS = b"security.capability"
# cap_net_raw+ep, as setcap writes it (VFS_CAP_REVISION_2)
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def test_partial_page_writes_through_write_only_and_append_opens(pair: Pair) -> None:
    """The kernel fills a partly written page by reading through the writing handle: a write-only
    open must still read underneath, and O_APPEND must not move the kernel's page-sized writes."""
    pair.build([[F("lf", b"0123456789" * 500), F("app", b"head\n")]], upper=[], options=WB)

    def steps(s: util.Side) -> tuple[bytes, bytes]:
        fd = os.open(s.p("lf"), os.O_WRONLY)
        os.pwrite(fd, b"XY", 4097)
        os.pwrite(fd, b"Z", 10)
        os.close(fd)
        fd = os.open(s.p("app"), os.O_WRONLY | os.O_APPEND)
        for i in range(3):
            os.write(fd, b"line %d\n" % i)
        os.close(fd)
        return open(s.p("lf"), "rb").read(), open(s.p("app"), "rb").read()

    pair.same(steps, "partial writes")
    pair.assert_same_upper()
    pair.check_lowers()


def test_rename_and_unlink_under_open_files_close_cleanly(pair: Pair) -> None:
    """After a rename over, an unlink or a link, the kernel writes back the times it keeps with a
    SETATTR: one on a lower file, or on a file no name reaches, must neither copy it up nor fail
    (a failure is reported by the next close of the file as EIO)."""
    pair.build([[F("old", b"old\n"), F("new", b"new\n"), F("gone", b"gone\n"), F("keep", b"k\n")]],
               upper=[], options=WB)

    def steps(s: util.Side) -> list[object]:
        seen: list[object] = []
        ro = os.open(s.p("old"), os.O_RDONLY)
        os.rename(s.p("new"), s.p("old"))
        seen.append(os.read(ro, 10))
        os.close(ro)
        rw = os.open(s.p("gone"), os.O_RDWR)
        os.unlink(s.p("gone"))
        os.write(rw, b"more")
        os.fsync(rw)
        seen.append(os.pread(rw, 20, 0))
        os.close(rw)
        w = os.open(s.p("made"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(w, b"x" * 5000)
        os.unlink(s.p("made"))
        os.close(w)
        ro = os.open(s.p("keep"), os.O_RDONLY)
        os.unlink(s.p("keep"))
        os.close(ro)
        seen.append(sorted(os.listdir(s.p())))
        return seen

    assert pair.same(steps, "rename, unlink")[-1] == [b"old"]
    pair.assert_same_upper()
    pair.check_lowers()


def test_stat_after_close_sees_what_was_written(pair: Pair) -> None:
    """The kernel forgets a file's block count at every close; the stat that follows asks again."""
    pair.build([[F("lf", b"x")]], upper=[], options=WB)

    def steps(s: util.Side) -> tuple[int, int, bool]:
        with open(s.p("f"), "wb") as f:
            f.write(b"y" * 70000)
        st = os.stat(s.p("f"))
        return st.st_size, st.st_blocks * 512 >= 70000, st.st_mtime_ns == os.stat(s.p("f")).st_mtime_ns

    pair.same(steps, "stat after close")
    pair.assert_same_tree(times=False)


def test_capability_set_after_a_write_is_dropped_by_the_next(pair: Pair) -> None:
    """Every write(2) asks for the file's security.capability (a write drops it). unionfs answers
    "none" from memory once it has said so: setting one must end that, so the next write drops it.
    (Writes still in the kernel's cache when the capability is set drop it when they reach the
    union, as on fuse-overlayfs: hence the fsyncs.)"""
    pair.build([[F("lf", b"lower")]], upper=[], options=WB)

    def steps(s: util.Side) -> list[object]:
        seen: list[object] = []
        fd = os.open(s.p("f"), os.O_WRONLY | os.O_CREAT, 0o755)
        os.write(fd, b"one")
        os.fsync(fd)
        os.setxattr(s.p("f"), CAPS, CAP_NET_RAW)
        seen.append(os.getxattr(s.p("f"), CAPS))
        os.write(fd, b"two")
        os.fsync(fd)
        seen.append(util.call(os.getxattr, s.p("f"), CAPS))
        os.setxattr(s.p("f"), CAPS, CAP_NET_RAW)
        os.close(fd)
        seen.append(os.getxattr(s.p("f"), CAPS))
        return seen

    seen = pair.same(steps, "capability")
    assert seen[0] == CAP_NET_RAW and seen[1] == util.err("ENODATA")


def test_small_writes_reach_the_server_gathered(tmp_path: Path, need_fuse: None) -> None:
    """64 KiB written in 4 KiB write(2)s arrives as a few WRITE requests, not sixteen."""
    for d in ("A", "B", "M"):
        (tmp_path / d).mkdir()
    (tmp_path / "B" / "b").write_text("b\n")
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([UNIONFS, "mount", "-f", "-d", "-o", "writeback", "--log-file", str(log),
                             f"{tmp_path}/A:{tmp_path}/B", str(tmp_path / "M")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        util.wait_for_mount(tmp_path / "M", proc)
        chunk = bytes(range(256)) * 16
        with open(tmp_path / "M" / "w", "wb", buffering=0) as f:
            for _ in range(16):
                f.write(chunk)
        assert (tmp_path / "M" / "w").read_bytes() == chunk * 16
    finally:
        util.umount(tmp_path / "M", proc)
    text = log.read_text(errors="replace")
    assert "FUSE passthrough off (the writeback cache is on)" in text
    writes = len(re.findall(r"DEBUG write\(", text))
    assert 1 <= writes <= 3, writes
    assert (tmp_path / "A" / "w").read_bytes() == chunk * 16
