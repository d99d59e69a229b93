"""podman and unionfs through one registry (Debian's docker-registry on 127.0.0.1): podman pushes an
image, `unionfs pull` fetches it and `unionfs run` runs a command on its layers; the container layer
is committed and pushed with `unionfs push`, and podman pulls that image and runs it, seeing the
change (deletions included).  podman runs as root with a private store (test_podman.Podman)."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from images_util import cli
from registry_util import Registry, running_registry
from test_podman import BASE_IMAGE, Podman, private_podman

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Podman, Registry]]:
    with running_registry(tmp_path_factory.mktemp("reg-podman")) as reg, \
            private_podman(tmp_path_factory.mktemp("podman-registry"), None, "the registry podman tests") as p:
        p.import_base()
        yield p, reg


def test_podman_push_unionfs_pull_run_commit_push_podman_pull_run(env: tuple[Podman, Registry],
                                                                   tmp_path: Path) -> None:
    p, reg = env
    ref = f"{reg.host}/podman/base:1"
    p("push", "--tls-verify=false", BASE_IMAGE, f"docker://{ref}")
    store = tmp_path / "store"
    r = cli("pull", "--tls-verify=false", ref, store=store)
    assert "1 layers fetched" in r.stdout, r.stdout
    assert json.loads(cli("image", "inspect", ref, store=store).stdout)["Id"] == \
        "sha256:" + p("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE).strip()
    layers = json.loads(cli("image", "inspect", ref, store=store).stdout)["LayerDirs"]
    upper = tmp_path / "upper"
    upper.mkdir()
    change = ("cat /base/keep.txt && echo changed > /base/keep.txt && rm /base/victim.txt && "
              "echo new > /base/new")
    run = subprocess.run([util.program("unionfs"), "run", ":".join([str(upper), *layers]), "--",
                          "/bin/sh", "-c", change], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "kept\n"
    cli("commit", "--image", ref, str(upper), "localhost/changed", store=store)
    out = f"{reg.host}/podman/changed:1"
    r = cli("push", "--tls-verify=false", "changed", out, store=store)
    assert "2 blobs uploaded, 0 present, 1 mounted" in r.stdout, r.stdout   # the base layer: mounted
    p("pull", "--tls-verify=false", f"docker://{out}")
    seen = p("run", "--rm", "--pull=never", "--network=none", out, "sh", "-c",
             "cat /base/keep.txt /base/new; test -e /base/victim.txt && echo victim still there; true")
    assert seen == "changed\nnew\n"
