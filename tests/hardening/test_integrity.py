"""Hardening, fsx-style data integrity and an unexpected exception in a handler.

(How these tests are built: see conftest.py here.)
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import time
from collections import Counter

import pytest
from hardening_util import (
    Daemon,
    Layers,
    data_for,
    figure,
    )
from util import call, err

pytestmark = pytest.mark.fuse


# ==================================================================================================
# 4. fsx-style data integrity


def _fsx(layers: Layers, nops: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    initial = data_for("fsx", 256 << 10)
    (layers.lowers[0] / "fsx").write_bytes(initial)
    lower_before = layers.lower_digests()
    model = bytearray(initial)
    maxlen = 1 << 20
    counts: Counter[str] = Counter()
    d = layers.daemon().start()
    path = layers.m("fsx")
    fd = os.open(path, os.O_RDONLY)     # opened before the copy-up: must follow the file up
    try:
        assert os.pread(fd, 4096, 0) == bytes(model[:4096])
        os.close(fd)
        fd = os.open(path, os.O_RDWR)
        for n in range(nops):
            op = rng.choices(["write", "read", "truncate", "mwrite", "mread", "reopen", "fsync"],
                             [30, 25, 8, 15, 15, 4, 3])[0]
            size = len(model)
            if op in ("mwrite", "mread") and size == 0:
                op = "write"
            counts[op] += 1
            if op == "write":
                off = rng.randrange(maxlen - 1)
                ln = rng.randrange(1, min(65536, maxlen - off) + 1)
                buf = rng.randbytes(ln)
                assert os.pwrite(fd, buf, off) == ln
                if off > size:
                    model.extend(bytes(off - size))
                model[off:off + ln] = buf
            elif op == "read":
                off = rng.randrange(size + 1)
                ln = rng.randrange(1, 65537)
                got = os.pread(fd, ln, off)
                want = bytes(model[off:off + ln])
                assert got == want, f"op {n}: read({off}, {ln}) mismatch (size {size})"
            elif op == "truncate":
                new = rng.randrange(maxlen)
                os.ftruncate(fd, new)
                if new < size:
                    del model[new:]
                else:
                    model.extend(bytes(new - size))
            elif op in ("mwrite", "mread"):
                off = rng.randrange(size)
                ln = rng.randrange(1, min(65536, size - off) + 1)
                with mmap.mmap(fd, size) as mm:
                    if op == "mwrite":
                        buf = rng.randbytes(ln)
                        mm[off:off + ln] = buf
                        model[off:off + ln] = buf
                        if rng.random() < 0.5:
                            mm.flush()
                    else:
                        assert mm[off:off + ln] == bytes(model[off:off + ln]), f"op {n}: mmap read mismatch"
            elif op == "reopen":
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            else:
                os.fsync(fd)
            if n % 997 == 0:
                assert os.fstat(fd).st_size == len(model), f"op {n}: size {os.fstat(fd).st_size} != {len(model)}"
        os.fsync(fd)
        os.close(fd)
        fd = -1
        assert open(path, "rb").read() == bytes(model), "final content mismatch"
    finally:
        if fd >= 0:
            os.close(fd)
        d.stop()
    assert (layers.upper / "fsx").read_bytes() == bytes(model), "upper copy differs from the model"
    d = layers.daemon().start()
    try:
        assert open(path, "rb").read() == bytes(model), "content after remount differs from the model"
    finally:
        d.stop()
    assert layers.lower_digests() == lower_before
    return dict(counts)


def test_fsx(layers: Layers) -> None:
    t0 = time.monotonic()
    c = _fsx(layers, 10_000, seed=31)
    figure("fsx", ops=sum(c.values()), mismatches=0, seconds=round(time.monotonic() - t0, 1), **c)


@pytest.mark.slow
def test_fsx_long(layers: Layers) -> None:
    t0 = time.monotonic()
    c = _fsx(layers, 100_000, seed=32)
    figure("fsx_long", ops=sum(c.values()), mismatches=0, seconds=round(time.monotonic() - t0, 1), **c)


def test_mkdir_where_an_unlinked_files_inode_number_is_reused(layers: Layers) -> None:
    """Found by the concurrency test: ext4 gives a new directory the inode number of a file just
    unlinked; the daemon still holds the file's node under (st_dev, st_ino) and hands it to the
    directory, which then behaves as a file (ENOTDIR inside it, IndexError -> EIO on chmod,
    KeyError -> EIO on rename)."""
    d = layers.daemon().start()
    try:
        for i in range(20):
            fd = os.open(layers.m(f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
            os.unlink(layers.m(f"f{i}"))
            os.mkdir(layers.m(f"d{i}"))
            os.mkdir(layers.m(f"d{i}/sub"))          # ENOTDIR with the bug
            os.chmod(layers.m(f"d{i}"), 0o700)
            os.rename(layers.m(f"d{i}"), layers.m(f"e{i}"))
        assert d.alive()
    finally:
        d.stop()


# ==================================================================================================
# 6. An unexpected exception in a handler: EIO, a traceback in the log, the mount keeps serving

FAULTY_DAEMON = r"""
import sys
from unionfs.core import config, union
from unionfs.server import daemon as mount

mp, lower, upper, work, log_file = sys.argv[1:6]
orig_lookup = union.Union.lookup
orig_setattr = union.Union.setattr


def lookup(self, parent, name):
    if name == b"boom":
        raise RuntimeError("planted fault: lookup of boom")
    return orig_lookup(self, parent, name)


async def setattr(self, node, **kw):
    if node.links and node.links[-1][1] == b"boom-attr":
        await orig_setattr(self, node, **kw)      # really change it, then fail after the await
        raise RuntimeError("planted fault: setattr of boom-attr")
    return await orig_setattr(self, node, **kw)


union.Union.lookup = lookup
union.Union.setattr = setattr
cfg = config.build_config(None, mp, [f"lowerdir={lower},upperdir={upper},workdir={work},timeout=0"])
sys.exit(mount.mount(cfg, foreground=True, log_file=log_file))
"""


@pytest.mark.daemon_log_ok(r"unexpected error in (lookup|setattr)", r"RuntimeError: planted fault")
def test_unexpected_exception_is_eio_and_the_mount_keeps_serving(layers: Layers) -> None:
    (layers.lowers[0] / "boom").write_bytes(b"never shown\n")
    (layers.lowers[0] / "boom-attr").write_bytes(b"attr\n")
    (layers.lowers[0] / "fine").write_bytes(b"fine\n")
    cmd = [sys.executable, "-c", FAULTY_DAEMON, str(layers.mnt), str(layers.lowers[0]), str(layers.upper),
           str(layers.work), str(layers.log)]
    d = Daemon(layers.mnt, cmd, layers.log).start()
    rounds = 50
    try:
        for i in range(rounds):
            assert call(os.stat, layers.m("boom")) == err("EIO")
            assert call(os.chmod, layers.m("boom-attr"), 0o600 + (i % 8)) == err("EIO")
            assert (layers.mnt / "fine").read_bytes() == b"fine\n"
            (layers.mnt / f"new{i}").write_bytes(b"%d" % i)
            assert b"boom" in os.listdir(layers.m())     # readdir does not go through lookup()
            assert d.alive()
        assert sorted(os.listdir(layers.mnt)) == sorted(["boom", "boom-attr", "fine"] + [f"new{i}" for i in range(rounds)])
    finally:
        rc = d.stop(check=False)
    text = d.log_text()
    assert rc == 0, f"the daemon exited {rc}:\n{text[-2000:]}"
    assert text.count("RuntimeError: planted fault: lookup of boom") >= 1
    assert text.count("RuntimeError: planted fault: setattr of boom-attr") >= rounds
    assert "Traceback (most recent call last)" in text
    assert "unexpected error in lookup" in text and "unexpected error in setattr" in text
    figure("daemon_errors", eio_answered=rounds * 2, other_requests_served=rounds * 4)
