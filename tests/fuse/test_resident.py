"""The resident server: ``unionfs mount``, ``unionfs-overlay`` and mount(8) hand their mounts to it.

What a user sees: the mount works and is served by a worker of the server (its daemon, as the
pidfile names it, is the server's child); a user error says the same line with the server as
without; with no server to be had (``UNIONFS_SERVER=off``, a stale socket file, a server that
answers nonsense) the mount still works, on the normal path; a server killed with SIGKILL leaves its
mounts served; another user cannot use my server; an unprivileged user's mounts (fusermount3) go
through that user's own server.  (podman: tests/images/test_resident_podman.py.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from launcher_util import UnprivUser, dev_fuse_mode, python_for, unprivileged_user, world_readable_tempdir

pytestmark = pytest.mark.usefixtures("need_fuse")

UNIONFS = util.program("unionfs")
OVERLAY = util.program("unionfs-overlay")
ROOT_STATE = Path("/run/unionfs")
ENV = dict(os.environ, UNIONFS_SERVER="auto")


def run(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=ENV if env is None else env, **kw)


def server_pid(state: Path) -> int | None:
    """The pid of the server listening in *state*, as the kernel tells its peer; None if none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(str(state / "server.sock"))
        except OSError:
            return None
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4], sys.byteorder)


def state_key(mountpoint: Path) -> str:
    return hashlib.sha1(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]


def daemon_of(state: Path, mountpoint: Path) -> int:
    return int((state / f"{state_key(mountpoint)}.pid").read_text().split()[0])


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def wait_gone(pid: int, or_spare: bool = False) -> bool:
    """Whether *pid* is gone within the mount timeout (with *or_spare*, or back with its server as
    a spare: a worker done with its mount, `unionfs.server.resident`)."""
    deadline = time.monotonic() + util.MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if or_spare and comm(pid) == "unionfs-spare":
            return True
        time.sleep(0.01)
    return False


def wait_done(pid: int) -> bool:
    """A worker whose mount has ended is done with it within the mount timeout."""
    return wait_gone(pid, or_spare=True)


@pytest.fixture
def root_server() -> Iterator[Path]:
    """Root's state directory, with no server in it before and after the test."""
    if os.geteuid() != 0:
        pytest.skip("root's resident server: the tests run as root (CI does)")
    run([UNIONFS, "server", "stop"])
    yield ROOT_STATE
    r = run([UNIONFS, "server", "stop"])
    assert r.returncode == 0, r.stderr


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Path]:
    for name in ("A", "B", "U", "W", "M"):
        (tmp_path / name).mkdir()
    (tmp_path / "B" / "b").write_text("from B\n")
    yield tmp_path
    while util.is_mounted(tmp_path / "M"):
        util.umount(tmp_path / "M")


def assert_served_by(state: Path, mountpoint: Path, server: int | None) -> int:
    """The daemon of *mountpoint* is a worker of *server* (None: of no server); its pid."""
    daemon = daemon_of(state, mountpoint)
    if server is None:
        cmdline = Path(f"/proc/{daemon}/cmdline").read_bytes()
        assert os.fsencode(mountpoint) in cmdline, "served by a worker, not by the normal path"
    else:
        assert parent_of(daemon) == server, "the mount was not handed to the server"
    return daemon


def test_mount_is_handed_to_the_server(root_server: Path, area: Path) -> None:
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    server = server_pid(root_server)
    assert server is not None, "no server was started"
    daemon = assert_served_by(root_server, area / "M", server)
    assert (area / "M" / "b").read_text() == "from B\n"
    (area / "M" / "new").write_text("new\n")
    assert (area / "A" / "new").read_text() == "new\n"
    assert util.mount_fstype(area / "M") == "fuse.unionfs"
    r = run([UNIONFS, "umount", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert wait_done(daemon) and not util.is_mounted(area / "M")
    assert not (area / "A" / ".wh..wh.unionfs.work").exists(), "the worker did not clean up"
    log = root_server / f"{state_key(area / 'M')}.log"
    assert not log.exists(), f"the worker logged warnings or errors: {log.read_text()}"
    # A second mount goes to the same server.
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert_served_by(root_server, area / "M", server)


def test_overlay_and_mount8(root_server: Path, area: Path) -> None:
    opts = f"lowerdir={area}/B,upperdir={area}/U,workdir={area}/W"
    r = run([OVERLAY, "-o", opts, "-o", "squash_to_root", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert r.stderr == "unionfs-overlay: ignoring unsupported option squash_to_root\n"
    assert_served_by(root_server, area / "M", server_pid(root_server))
    assert (area / "M" / "b").read_text() == "from B\n"
    util.umount(area / "M")
    # mount(8) resets PATH: the program under test is named as mount.fuse3's PROGRAM#SOURCE.
    r = run(["mount", "-t", "fuse", f"{OVERLAY}#overlay", "-o", opts, str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert_served_by(root_server, area / "M", server_pid(root_server))
    os.unlink(area / "M" / "b")
    assert sorted(os.listdir(area / "M")) == [] and (area / "B" / "b").exists()
    r = run(["mount", "-t", "fuse", f"{UNIONFS}#{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert_served_by(root_server, area / "M", server_pid(root_server))
    assert (area / "M" / "b").read_text() == "from B\n"


@pytest.mark.parametrize("args", [
    ["mount", "{a}/nothere:{a}/B", "{a}/M"],
    ["mount", "-o", "lowerdir={a}/B,upperdir={a}/U", "{a}/M"],
    ["mount", "{a}/A:{a}/B", "{a}/A/M"],
    ["overlay", "-o", "lowerdir={a}/nothere", "{a}/M"],
])
def test_user_errors_say_the_same(root_server: Path, area: Path, args: list[str]) -> None:
    (area / "A" / "M").mkdir()
    cmd = [OVERLAY if args[0] == "overlay" else UNIONFS, *[a.format(a=area) for a in args[args[0] == "overlay":]]]
    fast = run(cmd)
    slow = run(cmd, env=dict(ENV, UNIONFS_SERVER="off"))
    assert (fast.returncode, fast.stderr) == (slow.returncode, slow.stderr)
    assert fast.returncode == 1 and len(fast.stderr.splitlines()) == 1, fast.stderr
    assert not util.is_mounted(area / "M")


def test_normal_path_when_off_or_stale(root_server: Path, area: Path) -> None:
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")], env=dict(ENV, UNIONFS_SERVER="off"))
    assert r.returncode == 0, r.stderr
    assert server_pid(root_server) is None, "UNIONFS_SERVER=off started a server"
    assert_served_by(root_server, area / "M", None)
    util.umount(area / "M")
    # A socket file nobody listens on (a server that died): the next mount starts a server.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(root_server / "server.sock"))
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert_served_by(root_server, area / "M", server_pid(root_server))


def test_normal_path_when_the_server_talks_nonsense(root_server: Path, area: Path) -> None:
    """A listener that is no server of ours (and holds the lock, so none can start): the mount
    still works, on the normal path, and nothing is left mounted by the attempt."""
    lock = os.open(root_server / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(root_server / "server.sock"))
    listener.listen(4)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.send(b"nonsense")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert_served_by(root_server, area / "M", None)
        assert [mp for mp, _, _ in util.mounts() if mp == os.fsencode(area / "M")] == [os.fsencode(area / "M")]
    finally:
        t.join(5)
        listener.close()
        os.unlink(root_server / "server.sock")
        os.close(lock)


def test_sigkill_of_the_server_leaves_mounts_served(root_server: Path, area: Path) -> None:
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    daemon = assert_served_by(root_server, area / "M", server)
    os.kill(server, signal.SIGKILL)
    assert wait_gone(server)
    assert (area / "M" / "b").read_text() == "from B\n"
    (area / "M" / "after").write_text("x")
    assert (area / "A" / "after").exists()
    r = run([UNIONFS, "umount", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert wait_gone(daemon)
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert server_pid(root_server) not in (None, server)


# --------------------------------------------------------------------------------------------------
# Users other than root: fusermount3, the user's own server, and no one else's


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[UnprivUser, UnprivUser]]:
    if os.geteuid() != 0:
        pytest.skip("making the test users needs root (CI runs as root)")
    with unprivileged_user() as me, unprivileged_user(subids=True) as other, dev_fuse_mode(0o666):
        yield me, other


def as_user(user: UnprivUser, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    python, path = python_for(user)
    if os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        os.chmod("/dev/fuse", 0o666)  # another test's dev_fuse_mode() put it back meanwhile
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": "/", "LC_ALL": "C.UTF-8", "UNIONFS_SERVER": "auto"}
    cmd = [python, "-c", script] if script is not None else [python, "-m", "unionfs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL,
                          env=env, user=user.uid, group=user.gid, extra_groups=[])


@pytest.fixture
def user_area(users: tuple[UnprivUser, UnprivUser]) -> Iterator[tuple[Path, Path]]:
    me, _ = users
    state = Path(f"/tmp/unionfs-{me.uid}")
    with world_readable_tempdir("unionfs-resident-") as base:
        for name in ("A", "B", "M"):
            (base / name).mkdir()
        (base / "B" / "b").write_text("from B\n")
        for p in [base, *base.rglob("*")]:
            os.lchown(p, me.uid, me.gid)
        try:
            yield base, state
        finally:
            while util.is_mounted(base / "M"):
                util.umount(base / "M")
            as_user(me, "server", "stop")


def mount_as(user: UnprivUser, base: Path) -> None:
    """``unionfs mount A:B M`` under *base*, as *user*: it works and says nothing."""
    r = as_user(user, "mount", f"{base}/A:{base}/B", f"{base}/M")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_user_mount_goes_through_the_users_server(users: tuple[UnprivUser, UnprivUser],
                                                  user_area: tuple[Path, Path]) -> None:
    me, _ = users
    base, state = user_area
    mount_as(me, base)
    server = server_pid(state)
    assert server is not None and os.stat(f"/proc/{server}").st_uid == me.uid
    daemon = assert_served_by(state, base / "M", server)
    assert os.stat(f"/proc/{daemon}").st_uid == me.uid
    r = as_user(me, script=f"print(open({str(base / 'M' / 'b')!r}).read(), end='')")
    assert r.stdout == "from B\n", r.stderr
    assert util.mount_fstype(base / "M") == "fuse.unionfs"
    r = as_user(me, "umount", f"{base}/M")
    assert r.returncode == 0, r.stderr
    assert wait_done(daemon)


def test_another_user_cannot_use_my_server(users: tuple[UnprivUser, UnprivUser],
                                           user_area: tuple[Path, Path]) -> None:
    """Even with the socket reachable (its directory opened up), another user's connection is
    closed without an answer."""
    me, other = users
    base, state = user_area
    r = as_user(me, "server")
    assert r.returncode == 0, r.stderr
    assert server_pid(state) is not None
    mode = os.stat(state).st_mode & 0o7777
    os.chmod(state, 0o755)
    os.chmod(state / "server.sock", 0o777)
    try:
        probe = (f"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
                 f"s.connect({str(state / 'server.sock')!r})\n"
                 f"try:\n    s.send(b'hello'); print(repr(s.recv(100)))\n"
                 f"except OSError:\n    print(repr(b''))")
        r = as_user(other, script=probe)
    finally:
        os.chmod(state, mode)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "b''", "the server answered another user"


@pytest.mark.parametrize("xdg", [None, "/nonexistent", "relative", "{tmp}"])
def test_client_finds_the_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          xdg: str | None) -> None:
    """The client's copy of the state directory rule agrees with statedir's, for root and others."""
    from unionfs.server import fastmount, statedir

    if xdg is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", xdg.format(tmp=tmp_path))
    for euid in (0, 1000):
        monkeypatch.setattr(os, "geteuid", lambda euid=euid: euid)
        assert fastmount.socket_path() == os.path.join(statedir.state_dir(), fastmount.SOCKET_NAME)



def test_a_server_whose_socket_is_removed_exits(root_server: Path) -> None:
    """A state directory cleared under a running server (by hand, by a reboot's tmpfiles) leaves it
    unreachable: it exits by itself instead of idling on."""
    r = run([UNIONFS, "server"])
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    os.unlink(root_server / "server.sock")
    assert wait_gone(server), "the server outlived its socket"


def test_a_client_in_another_pid_namespace_mounts_on_its_own(root_server: Path, area: Path) -> None:
    """The kernel names a request's caller in the mounter's PID namespace: a server elsewhere would
    look up the wrong process for its groups, so a client in another PID namespace never uses it."""
    r = run([UNIONFS, "server"])
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    # Unmounted inside: a daemon killed with its PID namespace would leave its state files behind.
    script = f"{UNIONFS} mount {area}/A:{area}/B {area}/M && cat {area}/M/b && {UNIONFS} umount {area}/M"
    r = run(["unshare", "--pid", "--fork", "sh", "-c", script])
    assert r.returncode == 0 and r.stdout == "from B\n", r.stderr
    workers = [p for p in children(server) if comm(p) not in ("unionfs-spare", "unionfs-warming")]
    assert workers == [], "a client in another PID namespace handed its mount to the server"
    assert not list(root_server.glob(f"{state_key(area / 'M')}.*")), "the daemon left its state files"


def _alive_child(pid: int, parent: int) -> bool:
    try:
        return parent_of(pid) == parent
    except OSError:
        return False


def children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _alive_child(int(p), pid)]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def spares(server: int, count: int = 2) -> list[int]:
    """The server's spare workers once *count* are ready (or what is there when the time runs out):
    forked ahead of a mount, named so (after a rehearsal of a mount's start, "unionfs-warming")
    until handed one."""
    deadline = time.monotonic() + util.MOUNT_TIMEOUT
    found: list[int] = []
    while time.monotonic() < deadline:
        found = [p for p in children(server) if comm(p) == "unionfs-spare"]
        if len(found) >= count:
            return found
        time.sleep(0.01)
    return found


def test_the_next_mount_goes_to_the_spare_worker(root_server: Path, area: Path) -> None:
    """The server keeps two workers forked ahead of the next mounts: one of them serves the next
    mount (the pidfile names it) while the other waits, and no third is forked, as the first comes
    back to the server once its mount has ended and serves the mount after (first, as its memory is
    its own already).  The spares go with the server; a worker serving a mount stays until the
    mount ends, and then exits."""
    r = run([UNIONFS, "server"])
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    waiting = spares(server)
    assert len(waiting) == 2, f"{len(waiting)} spare workers after the server started, not 2"
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    daemon = assert_served_by(root_server, area / "M", server)
    assert daemon in waiting, "the mount was not handed to a spare"
    assert comm(daemon) != "unionfs-spare"
    assert (area / "M" / "b").read_text() == "from B\n"
    (area / "M" / "new").write_text("new\n")
    assert (area / "A" / "new").read_text() == "new\n"
    other = [p for p in waiting if p != daemon]
    time.sleep(0.2)
    assert sorted(children(server)) == sorted([daemon, *other]), "a spare was forked while the worker serves"
    r = run([UNIONFS, "umount", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert sorted(spares(server)) == sorted(waiting), "the worker did not come back as a spare"
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert assert_served_by(root_server, area / "M", server) == daemon, "the worker back was not first"
    assert (area / "M" / "new").read_text() == "new\n" and (area / "M" / "b").read_text() == "from B\n"
    r = run([UNIONFS, "server", "stop"])
    assert r.returncode == 0, r.stderr
    assert all(wait_gone(spare) for spare in other), "a spare outlived its server"
    assert (area / "M" / "b").read_text() == "from B\n", "stopping the server stopped a worker"
    r = run([UNIONFS, "umount", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert wait_gone(daemon), "a worker whose server is gone outlived its mount"


def _direct_change_seen(top: Path, mnt: Path) -> int:
    """``-o udba=notify``: a name looked up in vain, then made directly in a branch, shows in the
    mount, which the kernel sees only once the daemon has invalidated the negative entry it had
    cached (a thread of the daemon sends that).  The daemon's pid."""
    upper, lower = top / "A", top / "B"
    for d in (upper, lower, mnt):
        d.mkdir(parents=True)
    (lower / "b").write_text("from B\n")
    r = run([UNIONFS, "mount", "-o", "udba=notify", f"{upper}:{lower}", str(mnt)])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    try:
        daemon = daemon_of(ROOT_STATE, mnt)
        assert (mnt / "b").read_text() == "from B\n"
        assert not (mnt / "z").exists()
        (lower / "z").write_text("made below\n")
        deadline = time.monotonic() + 2
        while not (mnt / "z").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (mnt / "z").read_text() == "made below\n", "the name made below is not seen: not invalidated"
    finally:
        r = run([UNIONFS, "umount", str(mnt)])
        assert r.returncode == 0, r.stderr
    return daemon


def test_a_worker_back_from_a_mount_serves_the_next_as_new(root_server: Path, area: Path) -> None:
    """The mount a worker serves after another sees only its own branches, and the daemon's
    notices to the kernel (invalidated names) still reach it, as they did in the first."""
    r = run([UNIONFS, "server"])
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    spares(server)
    served = _direct_change_seen(area / "one", area / "M1")
    assert spares(server).count(served) == 1, "the worker did not come back"
    assert _direct_change_seen(area / "two", area / "M2") == served, "the second mount had another worker"
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert daemon_of(root_server, area / "M") == served
    assert os.listdir(area / "M") == ["b"]


def test_a_client_that_goes_after_its_plan(root_server: Path, area: Path) -> None:
    """A C client is handed to a warm spare once answered its plan, and sends the spare its fds
    after mounting; one that goes instead (its open or mount failed: it runs the Python command)
    costs that spare, which exits leaving nothing behind, and the next mount is served."""
    r = run([UNIONFS, "server"])
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    waiting = spares(server)
    bindir = os.path.realpath(os.path.dirname(sys.executable))   # the build, as the C client names it
    args = [b"argv1", os.fsencode(bindir), b"unionfs", b"mount", os.fsencode(f"{area}/A:{area}/B"),
            os.fsencode(area / "M")]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(root_server / "server.sock"))
        cwd = os.open(area, os.O_PATH | os.O_DIRECTORY)
        try:
            socket.send_fds(s, [b"\0".join(args)], [cwd])
        finally:
            os.close(cwd)
        assert s.recv(65536).startswith(b"plan\0")
    deadline = time.monotonic() + util.MOUNT_TIMEOUT
    while all(comm(p) == "unionfs-spare" for p in waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    gone = [p for p in waiting if comm(p) != "unionfs-spare"]
    assert len(gone) == 1 and wait_gone(gone[0]), "the spare that had the client did not end"
    assert not util.is_mounted(area / "M")
    assert not list(root_server.glob(f"{state_key(area / 'M')}.*")), "a pidfile, log or socket is left"
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert_served_by(root_server, area / "M", server)
    assert (area / "M" / "b").read_text() == "from B\n"


def test_a_worker_serves_one_mount_when_asked(root_server: Path, area: Path) -> None:
    """``UNIONFS_REUSE=1``: the worker exits with its mount, and a spare is forked in its place."""
    r = run([UNIONFS, "server"], env=dict(ENV, UNIONFS_REUSE="1"))
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    waiting = spares(server)
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    daemon = assert_served_by(root_server, area / "M", server)
    following = spares(server)
    assert len(following) == 2 and daemon not in following and set(waiting) - {daemon} < set(following)
    r = run([UNIONFS, "umount", str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert wait_gone(daemon)


def test_as_many_spares_as_asked_for(root_server: Path, area: Path) -> None:
    r = run([UNIONFS, "server"], env=dict(ENV, UNIONFS_SPARE="1"))
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    assert len(spares(server, 1)) == 1
    time.sleep(0.2)
    assert len(children(server)) == 1, "more than the one spare asked for"


def test_no_spare_when_asked_for_none(root_server: Path, area: Path) -> None:
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")], env=dict(ENV, UNIONFS_SPARE="0"))
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    daemon = assert_served_by(root_server, area / "M", server)
    time.sleep(0.2)
    assert children(server) == [daemon], "a spare was forked under UNIONFS_SPARE=0"
    assert (area / "M" / "b").read_text() == "from B\n"


def test_a_killed_spare_is_replaced(root_server: Path, area: Path) -> None:
    r = run([UNIONFS, "server"])
    assert r.returncode == 0, r.stderr
    server = server_pid(root_server)
    assert server is not None
    killed = spares(server)
    assert killed
    for spare in killed:
        os.kill(spare, signal.SIGKILL)
    assert all(wait_gone(spare) for spare in killed)
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    daemon = assert_served_by(root_server, area / "M", server)
    assert daemon not in killed
    replaced = spares(server)
    assert len(replaced) == 2 and not set(replaced) & set(killed), "the killed spares were not replaced"
    assert (area / "M" / "b").read_text() == "from B\n"
