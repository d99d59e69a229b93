"""What a user sees of less common system calls, through unionfs and through kernel overlayfs on the
same branches: SEEK_DATA and SEEK_HOLE, renameat2's RENAME_WHITEOUT, unmounting the filesystem that
holds the branches right after the union.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from util import (
    MOUNT_TIMEOUT,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    F,
    Pair,
    Side,
    call,
    err,
    layer_digest,
    program,
    renameat2,
)

pytestmark = pytest.mark.fuse

MIB = 1 << 20
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)


def punch_hole(fd: int, off: int, length: int) -> None:
    fn = _libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def make_sparse(path: Path) -> None:
    """4 KiB of data, a hole up to 1 MiB, 4 KiB of data, a hole up to 2 MiB."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        os.pwrite(fd, b"b" * 4096, MIB)
        os.ftruncate(fd, 2 * MIB)
    finally:
        os.close(fd)


#: Offsets probed with SEEK_DATA and SEEK_HOLE: in data, in holes, at and past the end.
PROBES = (0, 100, 4096, 5000, MIB - 1, MIB, MIB + 4096, MIB + MIB // 2, 2 * MIB - 1, 2 * MIB, 3 * MIB)


def seek_map(fd: int) -> list[tuple[int, int, Any]]:
    """(offset, whence, answer or errno) for every probe."""
    return [(off, whence, call(os.lseek, fd, off, whence))
            for off in PROBES for whence in (SEEK_DATA, SEEK_HOLE)]


@pytest.fixture
def sparse_pair(pair: Pair) -> Pair:
    """Both sides: a sparse file ``low`` in the lower branch and ``up`` in the upper one."""
    pair.build([[F("dummy", b"x")]], [], mount=False)
    for side in pair.sides:
        make_sparse(side.lowers[0] / "low")
        assert side.upper is not None
        make_sparse(side.upper / "up")
        pair.lower_digests[side.lowers[0]] = layer_digest(side.lowers[0])
    pair.mount()
    return pair


@contextlib.contextmanager
def opened(side: Side, name: str, flags: int) -> Iterator[int]:
    fd = os.open(side.p(name), flags)
    try:
        yield fd
    finally:
        os.close(fd)


def same_seeks(pair: Pair, name: str, flags: int = os.O_RDONLY) -> list[tuple[int, int, Any]]:
    def op(side: Side) -> list[tuple[int, int, Any]]:
        with opened(side, name, flags) as fd:
            return seek_map(fd)
    return pair.same(op, f"seek map of {name}")  # type: ignore[no-any-return]


# ------------------------------------------------------------------ SEEK_DATA, SEEK_HOLE

@pytest.mark.parametrize("name", ["low", "up"])
def test_seek_data_and_hole(sparse_pair: Pair, name: str) -> None:
    found = same_seeks(sparse_pair, name)
    assert (4096, SEEK_DATA, MIB) in found and (0, SEEK_HOLE, 4096) in found


def real_seek_map(side: Side, name: str) -> list[tuple[int, int, Any]]:
    """The seek map of the file *name* in the side's upper branch itself."""
    assert side.upper is not None
    fd = os.open(side.upper / name, os.O_RDONLY)
    try:
        return seek_map(fd)
    finally:
        os.close(fd)


def test_seek_through_a_handle_opened_before_copy_up(sparse_pair: Pair) -> None:
    """A reader opened on the lower file gets the copy's extents once a writer copied it up and
    wrote into a hole, as from a fresh open.  The copies differ (kernel overlayfs fills the holes of
    the lower file as it copies it up; unionfs keeps them), so each side is held to its own upper
    file: overlayfs answers from the real file, and so must unionfs."""
    with sparse_pair.opened("low") as fd:
        def write_middle(side: Side) -> None:
            with opened(side, "low", os.O_WRONLY) as w:
                os.pwrite(w, b"c" * 4096, MIB + MIB // 2)
        sparse_pair.same(write_middle)
        for side in sparse_pair.sides:
            real = real_seek_map(side, "low")
            assert seek_map(fd(side, "low")) == real
            with opened(side, "low", os.O_RDONLY) as fresh:
                assert seek_map(fresh) == real
    # unionfs kept the holes: the answers above were not all "data"
    assert (4096, SEEK_DATA, MIB) in real_seek_map(sparse_pair.u, "low")


@pytest.mark.parametrize("name", ["low", "up"])
def test_seek_finds_a_punched_hole(sparse_pair: Pair, name: str) -> None:
    """A hole punched through the mount is found through the same fd and a fresh one: what the real
    upper file says (a lower file is copied up first; see above for why each side has its own)."""
    def punch(side: Side) -> None:
        with opened(side, name, os.O_RDWR) as fd:
            punch_hole(fd, 0, 4096)
            assert seek_map(fd) == real_seek_map(side, name)
    sparse_pair.same(punch)
    for side in sparse_pair.sides:
        with opened(side, name, os.O_RDONLY) as fd:
            assert seek_map(fd) == real_seek_map(side, name)
    assert (0, SEEK_DATA, MIB) in real_seek_map(sparse_pair.u, name)
    if name == "up":
        assert same_seeks(sparse_pair, name) == real_seek_map(sparse_pair.k, name)


# ------------------------------------------------------------------ RENAME_WHITEOUT

@pytest.mark.parametrize(("old", "new"), [("lf", "x"), ("uf", "y"), ("lf", "uf"), ("ld", "z"),
                                          ("missing", "w")])
def test_rename_whiteout_is_refused(pair: Pair, old: str, new: str) -> None:
    """overlayfs refuses RENAME_WHITEOUT (EINVAL) whatever the names are, once they exist; nothing
    moves and no whiteout appears."""
    pair.build([[F("lf", b"lower"), F("ld/f", b"in dir")]], [F("uf", b"upper")])
    pair.same(lambda s: renameat2(s.p(old), s.p(new), RENAME_WHITEOUT), f"rename {old} {new}")
    pair.assert_same_tree()
    pair.assert_same_upper()


def test_rename_whiteout_with_noreplace(pair: Pair) -> None:
    pair.build([[F("lf", b"lower")]], [F("uf", b"upper")])
    for new in ("uf", "new"):
        answer = pair.same(lambda s, n=new: renameat2(s.p("lf"), s.p(n), RENAME_WHITEOUT | RENAME_NOREPLACE))
        assert answer == err("EEXIST" if new == "uf" else "EINVAL")
    pair.assert_same_tree()
    pair.assert_same_upper()


# ------------------------------------------------------------------ unmount releases the branches

UNMOUNT_ROUNDS = 20

# Each round: a tmpfs BASE holding the branches, the union over them, directory nodes, listings
# and a copy-up through it (fds on every branch), then `umount MNT && umount BASE`.  It runs in a
# mount namespace of its own, so that no container started meanwhile on this machine copies the
# union's mount and keeps its session alive.
UNMOUNT_SCRIPT = r"""
set -u
busy=0
for i in $(seq "$ROUNDS"); do
    mount -t tmpfs -o size=4m tmpfs "$BASE"
    mkdir -p "$BASE/l/d" "$BASE/u" "$BASE/w"
    for j in $(seq 200); do mkdir -p "$BASE/l/many/$j"; done
    echo lower > "$BASE/l/d/f"
    if [ "$KERNEL" = 1 ]; then
        mount -t overlay overlay -o "lowerdir=$BASE/l,upperdir=$BASE/u,workdir=$BASE/w" "$MNT"
    else
        "$UNIONFS" mount -o "lowerdir=$BASE/l,upperdir=$BASE/u,workdir=$BASE/w" "$MNT"
    fi
    find "$MNT" > /dev/null
    echo changed > "$MNT/d/f"
    if ! { umount "$MNT" && umount "$BASE"; }; then
        busy=$((busy + 1))
        umount "$MNT" 2>/dev/null
        umount "$BASE" 2>/dev/null || { sleep 1; umount -l "$BASE"; }
    fi
done
echo "busy $busy"
"""


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "unionfs"])
def test_umount_then_umount_the_branches_filesystem(tmp_path: Path, need_fuse: None, need_overlay: None,
                                                    kernel: bool) -> None:
    """``umount MNT && umount BASE``, BASE a tmpfs holding every branch: the union has let go of
    the branches by the time umount(8) returns, so BASE is never busy."""
    base, mnt = tmp_path / "base", tmp_path / "mnt"
    base.mkdir()
    mnt.mkdir()
    env = {**os.environ, "BASE": str(base), "MNT": str(mnt), "ROUNDS": str(UNMOUNT_ROUNDS),
           "KERNEL": "1" if kernel else "0", "UNIONFS": program("unionfs")}
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", UNMOUNT_SCRIPT],
                       capture_output=True, text=True, env=env, timeout=MOUNT_TIMEOUT * 4)
    assert r.returncode == 0, r.stderr
    busy = int(r.stdout.split()[1])
    # The kernel does not wait for the daemon when it unmounts: the daemon lets go the moment it
    # reads the end of its session, and when it is busy just then (answering what came before) that
    # moment can fall after the next command. Seen in 1 of 20 rounds at most; fuse-overlayfs misses more.
    assert busy <= (0 if kernel else 1), f"BASE busy in {busy} of {UNMOUNT_ROUNDS} rounds: {r.stderr}"

