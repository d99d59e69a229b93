"""Hardening, hostile branches (symlinks planted or swapped in, a FIFO for a file).

(How these tests are built: see conftest.py here.)
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import util
from hardening_util import (
    Canary,
    Layers,
    data_for,
    errno_name,
    figure,
    )
from util import call

pytestmark = pytest.mark.fuse


# ==================================================================================================
# 1. No escape through a branch


HOSTILE_LOWER_LINKS = {
    b"etc": b"/",
    b"d": b"../../",
    b"up": b"../../../outside",
    b"sub/abs": None,           # -> absolute path of the canary dir (filled in per test)
    b"sub/rel": b"../../../outside",
    b"sub/p": None,             # a "symlinked parent": -> canary/sub
}


def _plant_hostile(lower: Path, canary: Canary) -> None:
    (lower / "sub").mkdir()
    (lower / "sub" / "f").write_bytes(b"lower f\n")
    (lower / "plain").write_bytes(b"plain\n")
    for rel, target in HOSTILE_LOWER_LINKS.items():
        if target is None:
            target = os.fsencode(str(canary.dir if rel == b"sub/abs" else canary.dir / "sub"))
        os.symlink(target, os.path.join(os.fsencode(str(lower)), rel))


def test_hostile_symlinks_in_a_lower_branch_are_never_followed(layers: Layers, tmp_path: Path) -> None:
    """A lower `etc -> /`, `d -> ../../`, links to the canary dir (absolute and relative) and a
    symlinked parent. Every operation that does not itself follow a symlink (lstat, readlink, chown
    -h, utimes -h, trusted xattrs on the link, link, rename, unlink, copy-up of the parent) works on
    the link, and nothing outside the branches is read-modified, created or changed."""
    canary = Canary(tmp_path / "outside")
    _plant_hostile(layers.lowers[0], canary)
    # a lower hard link to the canary itself (same filesystem): changes must go to a copy
    os.link(canary.dir / "canary", layers.lowers[0] / "hardlinked")
    canary.before = canary._state()
    lower_before = layers.lower_digests()
    root_before = sorted(os.listdir("/"))
    d = layers.daemon(["timeout=0"]).start()
    try:
        m = layers.m
        for rel, target in HOSTILE_LOWER_LINKS.items():
            st = os.lstat(m(rel))
            assert stat.S_ISLNK(st.st_mode), rel
            want = target if target is not None else os.readlink(os.path.join(os.fsencode(str(layers.lowers[0])), rel))
            assert os.readlink(m(rel)) == want
        # metadata of the links themselves: each is a copy-up of a symlink
        os.chown(m(b"etc"), 1234, 1234, follow_symlinks=False)
        os.utime(m(b"d"), ns=(10**18, 10**18), follow_symlinks=False)
        os.setxattr(m(b"sub/abs"), "trusted.hardening", b"x", follow_symlinks=False)
        os.link(m(b"sub/rel"), m(b"sub/rel-link"), follow_symlinks=False)
        os.rename(m(b"sub/p"), m(b"sub/p-moved"))
        os.unlink(m(b"up"))
        os.chmod(m(b"sub/f"), 0o600)          # copies up sub/, next to the hostile links
        with open(m(b"sub/new"), "wb") as f:
            f.write(b"new\n")
        os.rename(m(b"sub/new"), m(b"sub/new2"))
        with open(m(b"hardlinked"), "r+b") as f:
            f.write(b"CHANGED")
        os.chmod(m(b"hardlinked"), 0o600)
        os.setxattr(m(b"hardlinked"), "user.evil", b"1")
        os.truncate(m(b"hardlinked"), 3)
        assert open(m(b"hardlinked"), "rb").read() == b"CHA"
        names = sorted(os.listdir(m(b"sub")))
        assert names == sorted([b"abs", b"f", b"new2", b"p-moved", b"rel", b"rel-link"]), names
        assert stat.S_ISLNK(os.lstat(m(b"etc")).st_mode) and os.lstat(m(b"etc")).st_uid == 1234
        assert d.alive()
    finally:
        d.stop()
    canary.check()
    assert layers.lower_digests() == lower_before
    assert sorted(os.listdir("/")) == root_before
    up = os.fsencode(str(layers.upper))
    for rel in (b"etc", b"d", b"sub/abs", b"sub/rel", b"sub/rel-link", b"sub/p-moved"):
        assert stat.S_ISLNK(os.lstat(os.path.join(up, rel)).st_mode), rel


def _racer(stop: threading.Event, base: Path, name: str, target: Path, counter: list[int]) -> None:
    """Swap a symlink to *target* in for directory base/name and back, as fast as possible."""
    real = base / name
    hide = base / (name + ".swapped")
    link_tmp = base / (name + ".link")
    while not stop.is_set():
        try:
            os.symlink(target, link_tmp)
            os.rename(real, hide)
            os.rename(link_tmp, real)     # now a symlink to the outside
            counter[0] += 1
            os.rename(real, link_tmp)
            os.rename(hide, real)         # and the directory again
            os.unlink(link_tmp)
        except OSError:
            for p in (link_tmp,):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if hide.exists() and not (real.exists() and real.is_dir() and not real.is_symlink()):
                try:
                    if real.is_symlink():
                        os.unlink(real)
                    os.rename(hide, real)
                except OSError:
                    pass


def _swap_race(layers: Layers, tmp_path: Path, seconds: float, seed: int) -> dict[str, Any]:
    canary = Canary(tmp_path / "outside")
    lower = layers.lowers[0]
    (lower / "dd" / "deep").mkdir(parents=True)
    for i in range(40):
        (lower / "dd" / f"f{i}").write_bytes(data_for(f"f{i}", 5000))
    (lower / "dd" / "big").write_bytes(data_for("big", 3 << 20))   # copied on a worker thread
    (lower / "dd" / "deep" / "g").write_bytes(b"g\n")
    rng = random.Random(seed)
    d = layers.daemon(["timeout=0"]).start()
    stop = threading.Event()
    swaps = [0]
    errs: Counter[str] = Counter()
    ops = 0
    # race in the lower branch first, then (once dd/ is copied up) in the upper one too
    racers = [threading.Thread(target=_racer, args=(stop, lower, "dd", canary.dir, swaps), daemon=True)]
    racers[0].start()
    # The calls go through a directory fd of dd/ and *at() calls that never follow a symlink, so
    # the kernel resolves nothing on the caller's side: anything that lands outside is the daemon's.
    dirfd = -1
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(racers) == 1 and (layers.upper / "dd").is_dir():
                racers.append(threading.Thread(target=_racer, args=(stop, layers.upper, "dd", canary.dir, swaps),
                                               daemon=True))
                racers[1].start()
            i = rng.randrange(40)
            what = rng.choice(["chmod", "rename", "create", "write", "deep", "big", "unlink", "list", "reopen"])
            ops += 1
            try:
                if dirfd < 0 or what == "reopen":
                    if dirfd >= 0:
                        os.close(dirfd)
                        dirfd = -1
                    dirfd = os.open(layers.m("dd"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                    continue
                nf = os.O_NOFOLLOW
                if what == "chmod":
                    fd = os.open(f"f{i}", os.O_PATH | nf, dir_fd=dirfd)
                    try:
                        os.chmod(f"/proc/self/fd/{fd}", 0o600 | rng.randrange(0o100))
                    finally:
                        os.close(fd)
                elif what == "rename":
                    os.rename(f"f{i}", f"f{rng.randrange(40)}", src_dir_fd=dirfd, dst_dir_fd=dirfd)
                elif what == "create":
                    fd = os.open(f"n{i}", os.O_WRONLY | os.O_CREAT | nf, 0o644, dir_fd=dirfd)
                    os.write(fd, b"created\n")
                    os.close(fd)
                elif what == "write":
                    fd = os.open(f"f{i}", os.O_WRONLY | os.O_APPEND | nf, dir_fd=dirfd)
                    os.write(fd, b"+")
                    os.close(fd)
                elif what in ("deep", "big"):
                    fd = os.open("deep" if what == "deep" else "big", os.O_RDONLY | nf, dir_fd=dirfd)
                    try:
                        if what == "deep":
                            sub = os.open("g", os.O_WRONLY | os.O_APPEND | nf, dir_fd=fd) \
                                if stat.S_ISDIR(os.fstat(fd).st_mode) else -1
                            if sub >= 0:
                                os.write(sub, b"g")
                                os.close(sub)
                        else:
                            os.fchmod(fd, 0o600 | rng.randrange(0o100))
                    finally:
                        os.close(fd)
                elif what == "unlink":
                    os.unlink(f"n{i}", dir_fd=dirfd)
                else:
                    os.listdir(dirfd)
            except OSError as e:
                errs[errno_name(e)] += 1
            assert d.alive(), "the daemon died"
        if dirfd >= 0:
            os.close(dirfd)
    finally:
        stop.set()
        for t in racers:
            t.join(timeout=10)
        d.stop(check=False)
    text = d.log_text()
    canary.check()
    # nothing the union wrote may have landed outside: the canary dir holds only its own files
    assert sorted(os.listdir(canary.dir)) == ["canary", "sub"]
    assert sorted(os.listdir(canary.dir / "sub")) == ["inner"]
    return {"ops": ops, "swaps": swaps[0], "errors": dict(errs), "tracebacks": text.count("Traceback"),
            "log": text}


def test_symlink_swapped_in_during_copy_up_and_rename(layers: Layers, tmp_path: Path) -> None:
    """A racing thread swaps a symlink to the canary dir in for the directory being copied up and
    renamed in (first the lower, then also the upper branch). The union may fail some calls, but it
    never follows the link: the canary is unchanged and nothing appears next to it."""
    r = _swap_race(layers, tmp_path, seconds=6, seed=7)
    figure("escape_race", seconds=6, ops=r["ops"], swaps=r["swaps"], errors=r["errors"],
           tracebacks=r["tracebacks"])
    assert r["swaps"] > 10 and r["ops"] > 100, r


@pytest.mark.slow
def test_symlink_swap_race_long(layers: Layers, tmp_path: Path) -> None:
    r = _swap_race(layers, tmp_path, seconds=60, seed=8)
    figure("escape_race_long", seconds=60, ops=r["ops"], swaps=r["swaps"], errors=r["errors"],
           tracebacks=r["tracebacks"])


def test_directory_swapped_for_a_symlink_before_lookup_is_an_errno_not_a_crash(layers: Layers,
                                                                                 tmp_path: Path) -> None:
    canary = Canary(tmp_path / "outside")
    low = layers.lowers[0]
    (low / "dd").mkdir()
    (low / "dd" / "f").write_bytes(b"f\n")
    (low / "lf").write_bytes(b"lf\n")
    d = layers.daemon(["timeout=0"]).start()
    try:
        os.lstat(layers.m("lf"))                 # the root listing now says: dd is a directory
        os.rename(low / "dd", low / "dd.away")
        os.symlink(canary.dir, low / "dd")       # swapped under the live mount, before any lookup of dd
        os.lstat(layers.m("dd"))
        r = call(os.chown, layers.m("dd"), 1, 1, follow_symlinks=False)
        assert r is None or r[1] in ("ENOENT", "ESTALE", "ELOOP", "ENOTDIR"), r
        assert d.alive()
    finally:
        d.stop(check=False)
    canary.check()
    assert "unexpected error" not in d.log_text(), d.log_text()[-2000:]


def _cat(path: bytes, timeout: float = 5) -> subprocess.Popen[bytes] | None:
    """Read *path* in a child; None when it finished within *timeout*, else the child, still
    waiting for the daemon (a FUSE request already sent cannot be interrupted: abort the
    connection, then reap it)."""
    p = subprocess.Popen(["cat", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return p if p.poll() is None else None


def test_lower_file_swapped_for_a_fifo_does_not_hang_the_daemon(layers: Layers) -> None:
    low = layers.lowers[0]
    (low / "f").write_bytes(b"regular\n")
    (low / "other").write_bytes(b"other\n")
    d = layers.daemon().start()
    waiting: list[subprocess.Popen[bytes]] = []
    try:
        assert open(layers.m("f"), "rb").read() == b"regular\n"    # the kernel knows f as a regular file
        os.unlink(low / "f")
        os.mkfifo(low / "f")                                        # swapped under the live mount
        waiting += [p for p in (_cat(layers.m("f")), _cat(layers.m("other"))) if p is not None]
        hung = any(p.args[1] == layers.m("other") for p in waiting)
    finally:
        if waiting:
            util.abort_fuse_under(layers.mnt)
            for p in waiting:
                p.kill()
                p.wait(timeout=30)
            d.kill()
        else:
            d.stop(check=False)
    assert not hung, "the daemon stopped answering every request"
