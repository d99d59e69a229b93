"""`statedir.wait_for_exit`, which `unionfs umount` and `unionfs server stop` wait with: woken at the
exit (a pidfd), a zombie counted as exited, False after the timeout; without pidfds, the same by
looking every 10 ms."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from unionfs.server import statedir


@pytest.fixture(params=["pidfd", "polling"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "polling":
        def no_pidfds(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")
        monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    return str(request.param)


def test_woken_when_it_exits(way: str) -> None:
    child = subprocess.Popen(["sleep", "0.3"])
    try:
        t0 = time.monotonic()
        assert statedir.wait_for_exit(child.pid, 10.0)
        took = time.monotonic() - t0
        assert 0.25 < took < 5.0, took
    finally:
        child.wait()


def test_a_zombie_has_exited(way: str) -> None:
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while open(f"/proc/{child.pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert statedir.wait_for_exit(child.pid, 0.5)
    finally:
        child.wait()
    assert statedir.wait_for_exit(child.pid, 0.5)   # reaped: gone


def test_false_after_the_timeout(way: str) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        t0 = time.monotonic()
        assert not statedir.wait_for_exit(child.pid, 0.2)
        assert time.monotonic() - t0 >= 0.2
    finally:
        child.kill()
        child.wait()
