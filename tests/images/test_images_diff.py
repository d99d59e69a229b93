"""`unionfs diff` and `unionfs commit` on a container layer made through a real mount.

An image is imported, mounted with a fresh upper (unionfs, AUFS style: `.wh.` whiteouts; overlay
style: 0/0 character devices and trusted.overlay.opaque), changed by a user (deletions, a directory
replaced by `rm -rf d && mkdir d`, a directory renamed, a hard link, a chmod, an xattr, a symlink),
then:
- `unionfs diff` prints what docker diff prints for those changes, in docker's order;
- `unionfs commit` + `unionfs image export` + `unionfs image import` into another store gives an
  image whose mount shows exactly what the container showed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import util
from images_util import M, cli, docker_archive, layer_tar

pytestmark = pytest.mark.fuse

BASE = [M("d/", "dir", mode=0o755), M("d/a", data="a\n"), M("d/keep", data="keep\n"),
        M("etc/", "dir", mode=0o755), M("etc/hostname", data="box\n"), M("old/", "dir", mode=0o755),
        M("old/x", data="x\n"), M("old/sub/", "dir"), M("old/sub/y", data="y\n"), M("suid", data="s\n", mode=0o4755),
        M("top", data="top\n"), M("deep/", "dir"), M("deep/er/", "dir"), M("deep/er/f", data="f\n")]
# A second layer deletes with an AUFS whiteout, so the lowers carry whiteouts too.
TOP = [M("d/", "dir", mode=0o755), M("d/.wh.keep"), M("deep/", "dir"), M("deep/er/", "dir"), M("deep/er/.wh.f")]

# What docker diff prints, per dialect of the upper: the walk of the upper, names sorted bytewise,
# whiteouts where their own names sort (`.wh.etc` first, the 0/0 device `etc` in place).  /deep is
# unchanged itself (same mode, size and mtime as below), so it comes in as the parent of an
# addition, after /deep/er, as containers/storage's changes() does.  The replaced /old is "D" and
# its new content "A", as docker and podman print a directory made opaque.
COMMON_AFTER_ETC = ["A /etc2", "A /etc2/hostname", "A /new", "A /new2", "D /old", "A /old/n", "A /sl",
                    "C /suid", "C /top"]
EXPECTED = {
    "aufs": ["C /d", "D /d/a", "C /deep/er", "C /deep", "A /deep/er/f", "D /etc", *COMMON_AFTER_ETC],
    "overlay": ["C /d", "D /d/a", "C /deep/er", "C /deep", "A /deep/er/f", "D /etc", *COMMON_AFTER_ETC],
}
EXPECTED["aufs"].remove("D /etc")
EXPECTED["aufs"].insert(0, "D /etc")


def change(mnt: Path) -> None:
    """What the container does, as a user would."""
    os.unlink(mnt / "d/a")
    shutil.rmtree(mnt / "old")
    os.mkdir(mnt / "old")
    (mnt / "old/n").write_text("n\n")
    shutil.move(mnt / "etc", mnt / "etc2")
    (mnt / "new").write_text("new\n")
    os.link(mnt / "new", mnt / "new2")
    os.chmod(mnt / "suid", 0o600)
    os.setxattr(mnt / "top", "user.test", b"value")
    os.symlink("top", mnt / "sl")
    (mnt / "deep/er/f").write_text("again\n")     # deleted in the image's top layer, made anew


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, list[Path]]:
    store = tmp_path / "store"
    docker_archive(tmp_path / "img.tar", [([layer_tar(BASE), layer_tar(TOP)], ["localhost/base:1"])])
    cli("image", "import", str(tmp_path / "img.tar"), store=store)
    dirs = [Path(p) for p in json.loads(cli("image", "inspect", "base:1", store=store).stdout)["LayerDirs"]]
    return store, dirs


def run_container(tmp_path: Path, style: str, lowers: list[Path]) -> tuple[Path, dict[bytes, dict[str, object]]]:
    """Mount *lowers* under a fresh upper with unionfs (*style*), make the changes; the upper and
    what the container saw."""
    upper, work, mnt = tmp_path / f"upper-{style}", tmp_path / f"work-{style}", tmp_path / f"mnt-{style}"
    for p in (upper, work, mnt):
        p.mkdir()
    m = util.mount_impl(style, lowers, upper, work if style == "overlay" else None, mnt, logdir=tmp_path)
    try:
        change(mnt)
        seen = util.snapshot(mnt)
    finally:
        util.unmount(m)
    return upper, seen


@pytest.mark.parametrize("style", ["aufs", "overlay"])
def test_diff_lists_the_changes_like_docker(tmp_path: Path, image: tuple[Path, list[Path]], style: str,
                                            need_fuse: None) -> None:
    store, lowers = image
    upper, _ = run_container(tmp_path, style, lowers)
    out = cli("diff", "--image", "base:1", str(upper), store=store).stdout.splitlines()
    assert out == EXPECTED[style]
    # --lower gives the same answer as --image
    args = [a for p in lowers for a in ("--lower", str(p))]
    assert cli("diff", *args, str(upper)).stdout.splitlines() == EXPECTED[style]


@pytest.mark.parametrize("style", ["aufs", "overlay"])
def test_commit_export_import_shows_what_the_container_saw(tmp_path: Path, image: tuple[Path, list[Path]],
                                                         style: str, need_fuse: None) -> None:
    store, lowers = image
    upper, seen = run_container(tmp_path, style, lowers)
    cli("commit", "--image", "base:1", str(upper), "localhost/committed:1", store=store)
    doc = json.loads(cli("image", "inspect", "committed:1", store=store).stdout)
    assert len(doc["Config"]["rootfs"]["diff_ids"]) == 3
    assert doc["Config"]["history"][-1]["created_by"] == "unionfs commit"
    # the new layer: whiteouts in the AUFS form whatever the upper's dialect; no bookkeeping
    new_layer = Path(doc["LayerDirs"][0])
    names = sorted(str(p.relative_to(new_layer)) for p in new_layer.rglob("*"))
    assert ".wh.etc" in names and "d/.wh.a" in names and "old/.wh..wh..opq" in names
    assert not [n for n in names if ".wh..wh." in n and not n.endswith(".wh..wh..opq")]
    for fmt in ("docker-archive", "oci-archive"):
        out = tmp_path / f"{fmt}.tar"
        cli("image", "export", "committed:1", "-o", str(out), "--format", fmt, store=store)
        other = tmp_path / f"store-{fmt}"
        cli("image", "import", str(out), store=other)
        dirs = [Path(p) for p in json.loads(cli("image", "inspect", "committed:1", store=other).stdout)["LayerDirs"]]
        mnt = tmp_path / f"check-{fmt}"
        mnt.mkdir()
        m = util.mount_impl("aufs", dirs, None, None, mnt, logdir=tmp_path)
        try:
            again = util.snapshot(mnt)
        finally:
            util.unmount(m)
        # The root aside: a layer's root is 0555 unless its tar says otherwise (as podman makes it);
        # the container's / is the upper directory.
        util.assert_trees_equal({k: v for k, v in seen.items() if k}, {k: v for k, v in again.items() if k},
                                f"committed image ({fmt}) vs the container")


def test_layer_tar_from_overlay_upper(tmp_path: Path) -> None:
    """A hand-made overlay-dialect upper (as fuse-overlayfs or the kernel leave it, opaque markers in
    each namespace): the layer tar has `.wh.` entries, one `.wh..wh..opq` per opaque directory, hard
    links as links, user xattrs in PAX headers, no bookkeeping; the same upper gives the same bytes."""
    from unionfs.images import write_layer_tar

    up = tmp_path / "up"
    for d in ("o1", "o2", "o3", "o4", ".wh..wh.unionfs.work", ".wh..wh.plnk"):
        (up / d).mkdir(parents=True)
    os.mknod(up / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(up / "o1", "trusted.overlay.opaque", b"y")
    os.setxattr(up / "o2", "user.overlay.opaque", b"y")
    os.setxattr(up / "o3", "user.fuseoverlayfs.opaque", b"y")
    (up / "o4/.wh..wh..opq").write_text("")
    (up / "f").write_text("f\n")
    os.link(up / "f", up / "g")
    os.setxattr(up / "f", "user.k", b"v")
    (up / ".wh.aufs-gone").write_text("")
    buf = io.BytesIO()
    write_layer_tar(up, buf)
    again = io.BytesIO()
    write_layer_tar(up, again)
    assert buf.getvalue() == again.getvalue()
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert sorted(members) == [".wh.aufs-gone", ".wh.gone", "f", "g", "o1", "o1/.wh..wh..opq", "o2",
                               "o2/.wh..wh..opq", "o3", "o3/.wh..wh..opq", "o4", "o4/.wh..wh..opq"]
    assert members["g"].islnk() and members["g"].linkname == "f"
    assert members["f"].pax_headers.get("SCHILY.xattr.user.k") == "v"
    assert not any(k.startswith("SCHILY.xattr.trusted.overlay") or "overlay.opaque" in k
                   for m in members.values() for k in m.pax_headers)

