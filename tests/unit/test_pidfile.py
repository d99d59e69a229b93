"""`statedir`'s pidfiles: what a daemon writes, and which pidfiles name a daemon to wait for (the C
client's ``daemon_pid`` reads the same: tests/fuse/test_stale_state.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs.server import statedir
from unionfs.server.statedir import PidRecord, StateDir


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDir]:
    opened = StateDir.open(create=True, path=str(tmp_path / "state"))
    assert opened is not None
    yield opened
    opened.close()


@pytest.fixture
def stranger() -> Iterator[int]:
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


def test_a_daemon_names_itself(state: StateDir) -> None:
    state.write_pid("k.pid", os.getpid())
    text = Path(state.path, "k.pid").read_text()
    pid, start, pidns = (int(f) for f in text.split())
    assert text.endswith("\n") and pid == os.getpid()
    assert pidns == os.stat("/proc/self/ns/pid").st_ino
    assert start == int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert state.daemon("k.pid") == PidRecord(pid, start, pidns)
    state.remove_pid("k.pid", os.getpid() + 1)
    assert state.daemon("k.pid") is not None, "removed for another pid"
    state.remove_pid("k.pid", os.getpid())
    assert not Path(state.path, "k.pid").exists()


def test_a_held_pidfile_is_removed_only_while_it_is_that_file(state: StateDir) -> None:
    """A worker that serves mount after mount at one point removes the pidfile it holds, not the
    one a later mount there wrote (same pid, same record: told apart by the file itself)."""
    held = state.write_pid("k.pid", os.getpid(), hold=True)
    assert held is not None
    try:
        state.write_pid("k.pid", os.getpid())   # a later mount's, replacing it
        state.remove_pid("k.pid", os.getpid(), held)
        assert Path(state.path, "k.pid").exists(), "removed another mount's pidfile"
    finally:
        os.close(held)
    held = state.write_pid("k.pid", os.getpid(), hold=True)
    assert held is not None
    try:
        state.remove_pid("k.pid", os.getpid(), held)
        assert not Path(state.path, "k.pid").exists()
    finally:
        os.close(held)


@pytest.mark.parametrize("forged", ["bare pid", "another start", "another pid namespace", "no such pid"])
def test_a_pidfile_that_names_no_daemon(state: StateDir, stranger: int, forged: str) -> None:
    record = PidRecord.of(stranger)
    assert record is not None
    line = {"bare pid": f"{stranger}\n",
            "another start": f"{stranger} {record.start + 1} {record.pidns}\n",
            "another pid namespace": f"{stranger} {record.start} {record.pidns + 1}\n",
            "no such pid": f"{(1 << 31) - 1} {record.start} {record.pidns}\n"}[forged]
    Path(state.path, "k.pid").write_text(line)
    assert state.daemon("k.pid") is None


@pytest.mark.parametrize("data", [b"", b"12", b"12 34", b"1 2 3 4", b"0 2 3", b"-1 2 3", b"+1 2 3", b"1_0 2 3",
                                  b"1 2 3\0", b"2147483648 2 3", b"1 2 " + b"9" * 20, b"\xd9\xa1 2 3"])
def test_what_is_no_record(data: bytes) -> None:
    assert PidRecord.parse(data) is None


def test_records() -> None:
    assert PidRecord.parse(b"12 34 56\n") == PidRecord(12, 34, 56)
    assert PidRecord.parse(b"\t12\x0b34\x0c56 \r\n") == PidRecord(12, 34, 56)
    assert PidRecord.parse(b"2147483647 0 " + b"9" * 19) == PidRecord((1 << 31) - 1, 0, int("9" * 19))


def test_wait_for_exit_sees_a_pid_that_is_another_process_now(stranger: int) -> None:
    start = statedir.start_time(stranger)
    assert start is not None
    assert not statedir.wait_for_exit(stranger, 0.05, start)
    t0 = time.monotonic()
    assert statedir.wait_for_exit(stranger, 10.0, start + 1)
    assert time.monotonic() - t0 < 5


def test_rotate(state: StateDir) -> None:
    log = Path(state.path, "server.log")
    log.write_bytes(b"x" * 100)
    Path(state.path, "server.log.1").write_text("older\n")
    assert not state.rotate("server.log", limit=100)
    assert state.rotate("server.log", limit=99)
    assert Path(state.path, "server.log.1").read_bytes() == b"x" * 100 and not log.exists()
    assert not state.rotate("server.log", limit=0)
