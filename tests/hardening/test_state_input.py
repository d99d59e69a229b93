"""The daemon's state directory and pidfile as an unprivileged user, and paths that are not UTF-8.

A non-root daemon without XDG_RUNTIME_DIR keeps its pidfile and log in /tmp/unionfs-<uid>, a name
anyone can take first.  Another user's directory, a symlink, a directory of the wrong mode: the
mount is refused in one line and the victim's files stay as they were.  Symlinks planted at the
state files' names are never followed.  A mount that fails leaves no state directory, pidfile or
log.  Paths whose names are not UTF-8 mount, serve and unmount as kernel overlayfs does with them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import launcher_util
import pytest
import util
from launcher_util import UnprivUser, dev_fuse_mode, python_for, unprivileged_user, world_readable_tempdir

pytestmark = pytest.mark.usefixtures("need_fuse")

PRECIOUS = b"the victim's data\n"
UNIONFS = util.program("unionfs")
OVERLAY = util.program("unionfs-overlay")


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[UnprivUser, UnprivUser]]:
    """(victim, attacker): two unprivileged users made for the test, and /dev/fuse usable by them."""
    if os.geteuid() != 0:
        pytest.skip("making the test users needs root (CI runs as root)")
    with unprivileged_user() as victim, unprivileged_user(subids=True) as attacker, dev_fuse_mode(0o666):
        yield victim, attacker


class Area:
    """Branches A (writable) and B, mount point M, a private dir and a precious file, all the victim's."""

    def __init__(self, base: Path, victim: UnprivUser) -> None:
        self.base = base
        self.state = Path(f"/tmp/unionfs-{victim.uid}")
        for name in ("A", "B", "M", "private"):
            (base / name).mkdir()
        (base / "B" / "b").write_bytes(b"b\n")
        (base / "precious").write_bytes(PRECIOUS)
        os.chmod(base / "precious", 0o600)
        os.chmod(base / "private", 0o700)
        for p in [base, *base.rglob("*")]:
            os.lchown(p, victim.uid, victim.gid)
        self.key = hashlib.sha1(os.fsencode(os.path.realpath(base / "M"))).hexdigest()[:16]

    @property
    def spec(self) -> str:
        return f"{self.base}/A:{self.base}/B"

    def assert_precious_intact(self) -> None:
        st = os.lstat(self.base / "precious")
        assert (self.base / "precious").read_bytes() == PRECIOUS, "the victim's file was written"
        assert st.st_mode & 0o7777 == 0o600 and st.st_nlink == 1
        assert os.listdir(self.base / "private") == [], "something was made in the victim's private dir"


def _clear_state(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@pytest.fixture
def area(users: tuple[UnprivUser, UnprivUser]) -> Iterator[Area]:
    victim, _ = users
    with world_readable_tempdir("unionfs-state-") as base:
        a = Area(base, victim)
        _clear_state(a.state)  # left by an earlier user with this uid
        try:
            yield a
        finally:
            left = util.is_mounted(base / "M")
            if left:
                util.umount(base / "M")
            daemons = util.wait_daemons_gone(str(base), timeout=10)
            util.kill_daemons(str(base))
            _clear_state(a.state)
            assert not left, "left mounted"
            assert not daemons, "a daemon outlived its mount"


def as_user(user: UnprivUser, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    """``unionfs ARGS`` run by *user*, with no XDG_RUNTIME_DIR (so the state dir is in /tmp)."""
    python, path = python_for(user)
    if os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        os.chmod("/dev/fuse", 0o666)  # another test's dev_fuse_mode() put it back meanwhile
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": "/", "LC_ALL": "C.UTF-8",
           "UNIONFS_SERVER": os.environ.get("UNIONFS_SERVER", "off")}
    return subprocess.run([python, "-m", "unionfs", *args], capture_output=True, text=True, timeout=60,
                          cwd="/", stdin=subprocess.DEVNULL, env=env, user=user.uid, group=user.gid,
                          extra_groups=[])


def assert_one_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    detail = f"exit {r.returncode}, stderr:\n{r.stderr}"
    assert r.returncode == 1, detail
    assert "Traceback" not in r.stderr and len(lines) == 1, detail
    for w in words:
        assert w in lines[0], f"the line should say {w!r}; {detail}"


def _next_pids(n: int) -> range:
    """The next *n* pids the kernel will hand out (roughly: other processes take some too)."""
    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())
    return range(last + 1, last + 1 + n)


def _plant(path: Path, target: Path, owner: UnprivUser) -> None:
    os.symlink(target, path)
    os.lchown(path, owner.uid, owner.gid)


def _tree(path: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(path)): (os.lstat(p).st_mode, os.lstat(p).st_uid, os.lstat(p).st_size)
            for p in [path, *path.rglob("*")]} if os.path.lexists(path) else {}


# ==================================================================================================
# Another user's /tmp/unionfs-<uid>


def _dir_0777(a: Area, attacker: UnprivUser) -> None:
    """The attacker's world-writable dir, with symlinks to the victim's file at every name the
    daemon might open: its log, its pidfile, and the pidfile's temp names for the next pids."""
    a.state.mkdir()
    os.chmod(a.state, 0o777)
    os.chown(a.state, attacker.uid, attacker.gid)
    for name in (f"{a.key}.log", f"{a.key}.pid", *(f"{a.key}.pid.{p}" for p in _next_pids(1500))):
        _plant(a.state / name, a.base / "precious", attacker)


def _dir_0700(a: Area, attacker: UnprivUser) -> None:
    a.state.mkdir(mode=0o700)
    os.chown(a.state, attacker.uid, attacker.gid)


def _symlink(a: Area, attacker: UnprivUser) -> None:
    """A symlink to a directory of the victim's: the daemon would write its files there."""
    _plant(a.state, a.base / "private", attacker)


def _file(a: Area, attacker: UnprivUser) -> None:
    a.state.write_bytes(b"")
    os.chown(a.state, attacker.uid, attacker.gid)


def _own_dir_0755(a: Area, attacker: UnprivUser) -> None:
    """The victim's own directory, but not 0700: refused all the same (mode 0700 exactly)."""
    a.state.mkdir()
    os.chmod(a.state, 0o755)
    os.chown(a.state, os.stat(a.base).st_uid, os.stat(a.base).st_gid)


SETUPS = {"dir-0777": (_dir_0777, "it belongs to uid"), "dir-0700": (_dir_0700, "it belongs to uid"),
          "symlink": (_symlink, "it is a symlink"), "file": (_file, "it is not a directory"),
          "own-dir-0755": (_own_dir_0755, "its mode is 0755")}


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_state_dir_taken_by_another_user_is_refused(users: tuple[UnprivUser, UnprivUser], area: Area,
                                                    setup: str, foreground: bool) -> None:
    victim, attacker = users
    make, reason = SETUPS[setup]
    make(area, attacker)
    before = _tree(area.state)
    r = as_user(victim, "mount", *(["-f"] if foreground else []), area.spec, str(area.base / "M"))
    assert_one_line(r, str(area.state), reason)
    assert not util.is_mounted(area.base / "M")
    area.assert_precious_intact()
    assert _tree(area.state) == before, "the state dir's contents changed"


# ==================================================================================================
# Symlinks at the state files' names, in the victim's own state dir


def _own_state_dir(a: Area, victim: UnprivUser) -> None:
    a.state.mkdir(mode=0o700)
    os.chown(a.state, victim.uid, victim.gid)


def test_symlinked_pidfile_name_is_replaced_not_followed(users: tuple[UnprivUser, UnprivUser],
                                                         area: Area) -> None:
    victim, _ = users
    _own_state_dir(area, victim)
    pidfile = area.state / f"{area.key}.pid"
    for name in (pidfile.name, *(f"{pidfile.name}.{p}" for p in _next_pids(1500))):  # and temp names
        _plant(area.state / name, area.base / "precious", victim)
    r = as_user(victim, "mount", area.spec, str(area.base / "M"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    try:
        area.assert_precious_intact()
        assert not pidfile.is_symlink() and pidfile.is_file()
        pid = int(pidfile.read_text().split()[0])
        assert f"{area.base}/M".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert os.stat(area.state).st_mode & 0o7777 == 0o700
    finally:
        r = as_user(victim, "umount", str(area.base / "M"))
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(pidfile), "the daemon left its pidfile"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_symlinked_log_name_is_refused(users: tuple[UnprivUser, UnprivUser], area: Area) -> None:
    victim, _ = users
    _own_state_dir(area, victim)
    _plant(area.state / f"{area.key}.log", area.base / "precious", victim)
    r = as_user(victim, "mount", area.spec, str(area.base / "M"))
    assert_one_line(r, f"{area.key}.log")
    assert not util.is_mounted(area.base / "M")
    area.assert_precious_intact()
    assert sorted(os.listdir(area.state)) == [f"{area.key}.log"]


# ==================================================================================================
# A failed mount leaves nothing


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_failed_mount_leaves_no_state_dir(users: tuple[UnprivUser, UnprivUser], area: Area,
                                          foreground: bool) -> None:
    """The mount point is root's: fusermount3 refuses it, after the state dir was made."""
    victim, _ = users
    rootdir = area.base / "roots"
    rootdir.mkdir(mode=0o755)
    r = as_user(victim, "mount", *(["-f"] if foreground else []), area.spec, str(rootdir))
    assert_one_line(r, "no write access")
    assert not util.is_mounted(rootdir)
    assert not os.path.lexists(area.state), f"left {_tree(area.state)}"


# ==================================================================================================
# Names that are not UTF-8 work


def _odd(p: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(str(p)) + b"/" + name))


@pytest.mark.parametrize("style", ["aufs", "overlay", "unionfs-overlay"])
def test_paths_that_are_not_utf8_mount_like_kernel_overlayfs(tmp_path: Path, need_overlay: None,
                                                               style: str) -> None:
    sides = {}
    for side in ("kernel", "unionfs"):
        base = _odd(tmp_path, side.encode() + b"\xff")
        upper, lower, work, mnt = (_odd(base, n) for n in (b"U\xfe", b"L\xff", b"W\xfd", b"M\xfc"))
        for d in (upper, lower, work, mnt, _odd(lower, b"d\xff")):
            d.mkdir(parents=True)
        _odd(lower, b"f\xff").write_bytes(b"lower\n")
        _odd(upper, b"u\xfe").write_bytes(b"upper\n")
        sides[side] = (upper, lower, work, mnt)
    log = _odd(tmp_path, b"log\xff")
    upper, lower, work, mnt = sides["unionfs"]
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    cmd = {"aufs": [UNIONFS, "mount", "--log-file", str(log), "-o", "whiteout=overlay", f"{upper}:{lower}",
                    str(mnt)],
           "overlay": [UNIONFS, "mount", "--log-file", str(log), "-o", opts, str(mnt)],
           "unionfs-overlay": [OVERLAY, "-o", opts, str(mnt)]}[style]
    util.mount_kernel([sides["kernel"][1]], sides["kernel"][0], sides["kernel"][2], sides["kernel"][3])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        for s in sides.values():
            _odd(s[3], b"new\xfb").write_bytes(b"new\n")
            os.unlink(_odd(s[3], b"f\xff"))
        util.assert_trees_equal(util.snapshot(sides["kernel"][3]), util.snapshot(mnt))
        r = subprocess.run([UNIONFS, "umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert not util.is_mounted(mnt)
    finally:
        for s in sides.values():
            if util.is_mounted(s[3]):
                util.umount(s[3])
        util.kill_daemons(str(tmp_path))
    assert util.normalise_upper(sides["kernel"][0]) == util.normalise_upper(upper)
    if style != "unionfs-overlay":
        assert not log.exists() or "Traceback" not in log.read_text(errors="replace")


# ==================================================================================================
# The launcher's per-user directory


@pytest.mark.parametrize("setup", ["other-owner", "symlink"])
def test_launcher_leaves_other_users_run_dirs_alone(tmp_path: Path, setup: str) -> None:
    """``unionfs run`` makes a fresh per-run directory ($TMPDIR/.unionfs-run-<uid>-<id>) and removes
    the ones its killed predecessors left: never one of another user's, never through a symlink."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    planted = tmp_path / f".unionfs-run-{os.getuid()}-planted"
    if setup == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        os.symlink(tmp_path / "elsewhere", planted)
    else:
        planted.mkdir(mode=0o777)
        os.chown(planted, 12345, 12345)
    launcher_util.build_busybox_layer(tmp_path / "L", tmp_path / "work")
    (tmp_path / "U").mkdir()
    before = _tree(tmp_path)
    r = subprocess.run([UNIONFS, "run", f"{tmp_path}/U:{tmp_path}/L", "--", "/bin/true"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert _tree(tmp_path) == before   # the planted entry is untouched, and this run's directory is gone
    assert not util.is_mounted(planted)
