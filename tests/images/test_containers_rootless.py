"""Rootless images and containers with a subordinate id range, as rootless podman keeps them: layers
unpacked inside the user namespace that maps the range (uid U of the tar is subuid_start + U - 1 on
the host, 0 is the user), `unionfs run IMAGE` showing the image's owners, and removal of layers and
container layers whose files belong to the range."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from containers_util import busybox_tar, image_archive
from images_util import M, layer_tar
from launcher_util import UnprivUser, dev_fuse_mode, python_for, unprivileged_user, world_readable_tempdir

import launcher.images  # noqa: F401  (the staged copy for the test user needs these imported)
import unionfs.images.cli  # noqa: F401
from launcher import namespaces

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="making the test user needs root (CI runs as root)"),
    pytest.mark.skipif(shutil.which("newuidmap") is None, reason="needs newuidmap (apt-get install uidmap)"),
    pytest.mark.usefixtures("need_fuse"),
    pytest.mark.fuse,
]

IMAGE = "localhost/ctest-owned:1"
OWNED = [M("owned/", "dir", mode=0o700, uid=1000, gid=1000), M("owned/f", data="f\n", uid=1000, gid=1001),
         M("rootfile", data="r\n", mode=0o600), M("suid", data="s\n", mode=0o4755, uid=2, gid=2)]


class Side:
    def __init__(self, user: UnprivUser, home: Path, subuid: namespaces.IdRange, subgid: namespaces.IdRange):
        self.user, self.home, self.subuid, self.subgid = user, home, subuid, subgid

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        python, path = python_for(self.user)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": str(self.home),
               "XDG_DATA_HOME": str(self.home / "data")}
        return subprocess.run([python, "-m", "unionfs", *args], user=self.user.uid, group=self.user.gid,
                              extra_groups=[], capture_output=True, text=True, env=env, cwd="/", timeout=120,
                              stdin=subprocess.DEVNULL)

    @property
    def store(self) -> Path:
        return self.home / "data" / "unionfs"


@pytest.fixture(scope="module")
def side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    with unprivileged_user(subids=True) as user, dev_fuse_mode(0o666), \
            world_readable_tempdir("unionfs-containers-rootless-") as home:
        subuid = namespaces.subordinate_range("/etc/subuid", user.uid)
        subgid = namespaces.subordinate_range("/etc/subgid", user.uid)
        if subuid is None or subgid is None or subuid.length < 2000:
            pytest.skip("useradd gave the test user no subordinate id range")
        os.chown(home, user.uid, user.gid)
        archive = home / "owned.tar"
        image_archive(archive, [busybox_tar(tmp_path_factory.mktemp("rl-busybox")), layer_tar(OWNED)],
                      {"Cmd": ["sh"]}, IMAGE)
        os.chmod(archive, 0o644)
        s = Side(user, home, subuid, subgid)
        try:
            yield s
        finally:
            s("unshare", "rm", "-rf", str(home / "data"))


def test_layers_are_stored_shifted_into_the_subuid_range(side: Side) -> None:
    r = side("image", "import", str(side.home / "owned.tar"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""            # nothing is lost: no line about owners
    layers = [p for p in (side.store / "layers").iterdir() if p.is_dir()]
    top = next(p for p in layers if (p / "owned").exists())
    st = os.lstat(top / "owned/f")
    assert (st.st_uid, st.st_gid) == (side.subuid.start + 999, side.subgid.start + 1000)
    assert os.lstat(top / "owned").st_mode & 0o7777 == 0o700
    assert os.lstat(top / "rootfile").st_uid == side.user.uid
    st = os.lstat(top / "suid")
    assert (st.st_uid, st.st_mode & 0o7777) == (side.subuid.start + 1, 0o4755)


def test_run_image_shows_the_image_owners_and_rm_removes_the_range_s_files(side: Side) -> None:
    if not (side.store / "images").is_dir():
        assert side("image", "import", str(side.home / "owned.tar")).returncode == 0
    script = "stat -c '%u:%g %n' /owned /owned/f /rootfile /suid && touch /mine && chown 1000:1000 /mine"
    r = side("run", "--name", "rl", IMAGE, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1000:1000 /owned", "1000:1001 /owned/f", "0:0 /rootfile", "2:2 /suid"]
    diff = side("diff", "rl")
    assert diff.returncode == 0 and diff.stdout.splitlines() == ["A /mine"], diff.stderr
    ps = side("ps", "-a")
    assert "rl" in ps.stdout and "Exited (0)" in ps.stdout
    committed = side("commit", "rl", "localhost/ctest-owned-committed:1")
    assert committed.returncode == 0, committed.stderr
    r = side("run", "--rm", "localhost/ctest-owned-committed:1", "stat", "-c", "%u:%g", "/mine")
    assert (r.returncode, r.stdout) == (0, "1000:1000\n"), r.stderr
    upper = next((side.store / "containers").iterdir()) / "upper"
    assert os.lstat(upper / "mine").st_uid == side.subuid.start + 999
    for args in (("rm", "rl"), ("image", "rm", "localhost/ctest-owned-committed:1", IMAGE)):
        r = side(*args)
        assert r.returncode == 0, r.stderr
    assert os.listdir(side.store / "containers") == []
    assert os.listdir(side.store / "layers") == [] and os.listdir(side.store / "tmp") == []
