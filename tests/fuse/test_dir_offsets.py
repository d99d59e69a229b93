"""Directory offsets as a program sees them through lseek(2) and getdents64(2) (what seekdir and
telldir do), through unionfs and through kernel overlayfs on the same branches.

Each side is held to its own listing, as offsets and order differ between filesystems: seeking to
an offset a read returned goes on at the entry after it; seeking to any other value goes on at the
next entry (the first whose position is not below the value); seeking past the last offset gives
nothing; seeking to 0 starts again.  A reader part-way through a listing goes on in the listing it
started with, however the directory changed meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from util import D, F, Pair, Side, W

pytestmark = pytest.mark.fuse

SYS_GETDENTS64 = 217    # x86_64
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

Dirent = tuple[bytes, int]   # name, d_off (the position of the entry after it)


def getdents(fd: int, size: int = 32768) -> list[Dirent]:
    """One getdents64 call on *fd*: the entries it returned."""
    buf = ctypes.create_string_buffer(size)
    n = _syscall(SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, pos, raw = [], 0, buf.raw
    while pos < n:
        _ino, off, reclen, _type = struct.unpack_from("<QqHB", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        out.append((name, off))
        pos += reclen
    return out


def read_from(fd: int, offset: int) -> list[Dirent]:
    """Seek *fd* to *offset* and read to the end."""
    os.lseek(fd, offset, os.SEEK_SET)
    out: list[Dirent] = []
    while chunk := getdents(fd):
        out += chunk
    return out


@contextmanager
def opened_dir(path: bytes) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def between(lo: int, hi: int) -> list[int]:
    """A few values strictly between *lo* and *hi*."""
    return sorted({v for v in (lo + 1, (lo + hi) // 2, hi - 1) if lo < v < hi})


def seek_outcomes(path: bytes, first_gap: bool = False) -> dict[str, Any]:
    """Seeks in the directory *path*, each judged against the side's own full listing.  Values
    below the first entry's offset are probed only with *first_gap*: ext4 (and so overlayfs on
    it) gives there whatever its hash order puts first, "." and ".." included."""
    with opened_dir(path) as fd:
        full = read_from(fd, 0)
        names = [n for n, _ in full]
        pos = [0] + [off for _, off in full]      # pos[k]: where entry k starts; pos[-1]: the end
        out: dict[str, Any] = {"names": sorted(names)}
        # offsets a read returned: go on at the entry after
        out["returned"] = all(
            [n for n, _ in read_from(fd, pos[k])] == names[k:] for k in range(len(full) + 1))
        # values between two returned offsets: the next entry
        probes = [(v, k) for k in range(1 if first_gap else 2, len(full) + 1)
                  for v in between(pos[k - 1], pos[k])]
        wrong = [(v, [n for n, _ in read_from(fd, v)], names[k:]) for v, k in probes]
        out["between"] = [w for w in wrong if w[1] != w[2]]
        out["probed"] = len(probes)
        # past the end (unless the end is the largest offset there is)
        end = pos[-1]
        past = [v for v in (end + 1, end + 1000, 1 << 62) if end < v < 1 << 63]
        out["past the end"] = [(v, read_from(fd, v)) for v in past if read_from(fd, v)]
        out["zero"] = [n for n, _ in read_from(fd, 0)] == names
        out["end"] = read_from(fd, end) == []
        return out


def build(pair: Pair) -> None:
    pair.build([[F("l1", b"1"), F("l2", b"2"), F("gone", b"x"),
                 D("m"), F("m/a", b"a"), F("m/b", b"b"), F("m/c", b"c"),
                 D("low"), *(F(f"low/f{i}", b"") for i in range(20))]],
               [F("u1", b"u"), W("gone"), D("m"), F("m/d", b"d"), W("m/b"),
                D("up"), *(F(f"up/g{i}", b"") for i in range(20))])


@pytest.mark.parametrize("where", ["", "m", "low", "up"])
def test_seek_in_directories(pair: Pair, where: str) -> None:
    """Merged, lower-only and upper-only directories; each opened afresh."""
    build(pair)
    def op(side: Side) -> dict[str, Any]:
        found = seek_outcomes(side.p(where))
        del found["probed"]    # how many values lie between offsets differs
        return found
    found = pair.same(op, f"seeks in /{where}")
    assert found["returned"] and found["zero"] and found["end"]
    assert found["between"] == [] and found["past the end"] == []


@pytest.mark.parametrize("where", ["", "m", "low"])
def test_unionfs_seek_below_the_first_offset(pair: Pair, where: str) -> None:
    """unionfs tags its offsets with a snapshot in the high half: the values between 0 and the
    second entry's offset go on at the second entry, as values between offsets do on ext4."""
    build(pair)
    found = seek_outcomes(pair.u.p(where), first_gap=True)
    assert found["probed"] and found["between"] == []


def test_seek_again_after_other_readers(pair: Pair) -> None:
    """Seeks to returned offsets and values in between after other readers listed the same
    directory meanwhile (each reader without a handle takes a snapshot of its own on unionfs)."""
    build(pair)

    def op(side: Side) -> list[bool]:
        with opened_dir(side.p("low")) as fd:
            full = read_from(fd, 0)
            names = [n for n, _ in full]
            results = []
            for k in range(1 if side is pair.u else 2, len(full)):
                for _ in range(3):          # other readers take listings of their own
                    with opened_dir(side.p("low")) as other:
                        read_from(other, 0)
                lo, hi = (0 if k == 1 else full[k - 2][1]), full[k - 1][1]
                for v in between(lo, hi) or [hi]:
                    results.append([n for n, _ in read_from(fd, v)] == names[k:])
            return results
    for side in pair.sides:
        assert all(op(side)), side.mnt


def test_reader_goes_on_in_what_it_started_with(pair: Pair) -> None:
    """A reader part-way through goes on at the offset it was given, in the listing it started
    with: the names it had not read yet come, and a name created meanwhile may or may not."""
    build(pair)

    def op(side: Side) -> tuple[list[bytes], bool]:
        with opened_dir(side.p("low")) as fd:
            os.lseek(fd, 0, os.SEEK_SET)
            first = getdents(fd, 24 * 8)           # a few entries
            for i in range(20, 40):
                open(side.p(f"low/n{i}"), "wb").close()
            rest = read_from(fd, first[-1][1])
            got = [n for n, _ in first] + [n for n, _ in rest]
            old = [n for n in got if not n.startswith(b"n")]
            return sorted(old), len(old) == len(set(old))
    names, unique = pair.same(op, "read across changes")
    assert unique and len(names) == 22
