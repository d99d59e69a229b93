"""The daemon's own resources stay bounded whatever users do: the directory fds it holds (an
unprivileged user making and walking more directories than RLIMIT_NOFILE allows must not lock
everybody out with EMFILE) and the memory it keeps per cached entry."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

NOBODY = 65534
NOFILE = 1024
#: What the daemon may hold with RLIMIT_NOFILE at 1024: half of it for branch directories, the
#: branch roots, the work dir, /dev/fuse, trio's and the log's few.
FD_BOUND = NOFILE // 2 + 100
PR_CAPBSET_DROP = 24
CAP_SYS_RESOURCE = 24


def _limited_daemon() -> None:
    """Runs in the daemon's child before exec: RLIMIT_NOFILE 1024, and no CAP_SYS_RESOURCE after the
    exec, so that the daemon (root) cannot raise the hard limit itself."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def _public_dir() -> Iterator[Path]:
    """A directory every user may reach (pytest's tmp_path is root's alone), removed after."""
    d = Path(tempfile.mkdtemp(prefix="unionfs-limits-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _mount_limited(base: Path, lowers: list[Path], upper: Path) -> Iterator[util.Mounted]:
    work, mnt = base / "work", base / "mnt"
    work.mkdir()
    mnt.mkdir()
    mnt.chmod(0o755)
    cmd = util.unionfs_cmd("overlay", lowers, upper, work, mnt)
    errp = base / "daemon.stderr"
    with open(errp, "wb") as ef:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=ef, stderr=ef,
                                preexec_fn=_limited_daemon)
    m = util.Mounted(mnt, proc, errp, kernel=False)
    try:
        util.wait_for_mount(mnt, proc)
    except Exception:
        util.umount(mnt, proc if proc.poll() is None else None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    try:
        yield m
    finally:
        util.unmount(m)


def _as_nobody(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args],
                          capture_output=True, text=True, timeout=timeout)


MAKE_DIRS = """
import os, sys
top, n = sys.argv[1], int(sys.argv[2])
os.mkdir(top)
for i in range(0, n, 100):   # n directories: groups of a g directory and 99 in it
    sub = os.path.join(top, "g%d" % (i // 100))
    os.mkdir(sub)
    for j in range(i, min(n, i + 99)):
        os.mkdir(os.path.join(sub, "d%d" % j))
"""


def _fd_exhaustion(shared: int, made: int, branches: int = 20) -> None:
    """*branches* lower branches share *shared* directories (each merged through all of them), and
    an unprivileged user makes *made* more through the mount and walks it all with find; then root
    must still read, create, mkdir and list, and the daemon holds at most FD_BOUND fds."""
    with _public_dir() as base:
        tree = base / "tree"
        for i in range(shared):
            (tree / f"s{i // 100}" / f"d{i}").mkdir(parents=True)
        lowers = []
        for b in range(branches):
            lower = base / f"l{b}"
            subprocess.run(["cp", "-a", "--", str(tree), str(lower)], check=True)
            (lower / f"only{b}").write_text(f"branch {b}\n")
            lowers.append(lower)
        upper = base / "upper"
        (upper / "pub").mkdir(parents=True)
        (upper / "pub").chmod(0o1777)
        with _mount_limited(base, lowers, upper) as m:
            assert m.proc is not None
            pid = m.proc.pid
            mk = _as_nobody([sys.executable, "-c", MAKE_DIRS, str(m.mnt / "pub" / "mine"), str(made)],
                            timeout=240)
            assert mk.returncode == 0, mk.stderr[-2000:]
            walk = _as_nobody(["find", str(m.mnt), "-type", "d"], timeout=240)
            assert walk.stderr == "", walk.stderr[-2000:]
            # the mount point, pub, pub/mine, the shared directories and their groups, the user's
            assert len(walk.stdout.splitlines()) == 3 + shared + -(-shared // 100) + made
            held = _fd_count(pid)
            assert held <= FD_BOUND, f"daemon holds {held} fds"
            # Root, while the kernel still caches every directory the user made.
            assert (m.mnt / "only0").read_text() == "branch 0\n"
            assert (m.mnt / f"s{(shared - 1) // 100}" / f"d{shared - 1}").is_dir()
            (m.mnt / "rootfile").write_text("root\n")
            (m.mnt / "rootdir").mkdir()
            (m.mnt / "rootdir" / "f").write_text("x")
            assert sorted(os.listdir(m.mnt / "rootdir")) == ["f"]
            names = set(os.listdir(m.mnt))
            assert {"rootfile", "rootdir", "pub", "only0", f"only{branches - 1}"} <= names
            assert len(os.listdir(m.mnt / "s0")) == min(100, shared)
            held = _fd_count(pid)
            assert held <= FD_BOUND, f"daemon holds {held} fds"
            assert "Traceback" not in m.stderr()


def test_fds_bounded_when_a_user_walks_many_directories(need_fuse: None) -> None:
    """20 branches sharing 1,000 directories (20,000 branch directories) and 5,000 made by a user."""
    _fd_exhaustion(shared=1000, made=5000)


@pytest.mark.slow
def test_fds_bounded_at_100000_directories(need_fuse: None) -> None:
    """20 branches sharing 5,000 directories (100,000 branch directories) and 100,000 made by a user."""
    _fd_exhaustion(shared=5000, made=100_000)


@pytest.mark.parametrize("swap", ["symlink", "other-dir"])
def test_reopened_directory_must_be_the_same(swap: str, need_fuse: None) -> None:
    """A branch directory whose fd was given back is opened again one name at a time, never
    following a symlink and never taking another directory for it: one swapped in under the live
    mount answers ESTALE and shows nothing of what was swapped in."""
    with _public_dir() as base:
        lower, upper, outside = base / "lower", base / "upper", base / "outside"
        (lower / "victim").mkdir(parents=True)
        (lower / "victim" / "f").write_text("lower\n")
        for i in range(NOFILE):   # more directories than the daemon keeps open at this limit
            (lower / "many" / f"d{i}").mkdir(parents=True)
        outside.mkdir()
        (outside / "f").write_text("outside\n")
        upper.mkdir()
        with _mount_limited(base, [lower], upper) as m:
            assert (m.mnt / "victim").is_dir()            # known, its listing not read yet
            for i in range(NOFILE):
                assert (m.mnt / "many" / f"d{i}").is_dir()
            os.rename(lower / "victim", lower / "victim.old")
            if swap == "symlink":
                os.symlink(outside, lower / "victim")
            else:
                (lower / "victim").mkdir()
                (lower / "victim" / "f").write_text("impostor\n")
            with pytest.raises(OSError) as exc:
                (m.mnt / "victim" / "f").read_text()
            assert exc.value.errno == errno.ESTALE
            assert (m.mnt / "many" / "d0").is_dir()       # the rest of the union is unharmed


def test_directory_renamed_after_its_fd_was_given_back(need_fuse: None) -> None:
    """A directory moved into a merged directory is made opaque after the move, through its own
    fd: one given back before must be opened again under its old name, before the move."""
    with _public_dir() as base:
        lower, upper = base / "lower", base / "upper"
        (lower / "merged").mkdir(parents=True)
        (upper / "merged").mkdir(parents=True)
        (upper / "mine" / "sub").mkdir(parents=True)
        (upper / "mine" / "sub" / "f").write_text("mine\n")
        for i in range(NOFILE):
            (lower / "many" / f"d{i}").mkdir(parents=True)
        with _mount_limited(base, [lower], upper) as m:
            assert (m.mnt / "mine" / "sub").is_dir()
            for i in range(NOFILE):
                assert (m.mnt / "many" / f"d{i}").is_dir()
            os.rename(m.mnt / "mine" / "sub", m.mnt / "merged" / "sub")
            assert (m.mnt / "merged" / "sub" / "f").read_text() == "mine\n"
            assert os.listdir(m.mnt / "mine") == []
        assert (upper / "merged" / "sub" / "f").read_text() == "mine\n"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _bytes_per_entry(tmp_path: Path, entries: int) -> float:
    """The daemon's RSS growth per entry after `ls -l` and `find -printf %s` of a directory of
    *entries* files (every entry listed, stat-ed and asked for its xattrs)."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "big", lower / "small", upper, work, mnt):
        d.mkdir(parents=True)
    for i in range(entries):
        (lower / "big" / f"file-with-a-typical-name-{i:06d}.txt").touch()
    for i in range(10):
        (lower / "small" / f"f{i}").touch()
    m = util.mount_impl("overlay", [lower], upper, work, mnt)
    try:
        assert m.proc is not None
        # Warm up what every first listing allocates once, then measure.
        subprocess.run(["ls", "-l", str(mnt / "small")], check=True, capture_output=True)
        before = _rss_kb(m.proc.pid)
        ls = subprocess.run(["ls", "-l", str(mnt / "big")], check=True, capture_output=True)
        assert ls.stdout.count(b"\n") == entries + 1
        subprocess.run(["find", str(mnt / "big"), "-printf", "%s %i\n"], check=True,
                       capture_output=True)
        after = _rss_kb(m.proc.pid)
    finally:
        util.unmount(m)
    return (after - before) * 1024 / entries


def test_memory_per_entry_of_a_big_directory(tmp_path: Path, need_fuse: None) -> None:
    per_entry = _bytes_per_entry(tmp_path, 100_000)
    assert per_entry <= 1024, f"{per_entry:.0f} bytes per entry"


@pytest.mark.slow
def test_memory_per_entry_of_a_200000_entry_directory(tmp_path: Path, need_fuse: None) -> None:
    per_entry = _bytes_per_entry(tmp_path, 200_000)
    assert per_entry <= 1024, f"{per_entry:.0f} bytes per entry"


# ---------------------------------------------------------------------------------------------
# Directory listings: kept under a ceiling on their entries, rebuilt from the branches on demand

LISTED_DIRS = 50
LISTED_PER_DIR = 5000
#: The ceiling the daemon is mounted with: the entries of four of the directories.
LISTED_CEILING = 20_000
#: RSS growth allowed while all the directories stay known: a daemon keeping every listing (250,000
#: entries, about 200 bytes each) grows by 50 MB or more.
LISTED_RSS_BOUND_KB = 24 * 1024


def _drop_kernel_caches(what: int) -> None:
    """Make the kernel forget the dentries and inodes nobody holds (2) and, with 3, cached pages
    too, the mount's cached directory contents among them: the next lookup or readdir asks us."""
    Path("/proc/sys/vm/drop_caches").write_text(f"{what}\n")


def _listed_name(i: int) -> str:
    return f"file-with-a-typical-name-{i:06d}.txt"


def _many_listed_dirs(lower: Path, upper: Path) -> None:
    """LISTED_DIRS directories of LISTED_PER_DIR files in *lower*; every other one merged with an
    upper directory that adds a file and whites out the first one."""
    for d in range(LISTED_DIRS):
        sub = lower / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(LISTED_PER_DIR):
            os.close(os.open(sub / _listed_name(i), os.O_CREAT | os.O_WRONLY, 0o644))
        if d % 2 == 0:
            up = upper / f"d{d:02d}"
            up.mkdir(parents=True)
            (up / f"upper-{d}").write_text("upper\n")
            os.mknod(up / _listed_name(0), 0o600 | 0o020000, 0)   # a 0/0 character device: a whiteout


def _listings_with_ceiling(tmp_path: Path, ceiling: int) -> int:
    """List every directory of `_many_listed_dirs` through a union mounted with
    max_cached_entries=*ceiling*, holding an fd on each while the kernel forgets their entries; check
    every listing (twice: the second time rebuilt from the branches where it was dropped) against
    kernel overlayfs, and a rename, unlink and create in dropped ones.  Returns the daemon's peak
    RSS growth in KiB."""
    lower, upper, work, mnt, kmnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt", "kmnt"))
    for d in (upper, work, mnt, kmnt):
        d.mkdir()
    _many_listed_dirs(lower, upper)
    names = [f"d{d:02d}" for d in range(LISTED_DIRS)]
    k = util.mount_kernel([upper, lower], None, None, kmnt)    # read-only: the same layers, untouched
    try:
        expected = {n: sorted(os.listdir(kmnt / n)) for n in names}
    finally:
        util.unmount(k)
    assert len(expected["d00"]) == LISTED_PER_DIR and len(expected["d01"]) == LISTED_PER_DIR
    m = util.mount_impl("overlay", [lower], upper, work, mnt, options=[f"max_cached_entries={ceiling}"])
    fds: list[int] = []
    try:
        assert m.proc is not None
        assert sorted(os.listdir(mnt)) == names
        before = peak = _rss_kb(m.proc.pid)
        for n in names:
            fd = os.open(mnt / n, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            assert sorted(os.listdir(fd)) == expected[n]
            _drop_kernel_caches(2)       # the directories stay known (held open), their entries not
            peak = max(peak, _rss_kb(m.proc.pid))
        _drop_kernel_caches(3)
        for n, fd in zip(names, fds, strict=True):
            assert sorted(os.listdir(fd)) == expected[n], n
            assert (mnt / n / _listed_name(LISTED_PER_DIR - 1)).is_file()
        # Changes in directories whose listings were dropped (the first ones, listed longest ago).
        d0, d1, d2 = (mnt / n for n in names[:3])
        os.rename(d0 / _listed_name(1), d0 / "renamed")
        os.unlink(d0 / _listed_name(2))
        (d0 / "new").write_text("new\n")
        os.rename(d1 / _listed_name(3), d2 / "moved")
        want0 = sorted({*expected["d00"], "renamed", "new"} - {_listed_name(1), _listed_name(2)})
        want1 = sorted(set(expected["d01"]) - {_listed_name(3)})
        want2 = sorted({*expected["d02"], "moved"})
        for n in names[3:]:             # drop them again
            assert len(os.listdir(mnt / n)) == len(expected[n])
        assert sorted(os.listdir(d0)) == want0
        assert sorted(os.listdir(d1)) == want1
        assert sorted(os.listdir(d2)) == want2
        assert (d0 / "new").read_text() == "new\n"
        assert (d2 / "moved").is_file() and not (d1 / _listed_name(3)).exists()
        assert not (d0 / _listed_name(2)).exists() and (d0 / "renamed").is_file()
    finally:
        for fd in fds:
            os.close(fd)
        util.unmount(m)
    return peak - before


def test_listings_bounded_when_many_large_directories_stay_known(tmp_path: Path, need_fuse: None,
                                                                 need_overlay: None) -> None:
    """50 directories of 5,000 entries, all held open, under a ceiling of 20,000 listed entries."""
    grown = _listings_with_ceiling(tmp_path, LISTED_CEILING)
    assert grown <= LISTED_RSS_BOUND_KB, f"daemon grew by {grown} KiB"


def test_max_cached_entries_is_checked(tmp_path: Path) -> None:
    for bad in ("0", "-5", "lots", "1e6", ""):
        r = subprocess.run([util.program("unionfs"), "mount", "-o", f"max_cached_entries={bad}",
                            str(tmp_path), str(tmp_path / "mnt")], capture_output=True, text=True)
        assert r.returncode != 0
        assert "max_cached_entries" in r.stderr and "whole number" in r.stderr and "Traceback" not in r.stderr, r.stderr
