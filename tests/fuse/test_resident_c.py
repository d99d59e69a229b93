"""The mount client in C (unionfs/server/fastclient.c) in front of ``unionfs`` and ``unionfs-overlay``.

What a user sees: the same mounts as from the Python command, served by a worker of the resident
server, with the same notes on stderr; every error line, exit status and help text the Python
command's own (the client hands those command lines to it); no server, ``UNIONFS_SERVER=off``, a
caller in another mount namespace: the mount still works, on the Python path; an unprivileged user's
mount goes through fusermount3 and that user's server.  The server's log says which client handed
each mount over.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from launcher_util import (
    PYTHON,
    UnprivUser,
    python_for,
    world_readable_tempdir,
)
from test_resident import (
    ENV,
    area,
    assert_served_by,
    root_server,
    run,
    server_pid,
    user_area,
    users,
    wait_gone,
)

pytestmark = pytest.mark.usefixtures("need_fuse")

SOURCE = Path(__file__).resolve().parents[2] / "unionfs" / "server" / "fastclient.c"
__all__ = ["area", "root_server", "user_area", "users"]   # fixtures used here


@pytest.fixture(scope="module")
def client() -> Iterator[Path]:
    """A directory with ``unionfs`` and ``unionfs-overlay`` linked to the C client, which lives
    beside the Python commands (as scripts/setup.sh builds it; built here when it is missing or old)."""
    binary = Path(util.program("unionfs")).parent / "unionfs-fastclient"
    if not binary.exists() or binary.stat().st_mtime < SOURCE.stat().st_mtime:
        if shutil.which("cc") is None:
            pytest.skip("no C compiler for the C client")
        tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
        subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", str(tmp), str(SOURCE)], check=True)
        tmp.replace(binary)
    with world_readable_tempdir("unionfs-cbin-") as links:
        for name in ("unionfs", "unionfs-overlay"):
            (links / name).symlink_to(binary)
        yield links


def handed_by(state: Path, mountpoint: Path, nth: int) -> str:
    """Which client ("C" or "Python") handed the *nth* mount on *mountpoint* to the server (the
    server logs it once the worker has it, which may be after the worker answered the client)."""
    deadline = time.monotonic() + util.MOUNT_TIMEOUT
    while True:
        lines = [ln for ln in (state / "server.log").read_text().splitlines() if f" on {mountpoint}: " in ln]
        if len(lines) >= nth or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(lines) >= nth, f"the server has no record of mount {nth}"
    return lines[nth - 1].split(" client) ")[0].rsplit("(", 1)[1]


def test_mounts_are_handed_over_by_the_c_client(root_server: Path, area: Path, client: Path) -> None:
    # No server yet: the Python command starts one and mounts.
    r = run([str(client / "unionfs"), "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    server = server_pid(root_server)
    assert server is not None and handed_by(root_server, area / "M", 1) == "Python"
    util.umount(area / "M")
    # Now the C client hands the mount over itself: relative paths, in its working directory.
    r = run([str(client / "unionfs"), "mount", "A=rw:B", "M"], cwd=area)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert handed_by(root_server, area / "M", 2) == "C"
    assert_served_by(root_server, area / "M", server)
    assert (area / "M" / "b").read_text() == "from B\n"
    (area / "M" / "new").write_text("new\n")
    assert (area / "A" / "new").read_text() == "new\n"
    assert util.mount_fstype(area / "M") == "fuse.unionfs"
    util.umount(area / "M")
    # Options: read-only, an fsname, mount flags.
    r = run([str(client / "unionfs"), "mount", "-o", "ro,fsname=mine,noexec", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert handed_by(root_server, area / "M", 3) == "C"
    entry = [ln.split() for ln in open("/proc/self/mounts") if ln.split()[1] == str(area / "M")][-1]
    assert entry[0] == "mine" and {"ro", "noexec", "nosuid", "nodev"} <= set(entry[3].split(","))
    with pytest.raises(OSError):
        (area / "M" / "x").write_text("x")


def test_a_server_of_another_build_gives_way(root_server: Path, area: Path, client: Path) -> None:
    """The installed code changed after the server started (an upgrade, an edit): the server gives
    way when the C client comes, and the mount is made all the same, once, by a server of the code
    now installed; what the client mounted before it was refused is not left behind."""
    import unionfs.server.fastmount as fastmount

    r = run([str(client / "unionfs"), "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0, r.stderr
    old = server_pid(root_server)
    assert old is not None
    util.umount(area / "M")
    module = Path(fastmount.__file__)
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, time.time_ns()))   # as an edit in place would
    r = run([str(client / "unionfs"), "mount", f"{area}/A:{area}/B", str(area / "M")])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert wait_gone(old), "the server of the old build is still there"
    new = server_pid(root_server)
    assert new not in (None, old)
    assert (area / "M" / "b").read_text() == "from B\n"
    mounted = [ln for ln in open("/proc/self/mounts") if ln.split()[1] == str(area / "M")]
    assert len(mounted) == 1, mounted


def test_overlay_and_mount8_through_the_c_client(root_server: Path, area: Path, client: Path) -> None:
    assert run([util.program("unionfs"), "server"]).returncode == 0
    opts = f"lowerdir={area}/B,upperdir={area}/U,workdir={area}/W"
    overlay = str(client / "unionfs-overlay")
    r = run([overlay, "-o", opts, "-o", "squash_to_root", str(area / "M")])
    # (the note the Python path prints: tests/fuse/test_resident.py)
    assert r.returncode == 0 and r.stderr == "unionfs-overlay: ignoring unsupported option squash_to_root\n", r.stderr
    assert handed_by(root_server, area / "M", 1) == "C"
    assert (area / "M" / "b").read_text() == "from B\n"
    os.unlink(area / "M" / "b")
    assert os.listdir(area / "M") == [] and (area / "B" / "b").exists()
    util.umount(area / "M")
    # mount(8): mount.fuse3 runs PROGRAM SOURCE MOUNTPOINT -o OPTIONS.
    r = run(["mount", "-t", "fuse", f"{overlay}#overlay", "-o", opts, str(area / "M")])
    assert r.returncode == 0, r.stderr
    assert handed_by(root_server, area / "M", 2) == "C"
    assert_served_by(root_server, area / "M", server_pid(root_server))
    assert os.listdir(area / "M") == []


@pytest.fixture
def area2(area: Path) -> Iterator[Path]:
    (area / "M2").mkdir()
    yield area
    while util.is_mounted(area / "M2"):
        util.umount(area / "M2")


@pytest.mark.parametrize("args", [
    ["mount", "{a}/nothere:{a}/B", "{a}/M"],
    ["mount", "-o", "lowerdir={a}/B,upperdir={a}/U", "{a}/M"],
    ["mount", "{a}/A:{a}/B", "{a}/A/M"],
    ["mount", "-o", "frobnicate", "{a}/A:{a}/B", "{a}/M"],
    ["mount", "-o", "timeout=-1", "{a}/A:{a}/B", "{a}/M"],
    ["mount", "{a}/A:{a}/B"],
    ["mount", "--help"],
    ["--help"],
    [],
    ["explain", "{a}/nothere"],
    ["overlay", "-o", "lowerdir={a}/nothere", "{a}/M"],
    ["overlay", "-o", "lowerdir={a}/B,upperdir={a}/U,workdir={a}/U", "{a}/M"],
    ["overlay"],
    ["overlay", "--help"],
])
def test_everything_else_says_what_the_python_command_says(root_server: Path, area2: Path, client: Path,
                                                           args: list[str]) -> None:
    """User errors, help and other commands: the same output and exit status, word for word."""
    area = area2
    (area / "A" / "M").mkdir()
    assert run([util.program("unionfs"), "server"]).returncode == 0
    overlay = args[:1] == ["overlay"]
    rest = [a.format(a=area) for a in args[overlay:]]
    name = "unionfs-overlay" if overlay else "unionfs"
    fast = run([str(client / name), *rest])
    slow = run([util.program(name), *rest])
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    assert not util.is_mounted(area / "M")


def test_python_path_when_off_or_elsewhere(root_server: Path, area: Path, client: Path) -> None:
    unionfs = str(client / "unionfs")
    assert run([util.program("unionfs"), "server"]).returncode == 0
    r = run([unionfs, "mount", f"{area}/A:{area}/B", str(area / "M")], env=dict(ENV, UNIONFS_SERVER="off"))
    assert r.returncode == 0, r.stderr
    assert_served_by(root_server, area / "M", None)
    util.umount(area / "M")
    # In another mount namespace the server cannot check the paths as the caller sees them: the
    # Python client (which opens them itself) hands the mount over.
    script = f"{unionfs} mount {area}/A:{area}/B {area}/M && cat {area}/M/b"
    r = run(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script])
    assert r.returncode == 0 and r.stdout == "from B\n", r.stderr
    assert handed_by(root_server, area / "M", 1) == "Python"
    # A path from the caller's HOME: the Python command expands it.
    r = run([unionfs, "mount", f"~/A:{area}/B", str(area / "M")], env=dict(ENV, HOME=str(area)))
    assert r.returncode == 0, r.stderr
    assert handed_by(root_server, area / "M", 2) == "Python"
    assert (area / "M" / "b").read_text() == "from B\n"


def test_the_c_client_without_its_python_command(tmp_path: Path) -> None:
    """Copied away from the Python commands it falls back to: one line, exit 127."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    alone = tmp_path / "unionfs"
    subprocess.run(["cc", "-O2", "-o", str(alone), str(SOURCE)], check=True)
    r = run([str(alone), "--help"])
    assert r.returncode == 127 and r.stderr == f"unionfs: {alone} is this C client, not the Python command\n"
    r = run([str(alone), "mount", "x"], env=dict(ENV, UNIONFS_SERVER="off"))
    assert r.returncode == 127


# --------------------------------------------------------------------------------------------------
# A user other than root: fusermount3 and the user's own server


def command_as(user: UnprivUser, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a command as *user*, in a plain environment with the resident server on."""
    if os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        os.chmod("/dev/fuse", 0o666)  # another test's dev_fuse_mode() put it back meanwhile
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C.UTF-8", "UNIONFS_SERVER": "auto"}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, cwd="/",
                          stdin=subprocess.DEVNULL, env=env, user=user.uid, group=user.gid, extra_groups=[])


def test_user_mount_through_the_c_client(users: tuple[UnprivUser, UnprivUser], user_area: tuple[Path, Path],
                                         client: Path) -> None:
    me, _ = users
    base, state = user_area
    if python_for(me)[0] != PYTHON:
        pytest.skip("the user cannot run this checkout's venv")

    def as_user(*args: str) -> subprocess.CompletedProcess[str]:
        return command_as(me, *args)

    for nth, via in enumerate(("Python", "C"), 1):   # the first starts the user's server
        r = as_user(str(client / "unionfs"), "mount", "-o", "suid", f"{base}/A:{base}/B", f"{base}/M")
        assert r.returncode == 0, r.stderr
        assert r.stderr == "unionfs: -o suid ignored: fusermount3 mounts nosuid,nodev for users other than root\n"
        assert handed_by(state, base / "M", nth) == via
        server = server_pid(state)
        assert server is not None and os.stat(f"/proc/{server}").st_uid == me.uid
        daemon = assert_served_by(state, base / "M", server)
        assert os.stat(f"/proc/{daemon}").st_uid == me.uid
        assert util.mount_fstype(base / "M") == "fuse.unionfs"
        r = as_user("cat", f"{base}/M/b")
        assert r.stdout == "from B\n", r.stderr
        r = as_user("fusermount3", "-u", f"{base}/M")
        assert r.returncode == 0, r.stderr
