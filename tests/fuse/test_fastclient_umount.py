"""``unionfs umount MNT`` by the C client (unionfs/server/fastclient.c), without Python.

What a user sees: the mount is gone and its daemon (a resident server's worker, or a daemon of the
normal path) holds nothing of it when the command returns (its pidfile, log and socket gone, every fd
of the mount closed; then the daemon exits, or the worker goes back to the server to serve another
mount), so that the filesystem under the branches can be unmounted right after; a
path that is not mounted, a mount of another kind, a busy mount: the same line on stderr and the
same exit status as from the Python command; an unprivileged user unmounts the same way.  The client copied away from the Python command it falls
back to (`alone`) shows which of these it answers by itself: a fallback there exits 127.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import util
from launcher_util import PYTHON, UnprivUser, python_for, world_readable_tempdir
from test_resident import ENV, area, comm, root_server, run, server_pid, state_key, user_area, users
from test_resident_c import SOURCE, client, command_as

pytestmark = pytest.mark.usefixtures("need_fuse")

PY_UNIONFS = util.program("unionfs")
__all__ = ["area", "client", "root_server", "user_area", "users"]   # fixtures used here


@pytest.fixture(scope="module")
def alone() -> Iterator[Path]:
    """The C client built where no Python command is beside it (world-readable, for the user)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the C client")
    with world_readable_tempdir("unionfs-calone-") as d:
        subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", str(d / "unionfs"), str(SOURCE)], check=True)
        yield d / "unionfs"


def exited(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet (as `unionfs umount` counts it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):   # gone before the open, or between it and the read
        return True


def let_go(pid: int, strictly: bool = False) -> bool:
    """Holds nothing of its mount that a user could meet, as `unionfs umount` waits for: exited,
    or no fd open on any file or directory but /dev/null and the resident server's log (a worker
    that goes back to the server keeps its socket pair to it and the log it inherited); until it
    has unwound (not *strictly*), the FUSE device of the ended session and its state directory's
    fds too (its pidfile and log there are removed by then, or the log kept with what it says)."""
    if exited(pid):
        return True
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:   # gone meanwhile
        return True
    targets = []
    for name in names:
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:   # closed meanwhile
            pass
    state = state_of(pid)
    return all(t == os.devnull or t.startswith(("socket:[", "pipe:[", "anon_inode:"))
               or os.path.basename(t) == "server.log"
               or (not strictly and (t == "/dev/fuse" or t == state or t.startswith(state + "/")))
               for t in targets)


def state_of(pid: int) -> str:
    """The state directory of the user of *pid* (as the tests run: no XDG_RUNTIME_DIR)."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return "/run/unionfs"
    return "/run/unionfs" if uid == 0 else f"/tmp/unionfs-{uid}"


def done(pid: int) -> bool:
    """Its mount ended, the daemon is done with it: `exited`, or (a resident server's worker) back
    with the server as a spare, holding nothing of the mount."""
    return exited(pid) or (comm(pid) == "unionfs-spare" and let_go(pid, strictly=True))


def wait_exited(pid: int, until: Callable[[int], bool] = exited) -> bool:
    """Whether *pid* has `exited` (or is what *until* says) within the mount timeout."""
    deadline = time.monotonic() + util.MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if until(pid):
            return True
        time.sleep(0.005)
    return False


def wait_done(pid: int) -> bool:
    """Whether *pid* is `done` with its mount within the mount timeout."""
    return wait_exited(pid, done)


def mount(area: Path, via_server: bool) -> int:
    """A union of A and B on M, served by a worker of the server or by a daemon of the normal path;
    the daemon's pid."""
    env = dict(ENV, UNIONFS_SERVER="auto" if via_server else "off")
    r = run([PY_UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")], env=env)
    assert r.returncode == 0, r.stderr
    return int(Path(f"/run/unionfs/{state_key(area / 'M')}.pid").read_text().split()[0])


@pytest.mark.parametrize("via_server", [True, False], ids=["worker", "daemon"])
def test_umount_without_python(root_server: Path, area: Path, alone: Path, via_server: bool) -> None:
    daemon = mount(area, via_server)
    (area / "M" / "new").write_text("new\n")
    r = run([str(alone), "umount", str(area / "M")])
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert not util.is_mounted(area / "M")
    assert let_go(daemon), "umount returned before the daemon let go of the mount"
    key = state_key(area / "M")
    assert not list(root_server.glob(f"{key}.*")), "the daemon's pidfile, log or socket is left"
    assert wait_done(daemon) if via_server else wait_exited(daemon)
    assert (area / "A" / "new").read_text() == "new\n"
    # A relative path through a symlink, from another directory.
    daemon = mount(area, via_server)
    (area / "link").symlink_to("M")
    r = run([str(alone), "umount", "link"], cwd=area)
    assert (r.returncode, r.stderr) == (0, "")
    assert not util.is_mounted(area / "M") and let_go(daemon)
    # A mount point whose name mountinfo escapes.
    spaced = area / "a b\\c"
    spaced.mkdir()
    env = dict(ENV, UNIONFS_SERVER="auto" if via_server else "off")
    r = run([PY_UNIONFS, "mount", f"{area}/A:{area}/B", str(spaced)], env=env)
    assert r.returncode == 0, r.stderr
    try:
        daemon = int((root_server / f"{state_key(spaced)}.pid").read_text().split()[0])
        r = run([str(alone), "umount", str(spaced)])
        assert (r.returncode, r.stderr) == (0, "")
        assert not util.is_mounted(spaced) and let_go(daemon)
    finally:
        if util.is_mounted(spaced):
            util.umount(spaced)


@pytest.mark.parametrize("via_server", [True, False], ids=["worker", "daemon"])
def test_the_filesystem_under_the_branches_unmounts_right_after(root_server: Path, area: Path, alone: Path,
                                                                via_server: bool) -> None:
    """``unionfs umount MNT && umount BASE`` never finds BASE busy."""
    base = area / "T"
    base.mkdir()
    for _ in range(3):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(base)], check=True)
        try:
            for name in ("A", "B"):
                (base / name).mkdir()
            (base / "B" / "b").write_text("from B\n")
            env = dict(ENV, UNIONFS_SERVER="auto" if via_server else "off")
            r = run([PY_UNIONFS, "mount", f"{base}/A:{base}/B", str(area / "M")], env=env)
            assert r.returncode == 0, r.stderr
            assert (area / "M" / "b").read_text() == "from B\n"
            (area / "M" / "c").write_text("c\n")
            r = run(["sh", "-c", f"{alone} umount {area}/M && umount {base}"])
            assert (r.returncode, r.stderr) == (0, ""), r.stderr
        finally:
            if util.is_mounted(base):
                util.umount(area / "M")
                subprocess.run(["umount", "-l", str(base)])


def same_as_python(args: list[str], cwd: Path | None = None, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Run the C client (beside the Python command) and the Python command: same exit status and
    output, word for word; the C client's result."""
    client_dir: Path = kw.pop("client")
    fast = run([str(client_dir / "unionfs"), *args], cwd=cwd, **kw)
    slow = run([PY_UNIONFS, *args], cwd=cwd, **kw)
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    return fast


@pytest.mark.parametrize("what, answered_in_c", [
    ("{a}/M", True),            # a directory, not mounted
    ("M", True),                # relative
    ("{a}/it's", True),         # quoted as Python's repr quotes it
    ('{a}/say "it\'s"', True),
    ("{a}/back\\slash", True),
    ("/proc", True),            # mounted, but not a unionfs
    ("{a}/tmpfs", True),
    ("{a}/nothere", False),     # does not resolve: Python's realpath is not strict
    ("{a}/d\u00e9j\u00e0", False),  # not ASCII
])
def test_not_a_unionfs_mount(area: Path, client: Path, alone: Path, what: str, answered_in_c: bool) -> None:
    path = what.format(a=area)
    if "nothere" not in path and not (area / path).exists():
        (area / path).mkdir()
    if path.endswith("tmpfs"):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)
    try:
        r = same_as_python(["umount", path], cwd=area, client=client)
        assert r.returncode == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
        by_c = run([str(alone), "umount", path], cwd=area)
        assert (by_c.returncode != 127) == answered_in_c, by_c.stderr
        if answered_in_c:
            assert (by_c.returncode, by_c.stderr) == (r.returncode, r.stderr)
    finally:
        if path.endswith("tmpfs"):
            subprocess.run(["umount", path], check=True)


@pytest.mark.parametrize("args", [["umount"], ["umount", "--help"], ["umount", "-x", "M"], ["umount", "M", "M"],
                                  ["umount", "--", "M"]])
def test_other_command_lines_are_the_clis(area: Path, client: Path, args: list[str]) -> None:
    same_as_python(args, cwd=area, client=client)


@pytest.mark.parametrize("via_server", [True, False], ids=["worker", "daemon"])
def test_busy_mount(root_server: Path, area: Path, client: Path, alone: Path, via_server: bool) -> None:
    """A process working in the mount: the same error as Python's; the mount and its daemon stay."""
    daemon = mount(area, via_server)
    busy = subprocess.Popen(["sleep", "60"], cwd=area / "M")
    try:
        r = same_as_python(["umount", str(area / "M")], client=client)
        assert r.returncode == 1 and "busy" in r.stderr, r.stderr
        by_c = run([str(alone), "umount", str(area / "M")])
        assert (by_c.returncode, by_c.stderr) == (1, r.stderr)
        assert util.is_mounted(area / "M") and not exited(daemon)
        assert (area / "M" / "b").read_text() == "from B\n"
    finally:
        busy.kill()
        busy.wait()
    r = run([str(alone), "umount", str(area / "M")])
    assert (r.returncode, r.stderr) == (0, "")
    assert let_go(daemon) and not util.is_mounted(area / "M")


def test_umount_waits_for_the_pidfile_lock(root_server: Path, area: Path, alone: Path) -> None:
    """The client returns once the pidfile's lock is let go of, not before: here a stand-in holds a
    pidfile of the same record locked for a second, as a daemon slow to let go would."""
    daemon = mount(area, via_server=False)
    pidfile = root_server / f"{state_key(area / 'M')}.pid"
    stand_in = pidfile.with_name(pidfile.name + ".new")
    stand_in.write_text(pidfile.read_text())
    holder = subprocess.Popen(
        [PYTHON, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.rename(sys.argv[1], sys.argv[2]); print('held', flush=True); time.sleep(1.0)",
         str(stand_in), str(pidfile)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        started = time.monotonic()
        r = run([str(alone), "umount", str(area / "M")])
        waited = time.monotonic() - started
        assert (r.returncode, r.stderr) == (0, "")
        assert not util.is_mounted(area / "M")
        assert waited >= 0.5 and holder.poll() is not None, f"returned after {waited:.2f} s, the lock still held"
    finally:
        holder.kill()
        holder.wait()
    assert wait_exited(daemon)
    pidfile.unlink(missing_ok=True)


def test_a_pidfile_that_names_no_process(root_server: Path, area: Path, alone: Path) -> None:
    """A pidfile with nothing to wait for (rewritten, or a daemon gone): unmounted, no wait."""
    daemon = mount(area, via_server=False)
    pidfile = root_server / f"{state_key(area / 'M')}.pid"
    pidfile.write_text("not a pid\n")
    r = run([str(alone), "umount", str(area / "M")])
    assert (r.returncode, r.stderr) == (0, "")
    assert not util.is_mounted(area / "M")
    wait_exited(daemon)
    pidfile.unlink(missing_ok=True)   # the daemon leaves a pidfile that is no longer its own


def test_user_umount_through_the_c_client(users: tuple[UnprivUser, UnprivUser], user_area: tuple[Path, Path],
                                          client: Path, alone: Path) -> None:
    me, _ = users
    if python_for(me)[0] != PYTHON:
        pytest.skip("the user cannot run this checkout's venv")
    base, state = user_area
    as_user = functools.partial(command_as, me)
    for _ in range(2):   # the first mount starts the user's server
        r = as_user(str(client / "unionfs"), "mount", f"{base}/A:{base}/B", f"{base}/M")
        assert r.returncode == 0, r.stderr
        daemon = int((state / f"{state_key(base / 'M')}.pid").read_text().split()[0])
        assert os.stat(f"/proc/{daemon}").st_uid == me.uid
        assert server_pid(state) is not None
        r = as_user(str(alone), "umount", f"{base}/M")
        assert (r.returncode, r.stderr) == (0, "")
        assert not util.is_mounted(base / "M") and let_go(daemon)
        assert not list(state.glob(f"{state_key(base / 'M')}.*"))
        assert wait_done(daemon)
    # Not mounted, and not a unionfs: the Python command's words.
    for path in (f"{base}/M", "/proc"):
        fast = as_user(str(client / "unionfs"), "umount", path)
        slow = as_user(PY_UNIONFS, "umount", path)
        assert (fast.returncode, fast.stderr) == (slow.returncode, slow.stderr) == (1, slow.stderr)
        assert as_user(str(alone), "umount", path).stderr == slow.stderr
