"""Issue 7: hardening. Hostile layers, crashes, concurrency, data integrity, odd names and sizes,
daemon errors and bad input — nothing lost, nothing escapes.

Each item has a bounded version in the default suite and a long one behind ``@pytest.mark.slow``
(``--runslow``). Every test is seeded; the only waits are bounded ones. Daemons are our own
foreground children (``hardening_util.Daemon``), so we hold their PIDs: SIGKILL goes to them only.
Figures (rounds, operations, cases, seconds) are printed with the ``FIGURE`` prefix (``pytest -s``
shows them; ``scripts/hardening_report.py`` collects them).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import util
from hardening_util import OVERLAY, UNIONFS, Canary, Daemon, Layers, errno_name, kernel_view, overlay_daemon
from util import D, F, call, err

pytestmark = pytest.mark.fuse

FORK = multiprocessing.get_context("fork")


def figure(name: str, **values: Any) -> None:
    """One line of figures for the README; collected by scripts/hardening_report.py."""
    print("FIGURE " + name + " " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def data_for(name: bytes | str, size: int) -> bytes:
    """Deterministic content for a file, from its name."""
    seed = hashlib.sha256(os.fsencode(name)).digest()
    out = bytearray()
    block = seed
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:size])


@pytest.fixture
def layers(tmp_path: Path, need_fuse: None) -> Iterator[Layers]:
    ly = Layers(tmp_path / "union")
    yield ly
    # never leave a mount below tmp_path
    prefix = os.fsencode(str(tmp_path)) + b"/"
    for mp, _t, _s in reversed(util.mounts()):
        if mp.startswith(prefix):
            util.umount(os.fsdecode(mp))


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


# ==================================================================================================
# 2. Crash safety: SIGKILL of the daemon during a storm


BIG = 3 << 20          # copied on a worker thread (over 1 MiB)
NBIG, NSMALL = 6, 30


def _crash_lower(lower: Path) -> dict[bytes, bytes]:
    files: dict[bytes, bytes] = {}
    (lower / "dir").mkdir()
    for i in range(NBIG):
        files[b"big%d" % i] = data_for(b"big%d" % i, BIG)
    for i in range(NSMALL):
        files[b"dir/s%d" % i] = data_for(b"s%d" % i, 1000 + i)
    for rel, data in files.items():
        (lower / os.fsdecode(rel)).write_bytes(data)
    return files


def _journal(jfd: int, line: str) -> None:
    os.write(jfd, (line + "\n").encode())
    os.fsync(jfd)


def _storm(mnt: bytes, journal: str, seed: int, worker: int) -> None:
    """Copy-ups (chmod, O_RDWR open), renames, unlinks and new fsynced files until the mount dies.
    Intentions and completions go to a journal outside the mount, fsynced."""
    rng = random.Random(seed * 100 + worker)
    jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    k = 0
    try:
        while True:
            k += 1
            op = rng.choice(["chmod", "rdwr", "rename", "unlink", "new", "new", "newbig"])
            try:
                if op in ("chmod", "rdwr", "rename", "unlink"):
                    pool = [b"big%d" % i for i in range(NBIG)] + [b"dir/s%d" % i for i in range(NSMALL)]
                    rel = rng.choice(pool)
                    p = os.path.join(mnt, rel)
                    if op == "chmod":
                        os.chmod(p, 0o600 | rng.randrange(0o100))
                    elif op == "rdwr":
                        os.close(os.open(p, os.O_RDWR))
                    elif op == "rename":
                        _journal(jfd, f"gone {os.fsdecode(rel)}")
                        os.rename(p, p + b".r%d-%d" % (worker, k))
                    else:
                        _journal(jfd, f"gone {os.fsdecode(rel)}")
                        os.unlink(p)
                else:
                    size = rng.randrange(1, 200_000) if op == "new" else 2 << 20
                    name = b"dir/n-%d-%d-%d" % (seed, worker, k)
                    data = data_for(name, size)
                    fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        os.write(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    _journal(jfd, f"done {os.fsdecode(name)} {size}")
            except OSError as e:
                if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                    return
                # ENOENT: a name another worker removed first
                if e.errno != errno.ENOENT:
                    _journal(jfd, f"errno {errno_name(e)} {op}")
    finally:
        os.close(jfd)


def _verify_after_crash(layers: Layers, lower_files: dict[bytes, bytes], journal: Path) -> dict[str, int]:
    m = layers.m()
    done: dict[bytes, int] = {}
    gone: set[bytes] = set()
    odd: list[str] = []
    for line in journal.read_text().splitlines():
        parts = line.split(" ")
        if parts[0] == "done":
            done[os.fsencode(parts[1])] = int(parts[2])
        elif parts[0] == "gone":
            gone.add(os.fsencode(parts[1]))
        elif parts[0] == "errno":
            odd.append(line)
    assert not odd, f"the storm met unexpected errors: {odd[:10]}"
    checked = 0
    seen = util.snapshot(m)
    for rel, desc in seen.items():
        if desc["type"] != "file":
            continue
        base = rel.split(b".r")[0] if b".r" in rel else rel
        if base in lower_files:
            want = lower_files[base]
            got = open(os.path.join(m, rel), "rb").read()
            assert got == want, f"{rel!r}: partial or changed copy ({len(got)} of {len(want)} bytes)"
            checked += 1
        elif rel.startswith(b"dir/n-"):
            got = open(os.path.join(m, rel), "rb").read()
            full = data_for(rel, done.get(rel, len(got)))
            assert full.startswith(got), f"{rel!r}: content is not what was written"
            checked += 1
        else:
            raise AssertionError(f"unexpected file {rel!r} after the crash")
    for rel, size in done.items():
        if rel in gone:
            continue
        got = open(os.path.join(m, rel), "rb").read()
        assert got == data_for(rel, size), f"{rel!r}: fsynced file not intact after the crash"
    for rel in lower_files:
        if rel not in gone:
            assert rel in seen, f"{rel!r} vanished though nothing removed it"
    return {"files_checked": checked, "fsynced": len(done)}


def _crash_rounds(layers: Layers, rounds: int, seed: int, style: str = "overlay") -> dict[str, Any]:
    lower_files = _crash_lower(layers.lowers[0])
    lower_before = layers.lower_digests()
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    workdir = layers.workdir(style)
    for rnd in range(rounds):
        d = layers.daemon(style=style).start()
        # the work dir is clean once mounted, whatever the last crash left
        assert os.listdir(workdir) == [], f"round {rnd}: work dir not cleaned: {os.listdir(workdir)}"
        journal = layers.base / f"journal-{rnd}"
        workers = [FORK.Process(target=_storm, args=(layers.m(), str(journal), seed * 1000 + rnd, w))
                   for w in range(3)]
        try:
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.2, 1.2))   # the random moment of the crash
            leftovers = len(os.listdir(workdir))
            stats["kills_with_temporaries"] += bool(leftovers)
            d.kill(detach=False)      # the workers now get ENOTCONN and stop
            for w in workers:
                w.join(timeout=30)
                assert w.exitcode == 0, f"storm worker ended with {w.exitcode}"
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()
                    w.join()
            if d.proc is not None:
                d.kill(detach=False)
            d.detach()
        d = layers.daemon(style=style).start()
        try:
            assert os.listdir(workdir) == [], f"round {rnd}: leftovers after remount: {os.listdir(workdir)}"
            jn = layers.base / "journal-all"
            with open(jn, "ab") as f:
                f.write(journal.read_bytes())
            r = _verify_after_crash(layers, lower_files, jn)
            stats["files_checked"] += r["files_checked"]
            stats["fsynced"] = r["fsynced"]
        finally:
            d.stop()
        stats["rounds"] += 1
        assert layers.lower_digests() == lower_before, f"round {rnd}: a lower branch changed"
    if style == "aufs":
        return dict(stats)      # kernel overlayfs does not read AUFS whiteouts
    # in the end the union agrees with kernel overlayfs on the same layers
    kview = kernel_view(layers.lowers, layers.upper, layers.base)
    d = layers.daemon().start()
    try:
        util.assert_trees_equal(kview, util.snapshot(layers.m()))
    finally:
        d.stop()
    return dict(stats)


def test_sigkill_during_a_storm(layers: Layers) -> None:
    t0 = time.monotonic()
    s = _crash_rounds(layers, rounds=5, seed=11)
    figure("crash", **s, seconds=round(time.monotonic() - t0, 1))


@pytest.mark.slow
def test_sigkill_during_a_storm_long(layers: Layers) -> None:
    t0 = time.monotonic()
    s = _crash_rounds(layers, rounds=20, seed=12)
    figure("crash_long", **s, seconds=round(time.monotonic() - t0, 1))


@pytest.mark.slow
def test_sigkill_during_a_storm_aufs_style(layers: Layers) -> None:
    """The same storm on an AUFS-style mount (temporaries hidden in the writable branch; a rename
    of a lower file is rename-then-whiteout, so a crash between them may show the lower file again,
    as documented — never a partial one)."""
    t0 = time.monotonic()
    s = _crash_rounds(layers, rounds=10, seed=13, style="aufs")
    figure("crash_aufs_long", **s, seconds=round(time.monotonic() - t0, 1))


# ==================================================================================================
# 3. Concurrency


# errnos kernel overlayfs gives to these calls on overlapping paths
ALLOWED_ERRNOS = {"ENOENT", "EEXIST", "ENOTEMPTY", "EXDEV", "EISDIR", "ENOTDIR", "EINVAL", "ELOOP", "EBUSY",
                  "EPERM"}   # EPERM: link() of a directory, refused by the VFS
CONC_NAMES = [b"a", b"b", b"c", b"lf0", b"lf1", b"ld", b"ld/x", b"ld/y", b"ld/lf", b"nd", b"nd/z", b"nd/a"]


def _conc_lower(lower: Path) -> None:
    (lower / "ld").mkdir()
    for rel in ("lf0", "lf1", "ld/lf", "ld/x"):
        (lower / rel).write_bytes(data_for(rel, 3000))
    (lower / "bigf").write_bytes(data_for("bigf", 2 << 20))


def _conc_worker(mnt: bytes, seed: int, seconds: float, out: Any) -> None:
    rng = random.Random(seed)
    errs: Counter[str] = Counter()
    examples: dict[str, str] = {}
    history: list[str] = []
    ops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        a = os.path.join(mnt, rng.choice(CONC_NAMES))
        b = os.path.join(mnt, rng.choice(CONC_NAMES))
        op = rng.choice(["create", "write", "unlink", "rename", "mkdir", "rmdir", "chmod", "read", "list",
                         "truncate", "symlink", "link", "big"])
        ops += 1
        try:
            if op == "create":
                fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                os.write(fd, data_for(a, rng.randrange(5000)))
                os.close(fd)
            elif op == "write":
                fd = os.open(a, os.O_WRONLY | os.O_NOFOLLOW)
                os.pwrite(fd, b"w" * 100, rng.randrange(4000))
                os.close(fd)
            elif op == "unlink":
                os.unlink(a)
            elif op == "rename":
                os.rename(a, b)
            elif op == "mkdir":
                os.mkdir(a)
            elif op == "rmdir":
                os.rmdir(a)
            elif op == "chmod":
                os.chmod(a, 0o600 | rng.randrange(0o100), follow_symlinks=False) \
                    if os.chmod in os.supports_follow_symlinks else os.chmod(a, 0o644)
            elif op == "read":
                fd = os.open(a, os.O_RDONLY | os.O_NOFOLLOW)
                os.read(fd, 1 << 16)
                os.close(fd)
            elif op == "list":
                os.listdir(a)
            elif op == "truncate":
                os.truncate(a, rng.randrange(6000))
            elif op == "symlink":
                os.symlink(b"target", a)
            elif op == "link":
                os.link(a, b, follow_symlinks=False)
            else:
                fd = os.open(os.path.join(mnt, b"bigf"), os.O_RDWR)
                os.pwrite(fd, b"B", rng.randrange(2 << 20))
                os.close(fd)
        except OSError as e:
            key = f"{op}:{errno_name(e)}"
            errs[key] += 1
            if key.split(":")[1] not in ALLOWED_ERRNOS and key not in examples:
                examples[key] = f"{op}({a!r}, {b!r}) after {history[-6:]}"
        history.append(f"{op} {a[len(mnt):]!r} {b[len(mnt):]!r}")
    out.put((ops, dict(errs), examples))


def _concurrency(layers: Layers, nproc: int, seconds: float, seed: int) -> dict[str, Any]:
    _conc_lower(layers.lowers[0])
    lower_before = layers.lower_digests()
    d = layers.daemon().start()
    q = FORK.Queue()
    procs = [FORK.Process(target=_conc_worker, args=(layers.m(), seed * 100 + i, seconds, q)) for i in range(nproc)]
    results = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            try:
                results.append(q.get(timeout=seconds + 60))
            except Exception:
                aborted = util.abort_fuse_under(layers.mnt)
                raise AssertionError(f"a worker hung (deadlock?); aborted {aborted}") from None
        for p in procs:
            p.join(timeout=30)
        assert d.alive(), "the daemon died under concurrent load"
        os.listdir(layers.m())          # and still answers
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        d.stop(check=False)
    log_text = d.log_text()
    ops = sum(r[0] for r in results)
    errs: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for _, e, ex in results:
        errs.update(e)
        examples.update(ex)
    bad = {k: v for k, v in errs.items() if k.split(":")[1] not in ALLOWED_ERRNOS}
    assert layers.lower_digests() == lower_before
    # the union agrees with kernel overlayfs on the layers it left behind
    kview = kernel_view(layers.lowers, layers.upper, layers.base)
    d = layers.daemon().start()
    try:
        uview = util.snapshot(layers.m())
    finally:
        d.stop()
    tracebacks = [ln for ln in log_text.splitlines() if "unexpected error in" in ln]
    return {"ops": ops, "errors": dict(errs), "bad": bad, "paths_compared": len(uview), "kview": kview,
            "uview": uview, "tracebacks": tracebacks, "examples": examples}


def _assert_concurrency(r: dict[str, Any]) -> None:
    assert not r["bad"], f"errnos kernel overlayfs would not give: {r['bad']}; e.g. {r['examples']}"
    assert not r["tracebacks"], f"{len(r['tracebacks'])} unexpected errors (EIO), e.g. {r['tracebacks'][:3]}"
    util.assert_trees_equal(r["kview"], r["uview"])


def test_concurrent_random_ops(layers: Layers) -> None:
    t0 = time.monotonic()
    r = _concurrency(layers, nproc=8, seconds=15, seed=21)
    figure("concurrency", procs=8, seconds=15, ops=r["ops"], paths_compared=r["paths_compared"],
           elapsed=round(time.monotonic() - t0, 1), bad=r["bad"], eio=len(r["tracebacks"]))
    _assert_concurrency(r)


@pytest.mark.slow
def test_concurrent_random_ops_long(layers: Layers) -> None:
    r = _concurrency(layers, nproc=8, seconds=60, seed=22)
    figure("concurrency_long", procs=8, seconds=60, ops=r["ops"], paths_compared=r["paths_compared"], bad=r["bad"],
           eio=len(r["tracebacks"]))
    _assert_concurrency(r)


def _copy_up_twice(mnt: bytes, which: int, barrier: Any) -> None:
    barrier.wait(timeout=30)
    fd = os.open(os.path.join(mnt, b"large"), os.O_RDWR)
    try:
        os.pwrite(fd, b"%d" % which * 4096, which * 4096 * 7)
    finally:
        os.close(fd)


def test_two_processes_copy_up_the_same_large_file(layers: Layers) -> None:
    size = 64 << 20
    data = bytearray(data_for("large", size))
    (layers.lowers[0] / "large").write_bytes(data)
    lower_before = layers.lower_digests()
    d = layers.daemon().start()
    try:
        barrier = FORK.Barrier(2)
        procs = [FORK.Process(target=_copy_up_twice, args=(layers.m(), i + 1, barrier)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        for i in (1, 2):
            data[i * 4096 * 7:i * 4096 * 7 + 4096] = b"%d" % i * 4096
        got = open(layers.m("large"), "rb").read()
        assert got == bytes(data), "two simultaneous copy-ups lost one writer's change"
        assert os.listdir(layers.work / "unionfs-work") == []
    finally:
        d.stop()
    assert (layers.upper / "large").read_bytes() == bytes(data)
    assert layers.lower_digests() == lower_before


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
# 5. Odd names and sizes, against kernel overlayfs


def _create_read(path: bytes) -> bytes:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, os.path.basename(path)[-40:])
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return f.read()


# (names of 252-255 bytes: see test_names_of_252_to_255_bytes)
ODD_NAMES = [b"n" * 251, b"\xff\xfe-not-utf8", b"line\nbreak", b"tab\there", b" lead space", b"-dash",
             b"\xe2\x82\xac-euro", b"x" * 250 + b"\xff"]


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_odd_names(pair: util.Pair, style: str) -> None:
    """251-byte names, non-UTF-8 bytes, newlines and tabs work as on the kernel; 256 bytes is
    ENAMETOOLONG; `.wh.`-prefixed names are refused with EPERM in both dialects (a documented
    difference: the kernel allows them)."""
    pair.build([[F("low", b"low\n"), F(b"\xfflow-odd", b"odd lower\n"), D("ld"), F(b"ld/line\nlower", b"nl")]],
               [], style=style, dialect="aufs" if style == "aufs" else "overlay")
    for name in ODD_NAMES:
        pair.same(lambda s, n=name: _create_read(s.p(n)), f"create {name!r}")
        pair.same(lambda s, n=name: os.lstat(s.p(n)).st_size, f"lstat {name!r}")
        pair.same(lambda s, n=name: os.rename(s.p(n), s.p(n[:-1] + b"R")), f"rename {name!r}")
    long = b"l" * 256
    pair.same(lambda s: _create_read(s.p(long)), "create 256")
    pair.same(lambda s: os.lstat(s.p(long)), "lstat 256")
    pair.same(lambda s: os.mkdir(s.p(long)), "mkdir 256")
    pair.same(lambda s: os.rename(s.p(b"low"), s.p(long)), "rename to 256")
    pair.same(lambda s: os.unlink(s.p(b"\xfflow-odd")), "unlink odd lower")
    pair.same(lambda s: os.rename(s.p(b"ld/line\nlower"), s.p(b"ld/moved\n")), "rename lower newline name")
    pair.same(lambda s: sorted(os.listdir(s.p())), "listing")
    pair.same(lambda s: sorted(os.listdir(s.p(b"ld"))), "listing ld")
    for wh in (b".wh.x", b".wh..wh..opq", b".wh.low"):
        k, u = pair.both(lambda s, n=wh: _create_read(s.p(n)))
        assert u == err("EPERM"), (wh, u)
        k2, u2 = pair.both(lambda s, n=wh: os.mkdir(s.p(n + b"-d")))
        assert u2 == err("EPERM"), (wh, u2)
        k3, u3 = pair.both(lambda s, n=wh: os.rename(s.p(b"low"), s.p(n + b"-r")))
        assert u3 == err("EPERM"), (wh, u3)
        if k3 is None:      # the kernel allowed it: put the file back, so the trees compare below
            os.rename(pair.k.p(wh + b"-r"), pair.k.p(b"low"))
    assert pair.u.mounted is not None and pair.u.mounted.proc is not None and pair.u.mounted.proc.poll() is None
    # the union still serves, and agrees apart from the refused .wh. names
    kt, ut = util.snapshot(pair.k.p()), util.snapshot(pair.u.p())
    kt = {r: v for r, v in kt.items() if not os.path.basename(r).startswith(b".wh.")}
    util.assert_trees_equal(kt, ut)


@pytest.mark.parametrize("style", ["overlay", "aufs"])
def test_names_of_252_to_255_bytes(pair: util.Pair, style: str) -> None:
    pair.build([[F("low", b"low\n")]], [], style=style, dialect="aufs" if style == "aufs" else "overlay")
    for n in (252, 255):
        name = b"n" * n
        pair.same(lambda s, nm=name: _create_read(s.p(nm)), f"create {n}-byte name")
        pair.same(lambda s, nm=name: os.mkdir(s.p(nm + b"")[:-1] + b"d"), f"mkdir {n}-byte name")
        pair.same(lambda s, nm=name: os.rename(s.p(b"low"), s.p(nm[:-1] + b"r")), f"rename to {n}-byte name")


def _many_entries(layers: Layers, n: int) -> dict[str, Any]:
    lower = os.fsencode(str(layers.lowers[0] / "big"))
    os.mkdir(lower)
    half = n // 2
    for i in range(half):
        os.close(os.open(os.path.join(lower, b"lower-%06d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    d = layers.daemon().start()
    t0 = time.monotonic()
    try:
        dd = layers.m("big")
        dfd = os.open(dd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(n - half):
                os.close(os.open(b"upper-%06d" % i, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
            for i in range(0, half, 10):
                os.unlink(b"lower-%06d" % i, dir_fd=dfd)
        finally:
            os.close(dfd)
        t_create = time.monotonic() - t0
        want = {b"lower-%06d" % i for i in range(half) if i % 10} | {b"upper-%06d" % i for i in range(n - half)}
        t1 = time.monotonic()
        got = os.listdir(dd)
        t_list = time.monotonic() - t1
        assert len(got) == len(set(got)), "duplicate names in the listing"
        assert set(got) == want
        assert d.alive()
    finally:
        d.stop()
    kview = kernel_view(layers.lowers, layers.upper, layers.base)
    assert {os.path.basename(r) for r in kview if r.startswith(b"big/")} == want
    return {"entries": len(want), "create_s": round(t_create, 1), "list_s": round(t_list, 2)}


def test_many_entries_in_one_directory(layers: Layers) -> None:
    r = _many_entries(layers, 20_000)
    figure("many_entries", **r)


@pytest.mark.slow
def test_many_entries_in_one_directory_100k(layers: Layers) -> None:
    r = _many_entries(layers, 100_000)
    figure("many_entries_long", **r)


FOUR_G = 4 << 30


def test_files_beyond_4gib(layers: Layers) -> None:
    """A sparse lower file of 4 GiB + 1 MiB reads right at both ends through the union (no copy-up);
    a new file grows past 4 GiB by truncate and by a write at a 4.5 GiB offset."""
    lp = layers.lowers[0] / "sparse"
    with open(lp, "wb") as f:
        f.write(b"head")
        f.seek(FOUR_G + (1 << 20))
        f.write(b"tail")
    d = layers.daemon().start()
    try:
        p = layers.m("sparse")
        assert os.stat(p).st_size == FOUR_G + (1 << 20) + 4
        with open(p, "rb") as f:
            assert f.read(4) == b"head"
            f.seek(FOUR_G + (1 << 20))
            assert f.read() == b"tail"
            f.seek(FOUR_G)
            assert f.read(4096) == bytes(4096)
        n = layers.m("new")
        fd = os.open(n, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, FOUR_G + 10)
            assert os.pwrite(fd, b"far", FOUR_G + FOUR_G // 8) == 3
            assert os.pread(fd, 3, FOUR_G + FOUR_G // 8) == b"far"
            assert os.pread(fd, 10, FOUR_G) == bytes(10)
        finally:
            os.close(fd)
        assert os.stat(n).st_size == FOUR_G + FOUR_G // 8 + 3
        assert (layers.upper / "new").stat().st_blocks * 512 < (64 << 20), "holes of a new file not kept"
    finally:
        d.stop()


def _sparse_copy_up(layers: Layers, size: int) -> dict[str, Any]:
    lp = layers.lowers[0] / "sparse"
    with open(lp, "wb") as f:
        f.write(b"head")
        f.seek(size - 4)
        f.write(b"tail")
    d = layers.daemon().start()
    try:
        t0 = time.monotonic()
        os.chmod(layers.m("sparse"), 0o600)     # copy-up
        secs = time.monotonic() - t0
        with open(layers.m("sparse"), "rb") as f:
            assert f.read(4) == b"head"
            f.seek(size - 4)
            assert f.read() == b"tail"
    finally:
        d.stop()
    allocated = (layers.upper / "sparse").stat().st_blocks * 512
    r = {"size": size, "seconds": round(secs, 2), "allocated_upper": allocated,
         "allocated_lower": lp.stat().st_blocks * 512}
    figure("sparse_copy_up", **r)
    return r


def test_sparse_copy_up_keeps_holes(layers: Layers) -> None:
    r = _sparse_copy_up(layers, 256 << 20)
    assert r["allocated_upper"] < (8 << 20), f"copy-up allocated {r['allocated_upper']} bytes for a sparse file"


@pytest.mark.slow
def test_sparse_copy_up_4gib(layers: Layers) -> None:
    r = _sparse_copy_up(layers, FOUR_G + (1 << 20) + 8)
    assert r["allocated_upper"] < (8 << 20) and r["seconds"] < 10, r


def _deep(root: bytes, depth: int, name_len: int) -> bytes:
    """mkdir a chain of *depth* directories of *name_len*-byte names through dir fds (so no single
    path is long); create a file at the bottom; return the full path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    try:
        for i in range(depth):
            n = (b"%03d" % i) + b"d" * (name_len - 3)
            os.mkdir(n, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            rel = os.path.join(rel, n) if rel else n
        f = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"deep\n")
        os.close(f)
    finally:
        os.close(fd)
    return os.path.join(rel, b"leaf")


def test_deep_tree_near_path_max(pair: util.Pair) -> None:
    """A tree whose full paths pass PATH_MAX (4096): built through dir fds, it works as on the
    kernel; a full path of 4096+ bytes gets the VFS's ENAMETOOLONG on both, a shorter one works."""
    pair.build([[D("base"), F("base/low", b"low")]], [])
    rel = pair.same(lambda s: _deep(s.p(b"base"), 22, 200), "deep mkdir chain")
    full = os.path.join(b"base", rel)
    assert len(pair.u.p(full)) > 4096
    pair.same(lambda s: os.stat(s.p(full)), "stat beyond PATH_MAX")
    short = os.path.join(b"base", *rel.split(b"/")[:18])   # just under PATH_MAX with the mount prefix
    assert len(pair.u.p(short)) < 4000
    pair.same(lambda s: sorted(os.listdir(s.p(short))), "list deep dir")
    pair.same(lambda s: os.rename(s.p(short), s.p(b"moved")), "rename deep dir")
    pair.assert_same_tree()


def test_128_branches(tmp_path: Path, need_fuse: None, need_overlay: None) -> None:
    """128 lower branches (each with its own file, a file shadowed by the ones above, and a merged
    dir): unionfs shows what kernel overlayfs shows, and copy-up from the bottom branch works."""
    base = tmp_path / "b"
    base.mkdir()
    names = [str(i) for i in range(128)]
    for i, n in enumerate(names):
        lp = base / n
        (lp / "common").mkdir(parents=True)
        (lp / f"own{i}").write_bytes(b"%d\n" % i)
        (lp / "shadowed").write_bytes(b"from %d\n" % i)
        (lp / "common" / f"c{i}").write_bytes(b"c%d\n" % i)
    for side in ("k", "u"):
        for sub in ("up", "wk", "mnt"):
            (base / f"{side}{sub}").mkdir()
    lower_before = [util.layer_digest(base / n) for n in names]
    # kernel mount options are limited to one page: relative lowerdirs, resolved from cwd
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(names)},upperdir=kup,workdir=kwk," + util.KERNEL_OPTS, "kmnt"],
                       cwd=base, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = overlay_daemon([base / n for n in names], base / "uup", base / "uwk", base / "umnt", base / "u.log").start()
    try:
        kt, ut = util.snapshot(base / "kmnt"), util.snapshot(base / "umnt")
        util.assert_trees_equal(kt, ut)
        assert len(ut) == 1 + 128 + 1 + 1 + 128
        for m in ("kmnt", "umnt"):
            os.chmod(base / m / "own127", 0o600)
            os.unlink(base / m / "common" / "c0")
        util.assert_trees_equal(util.snapshot(base / "kmnt"), util.snapshot(base / "umnt"))
    finally:
        d.stop()
        util.umount(base / "kmnt")
    assert [util.layer_digest(base / n) for n in names] == lower_before
    figure("branches", lowers=128, paths_compared=len(ut))


def _tmpfs(where: Path, size: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    return where


@pytest.mark.parametrize("ro_option", [False, True])
def test_read_only_upper_filesystem(tmp_path: Path, need_fuse: None, need_overlay: None, ro_option: bool) -> None:
    """An upper dir on a read-only filesystem: as the kernel refuses a writable overlay there,
    unionfs refuses the mount (one line naming the cause, non-zero exit, nothing mounted). With
    `-o ro` the kernel refuses it too (EINVAL, "upper fs is r/o"); unionfs serves it read-only
    (EROFS for every change) — a difference, in the user's favour."""
    t = _tmpfs(tmp_path / "t", "4m")
    try:
        for n in ("ku", "kw", "uu", "uw"):
            (t / n).mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(t)], check=True)
        low = tmp_path / "low"
        low.mkdir()
        (low / "f").write_bytes(b"f\n")
        km, um = tmp_path / "km", tmp_path / "um"
        km.mkdir()
        um.mkdir()
        extra = ",ro" if ro_option else ""
        kr = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                             f"lowerdir={low},upperdir={t}/ku,workdir={t}/kw{extra}", str(km)],
                            capture_output=True, text=True)
        ur = subprocess.run([UNIONFS, "mount", "-o", f"lowerdir={low},upperdir={t}/uu,workdir={t}/uw{extra}", str(um)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        try:
            assert kr.returncode != 0, "kernel overlayfs mounted on a read-only upper"
            assert (ur.returncode == 0) == ro_option, ur
            if ur.returncode != 0:
                lines = ur.stderr.strip().splitlines()
                assert len(lines) == 1 and "Traceback" not in ur.stderr, ur.stderr
                assert "read-only" in lines[0].lower(), lines
                assert not util.is_mounted(um)
            else:
                for m in (um,):
                    assert (m / "f").read_bytes() == b"f\n"
                    assert call(os.unlink, m / "f") == err("EROFS")
                    assert call(os.mkdir, m / "d") == err("EROFS")
        finally:
            if util.is_mounted(km):
                util.umount(km)
            if util.is_mounted(um):
                rr = subprocess.run([UNIONFS, "umount", str(um)], capture_output=True, text=True, timeout=60)
                assert rr.returncode == 0, rr.stderr
    finally:
        util.umount(t)


def test_full_upper_filesystem(tmp_path: Path, need_fuse: None, need_overlay: None) -> None:
    """A 1 MiB tmpfs upper: a big write, a copy-up of a 4 MiB lower file and a copy-up of many small
    ones fail with the kernel's errno (ENOSPC); the daemon keeps serving, leaves no temporaries, and
    works again once space is freed."""
    low = tmp_path / "low"
    low.mkdir()
    (low / "big").write_bytes(data_for("big", 4 << 20))
    (low / "small").write_bytes(b"small\n")
    sides = {}
    for side in ("k", "u"):
        t = _tmpfs(tmp_path / f"t{side}", "1m")
        (t / "up").mkdir()
        (t / "wk").mkdir()
        (tmp_path / f"m{side}").mkdir()
        sides[side] = t
    lower_before = util.layer_digest(low)
    km, um = tmp_path / "mk", tmp_path / "mu"
    util.mount_kernel([low], sides["k"] / "up", sides["k"] / "wk", km)
    d = overlay_daemon([low], sides["u"] / "up", sides["u"] / "wk", um, tmp_path / "u.log").start()
    try:
        def both(fn: Callable[[Path], Any], what: str) -> Any:
            k, u = call(fn, km), call(fn, um)
            assert k == u, f"{what}: unionfs {u}, kernel {k}"
            return k

        def write_big(m: Path) -> int:
            with open(m / "new", "wb") as f:
                f.write(bytes(2 << 20))
            return 0

        assert both(write_big, "write 2 MiB") == err("ENOSPC")
        both(lambda m: os.unlink(m / "new"), "unlink partial")
        assert both(lambda m: os.chmod(m / "big", 0o600), "copy-up 4 MiB") == err("ENOSPC")
        both(lambda m: (m / "big").read_bytes() == data_for("big", 4 << 20), "lower big still visible")
        both(lambda m: os.chmod(m / "small", 0o600), "small copy-up fits")
        both(lambda m: (m / "after").write_bytes(b"works\n"), "write after freeing")
        assert d.alive()
        assert os.listdir(sides["u"] / "wk" / "unionfs-work") == []
        util.assert_trees_equal(util.snapshot(km), util.snapshot(um))
    finally:
        d.stop()
        util.umount(km)
        for t in sides.values():
            util.umount(t)
    assert util.layer_digest(low) == lower_before


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


# ==================================================================================================
# 7. Bad input: one line, non-zero exit, nothing mounted, nothing created or changed


def _bad_cases(a: Path) -> dict[str, list[str | bytes]]:
    """Bad command lines; names not in BAD_EXIT exit 1 (2 for a `run-` case: its usage errors)."""
    A, B, U, W, M = (str(a / n) for n in "ABUWM")
    R = [UNIONFS, "run"]
    C = [UNIONFS, "conformance", "--sequences", "1", "--steps", "1"]  # bounded, should one ever start
    x = os.fsencode(str(a))    # non-UTF-8 names below: bytes arguments
    ok = f"lowerdir={A},upperdir={U},workdir={W}"
    return {
        # unionfs mount (cases beyond tests/test_cli.py)
        "mount-empty-branch": [UNIONFS, "mount", f"{A}::{B}", M],
        "mount-two-writable": [UNIONFS, "mount", f"{A}=rw:{B}=rw", M],
        "mount-mountpoint-symlink-to-file": [UNIONFS, "mount", f"{A}:{B}", str(a / "linkfile")],
        "mount-whiteout-empty": [UNIONFS, "mount", "-o", "whiteout=", f"{A}:{B}", M],
        "mount-timeout-negative": [UNIONFS, "mount", "-o", "timeout=-1", f"{A}:{B}", M],
        "mount-timeout-text": [UNIONFS, "mount", "-o", "timeout=soon", f"{A}:{B}", M],
        "mount-branches-and-lowerdir": [UNIONFS, "mount", "-o", f"lowerdir={B}", f"{A}:{B}", M],
        "mount-upperdir-without-lowerdir": [UNIONFS, "mount", "-o", f"upperdir={U}", f"{A}:{B}", M],
        "mount-workdir-without-upperdir": [UNIONFS, "mount", "-o", f"lowerdir={A},workdir={W}", M],
        "mount-workdir-is-upperdir": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir={U},workdir={U}", M],
        "mount-upper-inside-lower": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir={A}/sub,workdir={W}", M],
        "mount-mountpoint-is-a-branch": [UNIONFS, "mount", f"{A}:{B}", A],
        "mount-three-arguments": [UNIONFS, "mount", f"{A}:{B}", M, M],
        "mount-lowerdir-trailing-colon": [UNIONFS, "mount", "-o", f"lowerdir={A}:", M],
        "mount-workdir-is-a-file": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir={U},workdir={A}/a", M],
        "mount-escaped-colon-missing": [UNIONFS, "mount", f"{A}\\:x:{B}", M],
        "mount-lowerdir-is-mountpoint": [UNIONFS, "mount", "-o", f"lowerdir={M}", M],
        "mount-no-arguments": [UNIONFS, "mount"],
        "mount-branch-is-symlink-to-file": [UNIONFS, "mount", f"{A}:{a}/linkfile", M],
        "mount-log-file-in-missing-dir": [UNIONFS, "mount", "--log-file", f"{a}/nodir/log", f"{A}:{B}", M],
        "mount-log-file-is-a-dir": [UNIONFS, "mount", "--log-file", W, f"{A}:{B}", M],
        # unionfs-overlay
        "overlay-no-options": [OVERLAY, M],
        "overlay-dash-o-without-value": [OVERLAY, M, "-o"],
        "overlay-missing-lower": [OVERLAY, "-o", f"lowerdir={a}/nope,upperdir={U},workdir={W}", M],
        "overlay-upper-without-work": [OVERLAY, "-o", f"lowerdir={A},upperdir={U}", M],
        "overlay-mountpoint-is-a-file": [OVERLAY, "-o", f"lowerdir={A},upperdir={U},workdir={W}", f"{A}/a"],
        "overlay-bad-whiteout": [OVERLAY, "-o", f"lowerdir={A},upperdir={U},workdir={W},whiteout=zfs", M],
        "overlay-lower-twice": [OVERLAY, "-o", f"lowerdir={A}:{A},upperdir={U},workdir={W}", M],
        # unionfs run
        "run-missing-branch": [*R, f"{U}:{a}/nope", "--", "/bin/true"],
        "run-branch-is-a-file": [*R, f"{U}:{A}/a", "--", "/bin/true"],
        "run-no-command": [*R, f"{U}:{A}", "--"],
        "run-relative-workdir": [*R, "-w", "tmp", f"{U}:{A}", "--", "/bin/true"],
        "run-bad-net": [*R, "--net", "bridge", f"{U}:{A}", "--", "/bin/true"],
        "run-bad-hostname": [*R, "--hostname", "bad_host!", f"{U}:{A}", "--", "/bin/true"],
        "run-env-without-key": [*R, "-e", "=value", f"{U}:{A}", "--", "/bin/true"],
        "run-empty-branch": [*R, f"{U}::{A}", "--", "/bin/true"],
        "run-unknown-option": [*R, "--frobnicate", f"{U}:{A}", "--", "/bin/true"],
        # unionfs mount: values out of range or missing
        "mount-timeout-nan": [UNIONFS, "mount", "-o", "timeout=nan", f"{A}:{B}", M],
        "mount-timeout-inf": [UNIONFS, "mount", "-o", "timeout=inf", f"{A}:{B}", M],
        "mount-timeout-1e300": [UNIONFS, "mount", "-o", "timeout=1e300", f"{A}:{B}", M],
        "mount-timeout-empty": [UNIONFS, "mount", "-o", "timeout=", f"{A}:{B}", M],
        "mount-timeout-without-value": [UNIONFS, "mount", "-o", "timeout", f"{A}:{B}", M],
        "mount-upperdir-without-value": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir,workdir={W}", M],
        "mount-fsname-with-space": [UNIONFS, "mount", "-o", "fsname=a b", f"{A}:{B}", M],
        "mount-dash-o-last": [UNIONFS, "mount", f"{A}:{B}", M, "-o"],
        "mount-log-file-last": [UNIONFS, "mount", f"{A}:{B}", M, "--log-file"],
        "mount-unknown-short-flag": [UNIONFS, "mount", "-z", f"{A}:{B}", M],
        # unionfs mount: a non-UTF-8 name in every path argument
        "mount-nonutf8-branch-missing": [UNIONFS, "mount", x + b"/A\xff:" + x + b"/B", M],
        "mount-nonutf8-lower-branch-missing": [UNIONFS, "mount", x + b"/A:" + x + b"/B\xff", M],
        "mount-nonutf8-branch-is-a-file": [UNIONFS, "mount", x + b"/A:" + x + b"/f\xff", M],
        "mount-nonutf8-branch-mode": [UNIONFS, "mount", x + b"/A=r\xff:" + x + b"/B", M],
        "mount-nonutf8-mountpoint-missing": [UNIONFS, "mount", f"{A}:{B}", x + b"/M\xff"],
        "mount-nonutf8-mountpoint-is-a-file": [UNIONFS, "mount", f"{A}:{B}", x + b"/f\xff"],
        "mount-nonutf8-mountpoint-inside-branch": [UNIONFS, "mount", f"{A}:{B}", x + b"/A/sub\xff"],
        "mount-nonutf8-lowerdir-missing": [UNIONFS, "mount", "-o", b"lowerdir=" + x + b"/n\xff", M],
        "mount-nonutf8-upperdir-missing": [UNIONFS, "mount", "-o",
                                           f"lowerdir={A},workdir={W},upperdir=".encode() + x + b"/U\xff", M],
        "mount-nonutf8-workdir-missing": [UNIONFS, "mount", "-o",
                                          f"lowerdir={A},upperdir={U},workdir=".encode() + x + b"/W\xff", M],
        "mount-nonutf8-workdir-is-a-file": [UNIONFS, "mount", "-o",
                                            f"lowerdir={A},upperdir={U},workdir=".encode() + x + b"/f\xff", M],
        "mount-nonutf8-log-file-in-missing-dir": [UNIONFS, "mount", "--log-file", x + b"/n\xff/log", f"{A}:{B}", M],
        "mount-nonutf8-log-file-is-a-dir": [UNIONFS, "mount", "--log-file", x + b"/d\xff", f"{A}:{B}", M],
        "mount-nonutf8-unknown-option": [UNIONFS, "mount", "-o", b"fr\xffob", f"{A}:{B}", M],
        "mount-nonutf8-fsname": [UNIONFS, "mount", "-o", b"fsname=\xff", f"{A}:{B}", M],
        "mount-nonutf8-foreground-mountpoint-is-a-file": [UNIONFS, "mount", "-f", f"{A}:{B}", x + b"/f\xff"],
        # unionfs umount
        "umount-not-mounted": [UNIONFS, "umount", M],
        "umount-not-unionfs": [UNIONFS, "umount", "/proc"],
        "umount-no-argument": [UNIONFS, "umount"],
        "umount-two-arguments": [UNIONFS, "umount", M, A],
        "umount-unknown-flag": [UNIONFS, "umount", "--frobnicate", M],
        "umount-nonutf8-missing": [UNIONFS, "umount", x + b"/M\xff"],
        "umount-nonutf8-not-mounted": [UNIONFS, "umount", x + b"/d\xff"],
        # unionfs-overlay
        "overlay-unknown-flag": [OVERLAY, "--frobnicate", "-o", ok, M],
        "overlay-unknown-flag-alone": [OVERLAY, "--frobnicate"],
        "overlay-three-positionals": [OVERLAY, "-o", ok, "src", M, M],
        "overlay-timeout-nan": [OVERLAY, "-o", f"{ok},timeout=nan", M],
        "overlay-upperdir-without-value": [OVERLAY, "-o", f"lowerdir={A},upperdir,workdir={W}", M],
        "overlay-ignored-option-and-missing-lower": [OVERLAY, "-o", f"lowerdir={a}/nope,squash_to_root", M],
        "overlay-nonutf8-mountpoint-missing": [OVERLAY, "-o", ok, x + b"/M\xff"],
        "overlay-nonutf8-mountpoint-is-a-file": [OVERLAY, "-o", ok, x + b"/f\xff"],
        "overlay-nonutf8-lower-missing": [OVERLAY, "-o", b"lowerdir=" + x + b"/n\xff", M],
        "overlay-nonutf8-upper-missing": [OVERLAY, "-o", f"lowerdir={A},workdir={W},upperdir=".encode() + x
                                          + b"/U\xff", M],
        "overlay-nonutf8-work-missing": [OVERLAY, "-o", f"lowerdir={A},upperdir={U},workdir=".encode() + x
                                         + b"/W\xff", M],
        "overlay-nonutf8-flag": [OVERLAY, b"--fr\xff", "-o", ok, M],
        # unionfs run
        "run-no-arguments": [*R],
        "run-bad-backend": [*R, "--backend", "zfs", f"{U}:{A}", "--", "/bin/true"],
        "run-bad-branch-mode": [*R, f"{U}=rx:{A}", "--", "/bin/true"],
        "run-branch-twice": [*R, f"{U}:{A}:{U}", "--", "/bin/true"],
        "run-nonutf8-branch-missing": [*R, f"{U}:".encode() + x + b"/n\xff", "--", "/bin/true"],
        "run-nonutf8-upper-missing": [*R, x + b"/U\xff:" + A.encode(), "--", "/bin/true"],
        "run-nonutf8-branch-is-a-file": [*R, f"{U}:".encode() + x + b"/f\xff", "--", "/bin/true"],
        "run-nonutf8-relative-workdir": [*R, "-w", b"t\xff", f"{U}:{A}", "--", "/bin/true"],
        "run-nonutf8-hostname": [*R, "--hostname", b"h\xff", f"{U}:{A}", "--", "/bin/true"],
        "run-nonutf8-env-without-key": [*R, "-e", b"=\xff", f"{U}:{A}", "--", "/bin/true"],
        # unionfs conformance
        "conformance-base-missing": [*C, "--base", f"{a}/nope"],
        "conformance-base-is-a-file": [*C, "--base", f"{A}/a"],
        "conformance-nonutf8-base-missing": [*C, "--base", x + b"/n\xff"],
        "conformance-nonutf8-out-is-a-file": [*C, "--out", x + b"/f\xff"],
        "conformance-nonutf8-lower-missing": [*C, "--run", "true", "--lower", x + b"/n\xff"],
        "conformance-run-without-lower": [*C, "--run", "true"],
        "conformance-negative-sequences": [UNIONFS, "conformance", "--sequences", "-1"],
        "conformance-zero-steps": [UNIONFS, "conformance", "--sequences", "1", "--steps", "0"],
        "conformance-negative-first": [*C, "--first", "-3"],
        "conformance-bad-layers": [*C, "--layers", "3-1"],
        "conformance-run-timeout-nan": [*C, "--run", "true", "--lower", A, "--run-timeout", "nan"],
        "conformance-run-timeout-negative": [*C, "--run", "true", "--lower", A, "--run-timeout", "-1"],
        "conformance-shrink-seconds-inf": [*C, "--shrink-seconds", "inf"],
        "conformance-bad-impl": [*C, "--impl-a", "zfs"],
        "conformance-unknown-option": [*C, "--frobnicate"],
    }


# Bad command lines that exit 2 (a malformed command line, as click's usage errors); the rest exit 1,
# or for `unionfs run` 2 when the command line is at fault and 125 (as docker and podman) otherwise.
BAD_EXIT = {
    **dict.fromkeys([
        "mount-three-arguments", "mount-no-arguments", "mount-dash-o-last", "mount-log-file-last",
        "mount-unknown-short-flag", "mount-log-file-is-a-dir", "mount-nonutf8-log-file-is-a-dir",
        "umount-no-argument", "umount-two-arguments", "umount-unknown-flag",
        "overlay-dash-o-without-value", "overlay-unknown-flag",
        "overlay-unknown-flag-alone", "overlay-three-positionals", "overlay-nonutf8-flag",
        "conformance-nonutf8-out-is-a-file", "conformance-nonutf8-lower-missing",
        "conformance-run-without-lower", "conformance-negative-sequences", "conformance-zero-steps",
        "conformance-negative-first", "conformance-bad-layers", "conformance-run-timeout-nan",
        "conformance-run-timeout-negative", "conformance-shrink-seconds-inf", "conformance-bad-impl",
        "conformance-unknown-option", "conformance-base-missing", "conformance-base-is-a-file",
        "conformance-nonutf8-base-missing",
    ], 2),
}


def _bad_exit(name: str) -> int:
    return BAD_EXIT.get(name, 2 if name.startswith("run-") else 1)




def test_unionfs_overlay_without_mountpoint_is_one_line(bad_area: Path) -> None:
    a = bad_area
    r = subprocess.run([OVERLAY, "-o", f"lowerdir={a}/A,upperdir={a}/U,workdir={a}/W"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


def test_foreground_mount_with_unusable_log_file_is_one_line(bad_area: Path) -> None:
    a = bad_area
    r = subprocess.run([UNIONFS, "mount", "-f", "--log-file", f"{a}/nodir/log", f"{a}/A:{a}/B", f"{a}/M"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not util.is_mounted(a / "M")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture
def bad_area(tmp_path: Path, need_fuse: None) -> Iterator[Path]:
    a = tmp_path / "area"
    for n in "ABUWM":
        (a / n).mkdir(parents=True)
    (a / "A" / "a").write_bytes(b"a\n")
    (a / "A" / "sub").mkdir()
    (a / "B" / "b").write_bytes(b"b\n")
    os.symlink(a / "A" / "a", a / "linkfile")
    x = os.fsencode(str(a))
    os.mkdir(x + b"/A/sub\xff")
    os.mkdir(x + b"/d\xff")
    with open(x + b"/f\xff", "wb") as f:
        f.write(b"f\n")
    util.fix_times(os.fsencode(str(a)))
    yield a
    prefix = os.fsencode(str(a))
    for mp, _t, _s in reversed(util.mounts()):
        if mp == prefix or mp.startswith(prefix + b"/"):
            util.umount(os.fsdecode(mp))
    util.kill_daemons(str(a))


def test_bad_input_matrix(bad_area: Path) -> None:
    """Each case: exactly one line on stderr, no traceback, a non-zero exit, nothing mounted, no
    daemon left, and the area (names, types, modes, content, mtimes, ctimes, inode numbers)
    unchanged. The failures are collected, so one run shows them all."""
    from unionfs.server.daemon import pidfile_for

    cases = _bad_cases(bad_area)
    assert len(cases) >= 60
    failures = []
    prefix = os.fsencode(str(bad_area))
    state_before = util.layer_state(bad_area)
    pidfile = pidfile_for(str(bad_area / "M"))
    state_files = [pidfile, pidfile.removesuffix(".pid") + ".log"]
    t0 = time.monotonic()
    for name, args in cases.items():
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        problems = []
        if r.returncode != _bad_exit(name):
            problems.append(f"exit {r.returncode}, not {_bad_exit(name)}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        if "Traceback" in r.stderr:
            problems.append("traceback")
        mounted = [mp for mp, _t, _s in util.mounts() if mp == prefix or mp.startswith(prefix + b"/")]
        if mounted:
            problems.append(f"mounted {mounted}")
            for mp in reversed(mounted):
                util.umount(os.fsdecode(mp))
        if util.wait_daemons_gone(str(bad_area), timeout=5):
            problems.append("daemon left")
            util.kill_daemons(str(bad_area))
        now = util.layer_state(bad_area)
        if now != state_before:
            changed = sorted(set(now) ^ set(state_before)) or [k for k in now if now[k] != state_before.get(k)]
            problems.append(f"changed {changed[:5]}")
            state_before = now
        left = [f for f in state_files if os.path.lexists(f)]
        if left:
            problems.append(f"left {left}")
            for f in left:
                os.unlink(f)
        if problems:
            failures.append(f"{name}: {', '.join(problems)}; rc={r.returncode} stderr={r.stderr.strip()[:300]!r}")
    figure("bad_input", cases=len(cases), failures=len(failures), seconds=round(time.monotonic() - t0, 1))
    assert not failures, "\n".join(failures)
