"""Liveness: a request that waits long in a system call does not hold up the others.

Functional, not timed.  The stall is made deterministic by a lower branch that is itself a small
FUSE filesystem (`stall_branch.py`) whose big file stops answering reads past a point until the test
says go: a read of the union's then waits in the kernel, inside the union's server, for as long as
the test likes.  While it waits, other requests (stat, listing, a small read) must be answered — as
they are on kernel overlayfs over the same branch.  The same with an fsync held by the branch.  The
waits are bounded and the stall is always released, so a failing run ends.

The other tests check what the threaded paths must keep: data intact and no error when fsync,
release, large reads and writes, and copy-up of the same file run at once; every fallocate mode,
small (inline) and large (answered later from a worker thread), as on kernel overlayfs; and, without
a mount, that a call on a worker thread keeps its file while the fd it was given is closed and reused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import stall_branch
import util

pytestmark = pytest.mark.fuse

WAIT = 30.0  # seconds: bound of every wait; a healthy run waits far less


@contextmanager
def stalling_branch(base: Path) -> Iterator[tuple[Path, Path]]:
    """Mount a `stall_branch` below *base*; yield (its mount point, its control dir); unmount."""
    mnt, control = base / "stall", base / "control"
    mnt.mkdir()
    control.mkdir()
    errp = base / "stall.stderr"
    with open(errp, "wb") as ef:
        proc = subprocess.Popen([sys.executable, stall_branch.__file__, str(mnt), str(control)],
                                stdin=subprocess.DEVNULL, stdout=ef, stderr=ef)
    try:
        util.wait_for_mount(mnt, proc)
        yield mnt, control
    finally:
        (control / "go").touch()       # nothing may stay stuck on it
        util.umount(mnt, proc if proc.poll() is None else None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def union_over(kind: str, lower: Path, base: Path) -> Iterator[Path]:
    """Mount kernel overlayfs or the implementation under test over *lower*, with an upper."""
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    if kind == "kernel":
        m = util.mount_kernel([lower], upper, work, mnt)
    else:
        m = util.mount_impl("overlay", [lower], upper, work, mnt)
    try:
        yield mnt
    finally:
        (base / "control" / "go").touch()
        util.unmount(m)
    for level in ("WARNING", "ERROR"):
        assert level not in m.stderr(), f"the server logged:\n{m.stderr()}"


class Background:
    """Runs *fn* on a thread; `done()` says whether it returned within a bounded wait."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def done(self, timeout: float = WAIT) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {WAIT} s"
        time.sleep(0.01)


def read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


@pytest.mark.parametrize("kind", ["kernel", util.IMPL])
def test_requests_answered_while_a_read_waits_on_the_branch(tmp_path: Path, kind: str) -> None:
    with stalling_branch(tmp_path) as (lower, control), union_over(kind, lower, tmp_path) as mnt:
        reader = Background(lambda: read_all(mnt / "big"))
        wait_for(control / "waiting")              # the read is now held inside the union
        assert not reader.done(0)

        others = Background(lambda: (os.stat(mnt / "small").st_size, sorted(os.listdir(mnt)),
                                     read_all(mnt / "small")))
        answered = others.done()
        still_waiting = not reader.done(0)
        (control / "go").touch()
        assert answered, "stat, listing and a small read waited for another file's read"
        assert others.error is None
        assert others.result == (len(stall_branch.SMALL), ["big", "small"], stall_branch.SMALL)
        assert still_waiting

        assert reader.done(), "the big read did not finish once the branch went on"
        assert reader.error is None
        assert reader.result == stall_branch.big_content(0, stall_branch.BIG_SIZE)


def test_requests_answered_while_an_fsync_waits_on_the_branch(tmp_path: Path) -> None:
    """The same with an fsync of a file not copied up, which unionfs passes to the lower branch.
    (Kernel overlayfs does not sync lower files, so there is nothing to compare with; should the
    fsync not reach the branch, there is nothing to test either.)"""
    with stalling_branch(tmp_path) as (lower, control), union_over(util.IMPL, lower, tmp_path) as mnt:
        fd = os.open(mnt / "big", os.O_RDONLY)
        try:
            syncer = Background(lambda: os.fsync(fd))
            deadline = time.monotonic() + WAIT
            while not (control / "waiting").exists():
                if syncer.done(0.01):
                    pytest.skip("fsync of a lower file does not reach the branch")
                assert time.monotonic() < deadline, "the fsync neither waited on the branch nor returned"
            others = Background(lambda: (os.stat(mnt / "small").st_size, read_all(mnt / "small")))
            answered = others.done()
            still_waiting = not syncer.done(0)
            (control / "go").touch()
            assert answered, "stat and a small read waited for another file's fsync"
            assert others.error is None and others.result == (len(stall_branch.SMALL), stall_branch.SMALL)
            assert still_waiting
            assert syncer.done(), "the fsync did not finish once the branch went on"
            assert syncer.error is None
        finally:
            (control / "go").touch()
            os.close(fd)


def pattern(size: int, seed: int = 0) -> bytes:
    return b"".join(((i + seed) % 251).to_bytes(1, "little") * 4096 for i in range(size // 4096))


def direct_read_all(path: Path, size: int) -> bytes:
    """The whole file, read with O_DIRECT in 1 MiB requests: each one reaches the server."""
    import mmap
    buf = mmap.mmap(-1, 1 << 20)          # page-aligned, as O_DIRECT wants
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while len(out) < size:
            n = os.preadv(fd, [buf], len(out))
            if n == 0:
                break
            out += buf[:n]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


ROUNDS = 12


@pytest.mark.parametrize("kind", ["kernel", util.IMPL])
def test_fsync_release_copy_up_and_big_io_of_one_file_at_once(tmp_path: Path, kind: str) -> None:
    """Threads read (through a handle opened before the copy-up and through new ones), rewrite the
    same bytes in 1 MiB writes, fsync, and close the one file, all at once; the first write open copies
    it up.  Every read sees the file's bytes, no call fails, and the server logs nothing."""
    size = 3 << 20
    data = pattern(size)
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_bytes(data)
    (tmp_path / "control").mkdir()
    with union_over(kind, lower, tmp_path) as mnt:
        path = mnt / "f"
        early = os.open(path, os.O_RDONLY)   # follows the copy-up from the lower file
        start = threading.Barrier(4)

        def early_reader() -> list[bool]:
            start.wait(WAIT)
            return [os.pread(early, size, 0) == data for _ in range(ROUNDS)]

        def direct_reader() -> list[bool]:
            start.wait(WAIT)
            return [direct_read_all(path, size) == data for _ in range(ROUNDS)]

        def rewriter() -> int:
            start.wait(WAIT)
            for _ in range(ROUNDS):
                fd = os.open(path, os.O_WRONLY)
                try:
                    for off in range(0, size, 1 << 20):
                        os.pwrite(fd, data[off:off + (1 << 20)], off)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            return ROUNDS

        def syncer() -> int:
            start.wait(WAIT)
            for _ in range(ROUNDS * 4):
                fd = os.open(path, os.O_RDWR)
                os.fsync(fd)
                os.close(fd)
            return ROUNDS * 4

        workers = [Background(fn) for fn in (early_reader, direct_reader, rewriter, syncer)]
        try:
            for w in workers:
                assert w.done(), "a worker did not finish"
                assert w.error is None, repr(w.error)
        finally:
            os.close(early)
        assert workers[0].result == [True] * ROUNDS
        assert workers[1].result == [True] * ROUNDS
        assert read_all(path) == data
        assert (tmp_path / "upper" / "f").read_bytes() == data   # it was copied up


@pytest.mark.parametrize("kind", ["kernel", util.IMPL])
def test_big_writes_then_fsync_from_another_open(tmp_path: Path, kind: str) -> None:
    """A new file written in 1 MiB writes while another open of it fsyncs and closes over and over:
    what was written is what is read back, on the mount and in the upper branch."""
    size = 8 << 20
    data = b"".join(pattern(1 << 20, seed) for seed in range(size >> 20))
    lower = tmp_path / "lower"
    lower.mkdir()
    (tmp_path / "control").mkdir()
    with union_over(kind, lower, tmp_path) as mnt:
        path = mnt / "new"
        path.write_bytes(b"")
        done = threading.Event()

        def writer() -> None:
            try:
                fd = os.open(path, os.O_WRONLY)
                try:
                    for off in range(0, size, 1 << 20):
                        os.write(fd, data[off:off + (1 << 20)])
                finally:
                    os.close(fd)
            finally:
                done.set()

        def syncer() -> int:
            n = 0
            while not done.is_set() or n == 0:
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                n += 1
            return n

        workers = [Background(writer), Background(syncer)]
        for w in workers:
            assert w.done(), "a worker did not finish"
            assert w.error is None, repr(w.error)
        assert direct_read_all(path, size) == data
    assert (tmp_path / "upper" / "new").read_bytes() == data


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fallocate_story(mnt: Path) -> list[object]:
    """Small and large (answered later, from a worker thread) fallocate calls of each mode, with
    stats of other files in between; what each call and the file look like after."""
    size = 4 << 20
    seen: list[object] = []
    path = mnt / "f"
    path.write_bytes(pattern(size, 1))
    fd = os.open(path, os.O_RDWR)
    try:
        steps = [
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192),         # small: inline
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 << 20, 2 << 20),   # large
            (FALLOC_FL_ZERO_RANGE, 3 << 20, 1 << 20),
            (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (4 << 20) - 4096, 1 << 20),
            (0, 4 << 20, 1 << 20),                                             # extends the file
            (FALLOC_FL_KEEP_SIZE, 8 << 20, 1 << 20),
            (FALLOC_FL_PUNCH_HOLE, 0, 1 << 20),                                # EINVAL: no KEEP_SIZE
        ]
        for mode, off, length in steps:
            try:
                fallocate(fd, mode, off, length)
                seen.append(("ok", mode, off, length))
            except OSError as e:
                seen.append((errno.errorcode.get(e.errno or 0), mode, off, length))
            st = os.fstat(fd)
            seen.append(("size", os.stat(path).st_size, st.st_size))
            seen.append(("other", os.stat(mnt / "small").st_size))
    finally:
        os.close(fd)
    seen.append(("data", util.file_sha256(path)))
    return seen


def test_fallocate_modes_small_and_large(tmp_path: Path) -> None:
    """Each call answers, and the file ends, as on kernel overlayfs; other files are stat'ed in between."""
    seen = {}
    for kind in ("kernel", util.IMPL):
        base = tmp_path / kind
        lower = base / "lower"
        lower.mkdir(parents=True)
        (lower / "small").write_bytes(b"small\n")
        (base / "control").mkdir()
        with union_over(kind, lower, base) as mnt:
            seen[kind] = fallocate_story(mnt)
    assert seen[util.IMPL] == seen["kernel"]
    data = bytearray(pattern(4 << 20, 1))
    for off, length in ((4096, 8192), (1 << 20, 2 << 20), (3 << 20, 1 << 20), ((4 << 20) - 4096, 4096)):
        data[off:off + length] = bytes(length)
    data += bytes(1 << 20)
    assert seen["kernel"][-1] == ("data", hashlib.sha256(data).hexdigest())


def test_offloaded_call_keeps_its_file_when_the_fd_is_closed_and_reused(tmp_path: Path) -> None:
    import trio

    from unionfs.server.offload import Offload

    (tmp_path / "a").write_bytes(b"file a")
    (tmp_path / "b").write_bytes(b"file b")
    entered, go = threading.Event(), threading.Event()

    def slow_read(fd: int, size: int) -> bytes:
        entered.set()
        assert go.wait(WAIT)
        return os.pread(fd, size, 0)

    async def main() -> tuple[bytes, bytes]:
        offload = Offload(workers=1)
        fd = os.open(tmp_path / "a", os.O_RDONLY)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def call() -> None:
                got.append(await offload.on_fd(fd, slow_read, 100))

            nursery.start_soon(call)
            await trio.to_thread.run_sync(entered.wait, WAIT)
            os.close(fd)                                    # a release, meanwhile
            reused = os.open(tmp_path / "b", os.O_RDONLY)   # takes the same number
            assert reused == fd
            go.set()
        other = os.pread(reused, 100, 0)
        os.close(reused)
        return got[0], other

    assert trio.run(main) == (b"file a", b"file b")


def big_files_story(mnt: Path) -> list[object]:
    """Free big files' blocks (off the loop) by unlink, by a rename over them, by closing the last
    open file of an unlinked one, by truncating and by opening with O_TRUNC; what is visible after
    each step."""
    from unionfs.server.offload import FREE_BIG

    big = pattern(FREE_BIG + (1 << 20), 7)
    seen: list[object] = []

    def state() -> None:
        seen.append(sorted((n, os.stat(mnt / n).st_size) for n in os.listdir(mnt)))

    (mnt / "a").write_bytes(big)
    os.unlink(mnt / "a")
    state()
    (mnt / "b").write_bytes(big)
    (mnt / "small").write_bytes(b"small")
    os.rename(mnt / "small", mnt / "b")
    seen.append((mnt / "b").read_bytes())
    state()
    (mnt / "c").write_bytes(big)
    fd = os.open(mnt / "c", os.O_RDWR)
    try:
        os.unlink(mnt / "c")
        state()
        os.pwrite(fd, b"more", len(big))
        seen.append((os.fstat(fd).st_size, hashlib.sha256(os.pread(fd, len(big) + 4, 0)).hexdigest()))
    finally:
        os.close(fd)
    state()
    (mnt / "c").write_bytes(b"again")      # the name is free, the old file gone
    state()
    (mnt / "d").write_bytes(big)
    os.truncate(mnt / "d", 10)              # no open file: a write open of our own
    state()
    (mnt / "d").write_bytes(big)
    (mnt / "d").write_bytes(b"trunc")       # open(O_TRUNC) of a big file
    state()
    fd = os.open(mnt / "d", os.O_RDWR)
    try:
        os.pwrite(fd, big, 0)
        os.ftruncate(fd, 5)                 # through the open file
        seen.append(os.pread(fd, 100, 0))
        os.pwrite(fd, big, 0)
        os.unlink(mnt / "d")
        os.ftruncate(fd, 3)                 # a file without a name
        seen.append((os.fstat(fd).st_size, os.pread(fd, 100, 0)))
    finally:
        os.close(fd)
    state()
    return seen


def test_big_files_removed_by_unlink_rename_last_close_and_truncate(tmp_path: Path) -> None:
    seen = {}
    uppers = {}
    for kind in ("kernel", util.IMPL):
        base = tmp_path / kind
        lower = base / "lower"
        lower.mkdir(parents=True)
        (lower / "low").write_bytes(b"low")
        (base / "control").mkdir()
        with union_over(kind, lower, base) as mnt:
            seen[kind] = big_files_story(mnt)
        uppers[kind] = sorted((p.name, p.stat().st_size) for p in (base / "upper").iterdir())
    assert seen[util.IMPL] == seen["kernel"]
    assert uppers[util.IMPL] == uppers["kernel"] == [("b", 5), ("c", 5)]
