"""Who may change a mount's branches: its owner and root, no one else.

An unprivileged user's mount (fusermount3, served by that user's resident server's worker) takes
``unionfs branch`` from that user and from root; another user gets one line and a non-zero exit,
also when the socket is made reachable to them (the daemon checks the peer, not only the
directory's mode).  /dev/fuse is 0666 for these tests and put back afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from launcher_util import UnprivUser, python_for, two_users, unionfs_as, world_readable_tempdir

from unionfs.server import statedir

pytestmark = pytest.mark.usefixtures("need_fuse")

UNIONFS = util.program("unionfs")


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[UnprivUser, UnprivUser]]:
    with two_users() as both:
        yield both


as_user = unionfs_as


def as_root(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([UNIONFS, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def area(users: tuple[UnprivUser, UnprivUser]) -> Iterator[Path]:
    me, _ = users
    with world_readable_tempdir("unionfs-branches-") as base:
        for name in ("U", "A", "B", "M"):
            (base / name).mkdir()
        (base / "A" / "a").write_text("A\n")
        (base / "B" / "b").write_text("B\n")
        for p in [base, *base.rglob("*")]:
            os.lchown(p, me.uid, me.gid)
        try:
            yield base
        finally:
            while util.is_mounted(base / "M"):
                util.umount(base / "M")
            as_user(me, "server", "stop")


def cat_as(user: UnprivUser, path: Path) -> str | None:
    """*path*'s content as *user* reads it (a user's mount is not open to root), None if missing."""
    r = subprocess.run(["cat", str(path)], capture_output=True, text=True, timeout=30, user=user.uid,
                       group=user.gid, extra_groups=[])
    return r.stdout if r.returncode == 0 else None


def listed(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 0, r.stderr
    return [Path(b["path"]).name for b in json.loads(r.stdout)["branches"]]


@pytest.mark.parametrize("server", ["auto", "off"])
def test_owner_and_root_may_others_may_not(users: tuple[UnprivUser, UnprivUser], area: Path,
                                           server: str) -> None:
    me, other = users
    base = area
    mnt = str(base / "M")
    r = as_user(me, "mount", f"{base}/U=rw:{base}/A", mnt, server=server)
    assert r.returncode == 0, r.stderr
    r = as_user(me, "branch", "add", mnt, f"{base}/B")
    assert r.returncode == 0, r.stderr
    assert cat_as(me, base / "M" / "b") == "B\n"
    assert listed(as_root("branch", "list", "--json", mnt)) == ["U", "B", "A"]
    r = as_root("branch", "del", mnt, f"{base}/B")       # root may change it too
    assert r.returncode == 0, r.stderr
    assert cat_as(me, base / "M" / "b") is None

    r = as_user(other, "branch", "add", mnt, f"{base}/B")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Even with the way to the socket opened up, the daemon answers the other user nothing.
    state = Path(f"/tmp/unionfs-{me.uid}")
    sock = state / (statedir.key_for(mnt) + statedir.CONTROL_SUFFIX)
    assert sock.exists() and sock.stat().st_mode & 0o777 == 0o600
    mode = state.stat().st_mode & 0o7777
    os.chmod(state, 0o755)
    os.chmod(sock, 0o777)
    try:
        r = as_user(other, "branch", "add", mnt, f"{base}/B")
    finally:
        os.chmod(state, mode)
        os.chmod(sock, 0o600)
    assert r.returncode != 0 and "refused" in r.stderr, r.stderr
    assert listed(as_user(me, "branch", "list", "--json", mnt)) == ["U", "A"]
    assert cat_as(me, base / "M" / "b") is None


def test_a_daemon_with_no_state_directory(users: tuple[UnprivUser, UnprivUser], area: Path) -> None:
    """Root only in a user namespace, with a /run it cannot write (a read-only tmpfs here), the daemon
    has no state directory: its channel is an abstract socket, which a client in the same
    namespaces finds."""
    me, _ = users
    base = area
    python, path = python_for(me)
    u = f"{python} -m unionfs"
    script = (f"set -e; export UNIONFS_SERVER=off PYTHONPATH={path} HOME=/ XDG_RUNTIME_DIR=; "
              "mount -t tmpfs -o ro tmpfs /run; "
              f"{u} mount {base}/U=rw:{base}/A {base}/M; "
              f"{u} branch add {base}/M {base}/B; cat {base}/M/b; "
              f"{u} branch list {base}/M; "
              f"{u} umount {base}/M")
    if os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        os.chmod("/dev/fuse", 0o666)
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       cwd="/", user=me.uid, group=me.gid, extra_groups=[], stdin=subprocess.DEVNULL)
    if r.returncode != 0 and ("Operation not permitted" in r.stderr or "fusermount" in r.stderr
                              or "cannot mount" in r.stderr):
        pytest.skip(f"no FUSE mount in a user namespace here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "B"
    assert [ln.split("\t")[2] for ln in lines[1:4]] == [f"{base}/U", f"{base}/B", f"{base}/A"]
