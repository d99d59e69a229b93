"""What `unionfs umount` waits for, and what a daemon still does after it has returned.

What a user sees: when the command returns, the mount's pidfile, control socket and (empty) log are
gone and nothing on the filesystems under its branches is held, so that the same mount point can be
mounted again at once and the filesystem under the branches unmounted.  The daemon (a resident
server's worker, or a daemon of the normal path) lets go of that much the moment the kernel ends
the session; the rest of its unwinding comes after, at the lowest priority.  Whatever a daemon does
at its end touches none of what a later mount on the same point made meanwhile: that mount keeps
its control socket, pidfile and log, and a reused worker serves it at its own priority.  Where the state directory is on a
branch's filesystem (a mount other than the root's), the daemon lets go of the lock only once all
else is closed, so that this filesystem can be unmounted right after.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import util
from test_fastclient_umount import alone, done, wait_exited
from test_resident import ENV, area, root_server, run, server_pid, state_key
from test_stale_state import STATE, UNIONFS, in_private_state, key

from unionfs import branchctl

pytestmark = pytest.mark.usefixtures("need_fuse")
libc = ctypes.CDLL(None, use_errno=True)
__all__ = ["alone", "area", "root_server"]   # fixtures used here


def nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[16])


def let_go_of(held: int) -> bool:
    """Whether the pidfile open as *held* is let go of (its lock) within the mount timeout; closes it."""
    deadline = time.monotonic() + util.MOUNT_TIMEOUT
    try:
        while True:
            try:
                fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.001)
    finally:
        os.close(held)


#: Run in the test's mount namespace: unmount $1 as `unionfs umount` does (umount2, then the
#: pidfile $2's lock) and say what the daemon still has open under $3 the moment the lock is free.
UNMOUNT_AND_LOOK = """
import ctypes, fcntl, os, sys, time
mnt, pidfile, under = sys.argv[1:]
pid = int(open(pidfile).read().split()[0])
held = os.open(pidfile, os.O_RDONLY)
assert ctypes.CDLL(None, use_errno=True).umount2(mnt.encode(), 0) == 0
deadline = time.monotonic() + 30
while True:
    try:
        fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
        break
    except BlockingIOError:
        assert time.monotonic() < deadline, "the lock was never let go of"
left = []
try:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target == under or target.startswith(under + "/"):
            left.append(target)
except FileNotFoundError:
    pass
print("left=" + (",".join(left) or "nothing"))
"""


def mount(area: Path, state: Path) -> int:
    r = run([UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")], env=dict(ENV, UNIONFS_SERVER="auto"))
    assert r.returncode == 0, r.stderr
    return int((state / f"{state_key(area / 'M')}.pid").read_text().split()[0])


def test_the_same_point_mounted_again_before_the_last_daemon_is_done(root_server: Path, area: Path,
                                                                     alone: Path) -> None:
    """A worker is stopped, its mount unmounted (its pidfile stays locked) and the same point
    mounted again before the worker goes on: what it then does at its session's end must leave the
    new mount's pidfile, control socket and log alone (the log it shares with it, too)."""
    k = state_key(area / "M")
    mount(area, root_server)   # (the server's first mount: it has spares from then on)
    r = run([str(alone), "umount", str(area / "M")])
    assert (r.returncode, r.stderr) == (0, "")
    worker = mount(area, root_server)
    server = server_pid(root_server)
    assert server is not None
    for i in range(4):
        (area / "M" / f"f{i}").write_text(f"{i}\n")
        held = os.open(root_server / f"{k}.pid", os.O_RDONLY | os.O_CLOEXEC)
        os.kill(worker, signal.SIGSTOP)
        try:
            # As `unionfs umount` does, but without a look at the mount point (the stopped daemon
            # would have to answer it).
            assert libc.umount2(os.fsencode(area / "M"), 0) == 0, os.strerror(ctypes.get_errno())
            assert not util.is_mounted(area / "M")
            with pytest.raises(BlockingIOError):   # not let go of yet
                fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
            following = mount(area, root_server)
            assert following != worker
        finally:
            os.kill(worker, signal.SIGCONT)
        assert let_go_of(held), "the worker did not let go of its mount"
        assert wait_exited(worker, done), "the worker did not end its mount"
        assert sorted(p.name for p in root_server.glob(f"{k}.*")) == [f"{k}.ctl", f"{k}.log", f"{k}.pid"]
        assert int((root_server / f"{k}.pid").read_text().split()[0]) == following
        assert branchctl.list_branches(str(area / "M"))["branches"][0]["path"] == f"{area}/A"
        assert nice_of(following) == nice_of(server), "a worker serves its mount at the lowest priority"
        worker = following
    assert (area / "M" / "f3").read_text() == "3\n"
    r = run([str(alone), "umount", str(area / "M")])
    assert (r.returncode, r.stderr) == (0, "")
    assert sorted(p.name for p in root_server.glob(f"{k}.*")) == []


def test_state_directory_on_a_branch_filesystem(tmp_path: Path) -> None:
    """The state directory (a tmpfs of the test's own) holds the branches too: the moment the
    lock is let go of, the daemon holds nothing there any more, and the tmpfs can be unmounted."""
    look = tmp_path / "look.py"
    look.write_text(UNMOUNT_AND_LOOK)
    m = tmp_path / "M"
    m.mkdir()
    r = in_private_state(f"""
        for i in 1 2 3; do
            mount -t tmpfs -o mode=0700 tmpfs {STATE}
            mkdir -p {STATE}/br/A {STATE}/br/B
            echo b > {STATE}/br/B/b
            $U mount {STATE}/br/A:{STATE}/br/B {m}
            echo x > {m}/x
            {sys.executable} {look} {m} {STATE}/{key(m)}.pid {STATE}
            umount {STATE} && echo freed=yes || echo freed=no
        done
    """)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.split() == ["left=nothing", "freed=yes"] * 3, r.stdout


def test_a_filesystem_mounted_inside_a_branch(tmp_path: Path) -> None:
    """The union's fds on a filesystem mounted inside a branch (a directory it listed, a file it
    read) are let go of with the branches': that filesystem can be unmounted right after."""
    look = tmp_path / "look.py"
    look.write_text(UNMOUNT_AND_LOOK)
    a = tmp_path
    for name in ("A", "B", "M"):
        (a / name).mkdir()
    r = in_private_state(f"""
        for i in 1 2 3; do
            mkdir -p {a}/B/sub
            mount -t tmpfs tmpfs {a}/B/sub
            mkdir {a}/B/sub/d && echo f > {a}/B/sub/d/f
            $U mount {a}/A:{a}/B {a}/M
            ls {a}/M/sub/d >/dev/null && cat {a}/M/sub/d/f >/dev/null
            {sys.executable} {look} {a}/M {STATE}/{key(a / "M")}.pid {a}/B/sub
            umount {a}/B/sub && echo freed=yes || echo freed=no
        done
    """)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.split() == ["left=nothing", "freed=yes"] * 3, r.stdout


def test_log_lines_after_the_end_are_kept(tmp_path: Path) -> None:
    """A line logged after the empty log was tidied away at the session's end goes to the log of
    its name, not with the file."""
    from unionfs.server.statedir import StateDir

    state_path = tmp_path / "state"
    state = StateDir.open(create=True, path=str(state_path))
    assert state is not None
    log = state.open_log("k.log")
    os.unlink(log.path)            # as the shim does, the log being empty then
    os.write(log.fd, b"late\n")
    log.tidy()
    assert (state_path / "k.log").read_bytes() == b"late\n"
    os.close(log.fd)
    state.close()


def test_an_empty_log_another_daemon_holds_stays(tmp_path: Path) -> None:
    from unionfs.server.statedir import StateDir

    state = StateDir.open(create=True, path=str(tmp_path / "state"))
    assert state is not None
    first, second = state.open_log("k.log"), state.open_log("k.log")
    first.tidy()
    assert os.path.exists(first.path), "an empty log another daemon writes to was removed"
    os.close(first.fd)
    second.tidy()
    assert not os.path.exists(second.path)
    os.close(second.fd)
    state.close()


def test_a_log_tidied_away_meanwhile_is_made_anew(tmp_path: Path) -> None:
    """A daemon that opens a log while another tidies it away (holding it exclusively for a
    moment) waits, and then writes to a log that is there, not to the removed file."""
    import fcntl
    import threading

    from unionfs.server.statedir import StateDir

    state = StateDir.open(create=True, path=str(tmp_path / "state"))
    assert state is not None
    path = tmp_path / "state" / "k.log"
    path.write_bytes(b"")
    tidier = os.open(path, os.O_WRONLY)
    fcntl.flock(tidier, fcntl.LOCK_EX)
    opened = []
    t = threading.Thread(target=lambda: opened.append(state.open_log("k.log")))
    t.start()
    t.join(0.1)
    assert t.is_alive(), "the log was opened while another held it exclusively"
    path.unlink()
    os.close(tidier)
    t.join(5)
    assert opened and os.fstat(opened[0].fd).st_nlink == 1 and path.exists()
    os.close(opened[0].fd)
    state.close()


def test_a_socket_another_mount_made_stays(tmp_path: Path) -> None:
    from unionfs.server import control
    from unionfs.server.statedir import StateDir

    state = StateDir.open(create=True, path=str(tmp_path / "state"))
    assert state is not None
    first = control.listen(state, "k")
    assert first is not None
    made = control.bound(state, "k")
    second = control.listen(state, "k")   # a later mount on the same point: the name is its own now
    assert second is not None
    control.forget(state, "k", made)
    assert (tmp_path / "state" / f"k{control.SUFFIX}").exists(), "the later mount's socket was removed"
    control.forget(state, "k", control.bound(state, "k"))
    assert not (tmp_path / "state" / f"k{control.SUFFIX}").exists()
    first.close()
    second.close()
    state.close()

