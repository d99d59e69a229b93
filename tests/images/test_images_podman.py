"""Round trip with podman: an image built by podman, saved (docker-archive and oci-archive),
imported by unionfs, mounted with `unionfs mount`, changed, diffed, committed, exported, loaded by
podman and run.

podman runs as root with a private store (test_podman.Podman) on its own kernel overlay driver, so
podman's view is the reference: `podman image mount` shows the tree a container of the image sees.
No image is pulled: the base is a busybox-static rootfs made here plus a layer with xattrs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from images_util import M, cli, docker_archive, layer_tar
from test_podman import Podman, private_podman

pytestmark = pytest.mark.fuse

BASE = "localhost/unionfs-img-base:latest"
BUILT = "localhost/unionfs-img-built:latest"
COMMITTED = "localhost/unionfs-img-committed:latest"
CAP = bytes.fromhex("0100000200100000000000000000000000000000")   # cap_net_bind_service, permitted
XATTR_LAYER = [M("base/", "dir", mode=0o755), M("base/xattr.txt", data="x\n", xattrs={"user.test": b"hello"}),
               M("base/capbin", data="c\n", mode=0o755, xattrs={"security.capability": CAP})]
CONTAINERFILE = f"""\
FROM {BASE}
RUN rm /base/del.txt
RUN rm -rf /base/d && mkdir /base/d && echo fresh > /base/d/fresh
RUN mv /base/tree /base/tree2
RUN ln /base/keep.txt /base/hard
RUN cp /bin/busybox /base/suid && chmod 4755 /base/suid
RUN chmod 640 /base/xattr.txt
"""
# What the container does, first through a unionfs mount, then in a podman container.
CHANGES = ("rm /base/victim.txt && rm -rf /base/tree2 && echo new > /base/new && mkdir /base/nd && "
           "echo f > /base/nd/f && chmod 600 /base/mod.txt && rm -rf /base/d && mkdir /base/d && "
           "echo y > /base/d/y && mv /base/src.txt /base/dst.txt")
# `podman diff` of a container also lists what podman itself puts in every container.
PODMAN_OWN = ("/etc", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/run", "/run/.containerenv")


@pytest.fixture(scope="module")
def pm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    base = tmp_path_factory.mktemp("podman-images")
    with private_podman(base, None, "the podman image tests") as p:
        rootfs = p.rootfs_tar()
        docker_archive(base / "base.tar", [([rootfs, layer_tar(XATTR_LAYER)], [BASE])])
        p("load", "-i", str(base / "base.tar"))
        ctx = base / "ctx"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(CONTAINERFILE)
        p("build", "--pull=never", "--network=none", "--layers", "-t", BUILT, str(ctx))
        p("save", "-o", str(base / "docker.tar"), BUILT)
        p("save", "--format", "oci-archive", "-o", str(base / "oci.tar"), BUILT)
        yield p


def podman_tree(p: Podman, image: str) -> dict[bytes, dict[str, object]]:
    """The tree a container of *image* sees, as `podman image mount` shows it."""
    path = p("image", "mount", image).strip()
    try:
        return util.snapshot(path)
    finally:
        p("image", "unmount", image)


def layer_dirs(store: Path, name: str) -> list[Path]:
    return [Path(d) for d in json.loads(cli("image", "inspect", name, store=store).stdout)["LayerDirs"]]


class Union:
    """`unionfs mount` of an image's layers (AUFS style), read-only or under a fresh upper."""

    def __init__(self, tmp: Path, lowers: list[Path], upper: Path | None) -> None:
        self.mnt = tmp / ("mnt-rw" if upper else "mnt-ro")
        self.mnt.mkdir(exist_ok=True)
        self.m = util.mount_impl("aufs", lowers, upper, None, self.mnt, logdir=tmp)

    def __enter__(self) -> Path:
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        util.unmount(self.m)


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_imported_image_mounts_as_podman_shows_it(pm: Podman, tmp_path: Path, fmt: str) -> None:
    store = tmp_path / "store"
    out = cli("image", "import", str(pm.base / f"{fmt}.tar"), store=store).stdout
    assert BUILT in out.split()
    expected = podman_tree(pm, BUILT)
    with Union(tmp_path, layer_dirs(store, BUILT), None) as mnt:
        seen = util.snapshot(mnt)
    util.assert_trees_equal(expected, seen, f"unionfs mount of the imported {fmt} archive vs podman")
    # what the Containerfile did, as a user sees it
    assert b"base/del.txt" not in seen and b"base/tree" not in seen and b"base/tree2/inner/t" in seen
    assert [k for k in seen if k.startswith(b"base/d/")] == [b"base/d/fresh"]
    assert seen[b"base/hard"]["nlink"] == 2 and seen[b"base/suid"]["mode"] == "0o4755"
    assert seen[b"base/xattr.txt"]["xattrs"] == {b"user.test": b"hello"}
    assert seen[b"base/xattr.txt"]["mode"] == "0o640"
    assert seen[b"base/capbin"]["xattrs"] == {b"security.capability": CAP}


def test_diff_commit_export_load_run(pm: Podman, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli("image", "import", str(pm.base / "docker.tar"), store=store)
    upper = tmp_path / "upper"
    upper.mkdir()
    with Union(tmp_path, layer_dirs(store, BUILT), upper) as mnt:
        r = os.system(f"cd {mnt} && sh -c '{CHANGES.replace('/base', './base')}'")
        assert r == 0
        container_view = util.snapshot(mnt)
    ours = cli("diff", "--image", BUILT, str(upper), store=store).stdout.splitlines()

    # The same changes in a podman container, and what podman diff says.
    pm("run", "--name", "changer", "--pull=never", "--network=none", BUILT, "sh", "-c", CHANGES)
    try:
        theirs = [line for line in pm("diff", "changer").splitlines()
                  if line.split()[1] not in PODMAN_OWN]
    finally:
        pm("rm", "--force", "changer")
    assert sorted(ours) == sorted(theirs), (ours, theirs)
    assert "D /base/victim.txt" in ours and "D /base/tree2" in ours and "A /base/nd/f" in ours

    cli("commit", "--image", BUILT, str(upper), COMMITTED, store=store)
    for fmt in ("docker-archive", "oci-archive"):
        archive = tmp_path / f"{fmt}.tar"
        cli("image", "export", COMMITTED, "-o", str(archive), "--format", fmt, store=store)
        pm("load", "-i", str(archive))
        # The root itself aside: podman gives the root of every layer it unpacks mode 0555, the
        # container's / is the upper directory.
        util.assert_trees_equal({k: v for k, v in container_view.items() if k},
                                {k: v for k, v in podman_tree(pm, COMMITTED).items() if k},
                                f"podman's view of the committed image ({fmt}) vs the unionfs container")
        out = pm("run", "--rm", "--pull=never", "--network=none", COMMITTED, "sh", "-c",
                 "ls -A /base /base/d; cat /base/new")
        listing = out.split()
        assert "victim.txt" not in listing and "tree2" not in listing and "src.txt" not in listing
        assert "dst.txt" in listing and "nd" in listing and "y" in listing and "fresh" not in listing
        assert listing[-1] == "new"
        pm("rmi", "--force", COMMITTED)


def test_image_ids_match_podman(pm: Podman, tmp_path: Path) -> None:
    """The image id is the config's digest, as podman computes it."""
    store = tmp_path / "store"
    out = cli("image", "import", str(pm.base / "oci.tar"), store=store).stdout
    podman_id = pm("image", "inspect", "--format", "{{.Id}}", BUILT).strip()
    assert out.split()[0] == podman_id[:12]
    config = (store / "images" / podman_id / "config.json").read_bytes()
    assert hashlib.sha256(config).hexdigest() == podman_id


def test_multi_image_archive_from_podman(pm: Podman, tmp_path: Path) -> None:
    """`podman save -m` of two images that share layers: both imported, named as podman names them,
    the shared layers stored once."""
    archive = tmp_path / "multi.tar"
    pm("save", "-m", "-o", str(archive), BASE, BUILT)
    store = tmp_path / "store"
    cli("image", "import", str(archive), store=store)
    names = sorted(line.split()[0] for line in cli("images", store=store).stdout.splitlines()[1:])
    assert names == sorted([BASE, BUILT])
    base_dirs, built_dirs = layer_dirs(store, BASE), layer_dirs(store, BUILT)
    assert built_dirs[-len(base_dirs):] == base_dirs
    assert len([p for p in (store / "layers").iterdir() if p.is_dir()]) == len(built_dirs)
