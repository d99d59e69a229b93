"""`unionfs image` as an unprivileged user made for the test: the store under $XDG_DATA_HOME,
one line saying what is lost (owners), device nodes refused, read-only directories removable."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard  # noqa: F401
from images_util import M, docker_archive, layer_tar
from launcher_util import UnprivUser, python_for, unprivileged_user, world_readable_tempdir

import unionfs.images.cli  # noqa: F401  (the staged copy for the test user needs these imported)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making the test user needs root (CI runs as root)")

LAYER = [M("ro/", "dir", mode=0o555), M("ro/f", data="f\n", uid=1000, gid=1000), M("s", data="s\n", mode=0o4755)]


@pytest.fixture(scope="module")
def user() -> Iterator[UnprivUser]:
    with unprivileged_user() as u:
        yield u


@pytest.fixture
def home(user: UnprivUser) -> Iterator[Path]:
    with world_readable_tempdir("unionfs-images-rootless-") as base:
        os.chown(base, user.uid, user.gid)
        yield base


def as_user(user: UnprivUser, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    python, path = python_for(user)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    return subprocess.run([python, "-m", "unionfs", *args], user=user.uid, group=user.gid, extra_groups=[],
                          capture_output=True, text=True, env=env, cwd="/", timeout=120)


def test_rootless_import_keeps_modes_not_owners(user: UnprivUser, home: Path) -> None:
    archive = home / "a.tar"
    docker_archive(archive, [([layer_tar(LAYER)], ["localhost/rl:1"])])
    os.chmod(archive, 0o644)
    r = as_user(user, home, "image", "import", str(archive))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "owners in the image are not kept" in r.stderr
    layers = home / "data/unionfs/layers"
    tree = next(p for p in layers.iterdir() if p.is_dir())
    st = os.lstat(tree / "ro/f")
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    assert os.lstat(tree / "ro").st_mode & 0o7777 == 0o555
    assert os.lstat(tree / "s").st_mode & 0o7777 == 0o4755
    r = as_user(user, home, "image", "rm", "rl:1")
    assert r.returncode == 0, r.stderr
    assert not any(p.is_dir() for p in layers.iterdir())


def test_rootless_import_refuses_device_nodes(user: UnprivUser, home: Path) -> None:
    archive = home / "dev.tar"
    docker_archive(archive, [([layer_tar([M("null", "chardev")])], ["localhost/dev:1"])])
    os.chmod(archive, 0o644)
    r = as_user(user, home, "image", "import", str(archive))
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].endswith("device node 'null': only root can import it")
    assert os.listdir(home / "data/unionfs/tmp") == []
