"""The server's session loop reads the next request without going through trio's wait while
requests keep coming (unionfs.server.compat.quicken_session_loop): what the user must still see is
every other part of the server keeping up — the control channel answering, a big copy-up running on
a worker thread finishing — while clients keep the loop busy without a pause."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import util

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")
BIG = 64 << 20
HAMMERS = 8   # more than the cores: a request is always waiting when the server looks


@contextmanager
def busy_mount(tmp_path: Path) -> Iterator[Path]:
    """A union over a lower holding ``f`` (with a user xattr) and ``big`` (64 MiB), with two
    processes asking for ``f``'s xattr as fast as they can until the block ends."""
    upper, lower, mnt = (tmp_path / n for n in ("upper", "lower", "mnt"))
    for d in (upper, lower, mnt):
        d.mkdir()
    (lower / "f").write_bytes(b"f")
    os.setxattr(lower / "f", "user.k", b"v")
    with open(lower / "big", "wb") as f:
        f.write(os.urandom(1 << 20) * (BIG >> 20))
    # Without passthrough: the copy-up's append is then a WRITE the server serves too.
    subprocess.run([UNIONFS, "mount", "-o", "passthrough=off", f"{upper}:{lower}", str(mnt)], check=True,
                   timeout=60)
    stop = multiprocessing.Event()
    hammers = [multiprocessing.Process(target=_hammer, args=(str(mnt / "f"), stop)) for _ in range(HAMMERS)]
    try:
        for h in hammers:
            h.start()
        yield mnt
    finally:
        stop.set()
        for h in hammers:
            h.join(30)
            if h.is_alive():
                h.kill()
        subprocess.run([UNIONFS, "umount", str(mnt)], check=True, timeout=60)


def _hammer(path: str, stop: Any) -> None:
    while not stop.is_set():
        for _ in range(200):
            assert os.getxattr(path, "user.k") == b"v"


def test_the_control_channel_answers_while_requests_never_pause(tmp_path: Path, need_fuse: None) -> None:
    with busy_mount(tmp_path) as mnt:
        counts = []
        for _ in range(4):
            time.sleep(0.3)
            started = time.monotonic()
            counts.append(util.requests_served(mnt, "getxattr"))
            assert time.monotonic() - started < 10
    assert counts == sorted(counts) and counts[-1] > counts[0] + 100, counts


def test_a_copy_up_on_a_worker_thread_finishes_while_requests_never_pause(tmp_path: Path,
                                                                           need_fuse: None) -> None:
    with busy_mount(tmp_path) as mnt:
        before = util.requests_served(mnt, "getxattr")
        with open(mnt / "big", "ab") as f:          # copies 64 MiB up, off the trio thread
            f.write(b"!")
        assert os.stat(mnt / "big").st_size == BIG + 1
        assert util.requests_served(mnt, "getxattr") > before
    assert (tmp_path / "upper" / "big").stat().st_size == BIG + 1
    with open(tmp_path / "upper" / "big", "rb") as f, open(tmp_path / "lower" / "big", "rb") as g:
        assert f.read(BIG) == g.read()


def _cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def test_the_server_stops_waiting_for_requests_without_sleeping_once_they_stop(tmp_path: Path,
                                                                               need_fuse: None) -> None:
    """Between requests that come one after the other the loop polls for the next one instead of
    sleeping (SPIN_US): once they stop, an idle mount costs no CPU."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the loop never polls")
    upper, lower, mnt = (tmp_path / n for n in ("upper", "lower", "mnt"))
    for d in (upper, lower, mnt):
        d.mkdir()
    for i in range(2000):
        (lower / f"f{i}").touch()
    env = dict(os.environ, UNIONFS_SERVER="off")
    subprocess.run([UNIONFS, "mount", f"{upper}:{lower}", str(mnt)], check=True, timeout=60, env=env)
    try:
        [pid] = util.find_daemons(str(mnt))   # a mount made with UNIONFS_SERVER=off names it
        for i in range(2000):                 # one LOOKUP each, one after the other
            assert os.lstat(mnt / f"f{i}").st_size == 0
        time.sleep(0.2)
        before = _cpu_ns(pid)
        time.sleep(1.0)
        assert _cpu_ns(pid) - before < 20_000_000, "an idle daemon used more than 2% of a CPU"
    finally:
        subprocess.run([UNIONFS, "umount", str(mnt)], check=True, timeout=60)
