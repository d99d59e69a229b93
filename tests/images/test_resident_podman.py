"""podman with ``unionfs-overlay`` as its mount program, through the resident server: the container's
root is served by a worker of the server (its log says so) and shows the image as it is."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_podman
import util

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")
OVERLAY = util.program("unionfs-overlay")
SERVER_LOG = Path("/run/unionfs/server.log")


@pytest.fixture
def no_server() -> Iterator[None]:
    """No resident server of root's before the test or after it."""
    env = dict(os.environ, UNIONFS_SERVER="auto")
    subprocess.run([UNIONFS, "server", "stop"], env=env, capture_output=True)
    yield
    r = subprocess.run([UNIONFS, "server", "stop"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_podman_mounts_through_the_server(no_server: None, tmp_path: Path) -> None:
    base = tmp_path / "podman"
    with test_podman.private_podman(base, OVERLAY, "podman with a resident server") as pm:
        pm.env["UNIONFS_SERVER"] = "auto"
        pm.import_base()
        fstype, tree = pm.snapshot(test_podman.BASE_IMAGE)
        assert fstype == "fuse.unionfs" and tree == test_podman.BASE_FILES
        handed = [ln for ln in SERVER_LOG.read_text().splitlines() if f" on {base}/root/overlay/" in ln]
        assert handed, "podman's mounts did not go through the server"
