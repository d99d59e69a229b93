"""The image store: import of docker-archive, oci-archive and OCI layouts (gzip, zstd, plain layers),
what is verified (digests, diff_ids, sizes), what unpacking refuses (path traversal, absolute names,
symlinked parents, hard links out of the layer), sharing of layers between images, rm and prune.

Each test drives the `unionfs` CLI as a user would and, where it imports an image, mounts its layers
with `unionfs mount` (read-only, AUFS style) and checks what a user sees there."""

from __future__ import annotations

import json
import os
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import util
from images_util import M, cli, docker_archive, layer_tar, oci_layout, sha, store_state, write_tar

pytestmark = pytest.mark.fuse

BASE = [M("etc/", "dir", mode=0o755), M("etc/hostname", data="box\n"), M("d/", "dir", mode=0o750),
        M("d/a", data="a\n", mode=0o600, uid=1000, gid=100), M("d/gone", data="gone\n"),
        M("d/link", "symlink", "a"), M("d/hard", "hardlink", "d/a"), M("suid", data="#!\n", mode=0o4755),
        M("cap", data="cap\n", xattrs={"user.note": b"hi", "security.capability":
                                      bytes.fromhex("0100000200100000000000000000000000000000")}),
        M("old/", "dir"), M("old/x", data="x\n")]
TOP = [M("d/", "dir", mode=0o750), M("d/.wh.gone"), M("old/", "dir"), M("old/.wh..wh..opq"),
       M("old/y", data="y\n"), M("top", data="top\n")]


@contextmanager
def mounted(store: Path, name: str, tmp: Path) -> Iterator[Path]:
    """The image's layers, read-only, AUFS style, with `unionfs mount`."""
    doc = json.loads(cli("image", "inspect", name, store=store).stdout)
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    m = util.mount_impl("aufs", [Path(p) for p in doc["LayerDirs"]], None, None, mnt, logdir=tmp)
    try:
        yield mnt
    finally:
        util.unmount(m)


def test_docker_archive_mounts_as_the_layers_say(tmp_path: Path, need_fuse: None) -> None:
    docker_archive(tmp_path / "a.tar", [([layer_tar(BASE), layer_tar(TOP)], ["localhost/two:1"])])
    store = tmp_path / "store"
    out = cli("image", "import", str(tmp_path / "a.tar"), store=store).stdout
    assert out.split()[1:] == ["localhost/two:1"]
    with mounted(store, "two:1", tmp_path) as mnt:
        seen = util.snapshot(mnt)
    names = sorted(k.decode() for k in seen if k)
    assert names == ["cap", "d", "d/a", "d/hard", "d/link", "etc", "etc/hostname", "old", "old/y", "suid", "top"]
    assert seen[b"d"]["mode"] == "0o750"
    assert (seen[b"d/a"]["mode"], seen[b"d/a"]["uid"], seen[b"d/a"]["gid"]) == ("0o600", 1000, 100)
    assert seen[b"d/hard"]["nlink"] == 2 and seen[b"d/hard"]["sha256"] == seen[b"d/a"]["sha256"]
    assert seen[b"d/link"]["target"] == b"a"
    assert seen[b"suid"]["mode"] == "0o4755"
    assert seen[b"cap"]["xattrs"][b"user.note"] == b"hi"
    assert seen[b"cap"]["xattrs"][b"security.capability"] == bytes.fromhex("0100000200100000000000000000000000000000")
    listing = cli("images", store=store).stdout.splitlines()
    assert listing[0].split()[:3] == ["NAME", "IMAGE", "ID"] and listing[1].split()[0] == "localhost/two:1"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_oci_layout_dir_each_compression(tmp_path: Path, compression: str, need_fuse: None) -> None:
    oci_layout(tmp_path / "oci", [layer_tar(BASE), layer_tar(TOP)], "localhost/oci:x", compression)
    store = tmp_path / "store"
    cli("image", "import", str(tmp_path / "oci"), store=store)
    with mounted(store, "localhost/oci:x", tmp_path) as mnt:
        assert (mnt / "old/y").read_text() == "y\n" and not (mnt / "old/x").exists()
        assert not (mnt / "d/gone").exists() and (mnt / "top").read_text() == "top\n"
    media = [la["mediaType"] for la in json.loads(cli("image", "inspect", "oci:x", store=store).stdout)
             ["Manifest"]["layers"]]
    suffix = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
    assert media == ["application/vnd.oci.image.layer.v1.tar" + suffix] * 2


def test_oci_archive_and_zstd_in_docker_archive(tmp_path: Path) -> None:
    oci_layout(tmp_path / "oci", [layer_tar(BASE)], "localhost/ociar:1", "zstd")
    write_tar(tmp_path / "o.tar", {str(p.relative_to(tmp_path / "oci")): p.read_bytes()
                                   for p in (tmp_path / "oci").rglob("*") if p.is_file()})
    docker_archive(tmp_path / "z.tar", [([layer_tar(BASE), layer_tar(TOP)], ["localhost/z:1"])], "zstd")
    store = tmp_path / "store"
    cli("image", "import", str(tmp_path / "o.tar"), store=store)
    cli("image", "import", str(tmp_path / "z.tar"), store=store)
    names = {line.split()[0] for line in cli("images", store=store).stdout.splitlines()[1:]}
    assert names == {"localhost/ociar:1", "localhost/z:1"}
    # the base layer is the same tar in both: one copy in the store
    assert len([p for p in (store / "layers").iterdir() if p.is_dir()]) == 2


def _two_images(path: Path) -> tuple[bytes, bytes]:
    shared, a, b = layer_tar(BASE), layer_tar([M("a", data="A\n")]), layer_tar([M("b", data="B\n")])
    docker_archive(path, [([shared, a], ["localhost/a:1"]), ([shared, b], ["localhost/b:1"])])
    return shared, a


def test_multi_image_archive_all_or_by_name(tmp_path: Path) -> None:
    _two_images(tmp_path / "m.tar")
    cli("image", "import", str(tmp_path / "m.tar"), store=tmp_path / "all")
    names = sorted(line.split()[0] for line in cli("images", store=tmp_path / "all").stdout.splitlines()[1:])
    assert names == ["localhost/a:1", "localhost/b:1"]
    cli("image", "import", str(tmp_path / "m.tar"), "b:1", store=tmp_path / "one")
    names = [line.split()[0] for line in cli("images", store=tmp_path / "one").stdout.splitlines()[1:]]
    assert names == ["localhost/b:1"]
    r = cli("image", "import", str(tmp_path / "m.tar"), "c:1", store=tmp_path / "one", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no image called c:1" in r.stderr


def _bad(tmp_path: Path, how: str) -> Path:
    good = [layer_tar(BASE), layer_tar(TOP)]
    arch = tmp_path / f"{how}.tar"
    if how == "truncated":
        docker_archive(arch, [(good, ["localhost/bad:1"])], "gzip")
        with tarfile.open(arch) as tf:
            biggest = max(tf.getmembers(), key=lambda m: m.size)
        with open(arch, "r+b") as f:
            f.truncate(biggest.offset_data + biggest.size // 2)
    elif how == "corrupt-layer":
        bad = bytearray(good[1])
        bad[600] ^= 0xFF                      # inside the first member's data: still a tar, wrong diff_id
        docker_archive(arch, [(good, ["localhost/bad:1"])], tweak={sha(good[1])[7:] + ".tar": bytes(bad)})
    elif how == "truncated-gzip-layer":
        from images_util import compress
        z = compress(good[1], "gzip")
        docker_archive(arch, [(good, ["localhost/bad:1"])], "gzip", tweak={sha(good[1])[7:] + ".tar": z[:-20]})
    elif how == "oci-blob-digest":
        files = oci_layout(tmp_path / "oci", good, "localhost/bad:1", "gzip")
        victim = [n for n, d in files.items() if n.startswith("blobs/") and len(d) > 200][-1]
        data = bytearray(files[victim])
        data[-9] ^= 0x01                      # in the gzip trailer: decompresses, but the digest is wrong
        (tmp_path / "oci" / victim).write_bytes(bytes(data))
        return tmp_path / "oci"
    else:
        raise ValueError(how)
    return arch


@pytest.mark.parametrize("how", ["truncated", "corrupt-layer", "truncated-gzip-layer", "oci-blob-digest"])
def test_bad_archive_one_line_store_unchanged(tmp_path: Path, how: str) -> None:
    store = tmp_path / "store"
    docker_archive(tmp_path / "ok.tar", [([layer_tar([M("keep", data="k\n")])], ["localhost/ok:1"])])
    cli("image", "import", str(tmp_path / "ok.tar"), store=store)
    before = store_state(store)
    r = cli("image", "import", str(_bad(tmp_path, how)), store=store, check=False)
    assert r.returncode == 1, r
    assert r.stderr.startswith("unionfs: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert store_state(store) == before


@pytest.mark.parametrize("members, why", [
    ([M("../escape", data="x")], "'..'"),
    ([M("/abs", data="x")], "absolute"),
    ([M("d/", "dir"), M("d/../../escape", data="x")], "'..'"),
    ([M("ln", "symlink", "/tmp"), M("ln/planted", data="x")], "not a directory"),
    ([M("ln", "symlink", ".."), M("ln/planted", data="x")], "not a directory"),
    ([M("h", "hardlink", "../../etc/passwd")], "'..'"),
    ([M("h", "hardlink", "/etc/passwd")], "absolute"),
    ([M("ln", "symlink", "/etc"), M("h", "hardlink", "ln/passwd")], "not a directory"),
    ([M("h", "hardlink", "nothing-here")], "outside the layer"),
], ids=["dotdot", "absolute", "nested-dotdot", "symlink-parent-abs", "symlink-parent-rel", "hardlink-dotdot",
        "hardlink-absolute", "hardlink-via-symlink", "hardlink-dangling"])
def test_malicious_layers_refused(tmp_path: Path, members: list[M], why: str) -> None:
    store = tmp_path / "store"
    docker_archive(tmp_path / "evil.tar", [([layer_tar(members)], ["localhost/evil:1"])])
    outside = set(os.listdir(tmp_path)) | {"store"}
    r = cli("image", "import", str(tmp_path / "evil.tar"), store=store, check=False)
    assert r.returncode == 1 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert set(os.listdir(tmp_path)) == outside
    assert not os.path.exists("/tmp/planted")
    assert os.listdir(store / "tmp") == [] and os.listdir(store / "images") == []
    assert not (store / "names.json").exists()


def test_concurrent_imports_unpack_a_shared_layer_once(tmp_path: Path) -> None:
    """Two imports at once of images sharing a large layer both succeed: the second waits for the
    layer's lock and finds it in place (had it unpacked the layer too, moving its tree onto the one
    in place would have failed with ENOTEMPTY)."""
    shared = layer_tar(BASE + [M(f"big/{i}", data="z" * 10000) for i in range(200)])
    docker_archive(tmp_path / "a.tar", [([shared, layer_tar([M("a", data="A")])], ["localhost/a:1"])])
    docker_archive(tmp_path / "b.tar", [([shared, layer_tar([M("b", data="B")])], ["localhost/b:1"])])
    store = tmp_path / "store"
    results: list[str] = []

    def run(name: str) -> None:
        r = cli("image", "import", str(tmp_path / name), store=store, check=False)
        results.append(r.stderr if r.returncode else "ok")
    threads = [threading.Thread(target=run, args=(n,)) for n in ("a.tar", "b.tar")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == ["ok", "ok"]
    layer_dirs = [p.name for p in (store / "layers").iterdir() if p.is_dir()]
    assert sorted(layer_dirs) == sorted({sha(shared)[7:], sha(layer_tar([M("a", data="A")]))[7:],
                                         sha(layer_tar([M("b", data="B")]))[7:]})
    # Each unpack makes the layer's tree once: its inode is what both images use.
    for name in ("a:1", "b:1"):
        dirs = json.loads(cli("image", "inspect", name, store=store).stdout)["LayerDirs"]
        assert dirs[-1] == str(store / "layers" / sha(shared)[7:])


def test_rm_keeps_layers_another_image_uses_and_prune(tmp_path: Path) -> None:
    shared, a = _two_images(tmp_path / "m.tar")
    store = tmp_path / "store"
    cli("image", "import", str(tmp_path / "m.tar"), store=store)
    out = cli("image", "rm", "a:1", store=store).stdout
    assert "1 layers freed" in out
    assert (store / "layers" / sha(shared)[7:]).is_dir() and not (store / "layers" / sha(a)[7:]).exists()
    assert [line.split()[0] for line in cli("images", store=store).stdout.splitlines()[1:]] == ["localhost/b:1"]
    r = cli("image", "rm", "a:1", store=store, check=False)
    assert r.returncode == 1 and "no such image" in r.stderr
    # a crash's leftovers: a temp dir nobody holds, and a layer no image uses
    (store / "tmp" / "work-crashed").mkdir()
    (store / "tmp" / "work-crashed" / "junk").write_text("x")
    cli("image", "rm", "b:1", store=store)
    assert not any(p.is_dir() for p in (store / "layers").iterdir())
    out = cli("image", "prune", store=store).stdout
    assert "removed 1 temporary" in out
    assert os.listdir(store / "tmp") == []


def test_import_after_crash_removes_leftovers(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "tmp" / "work-old").mkdir(parents=True)
    docker_archive(tmp_path / "ok.tar", [([layer_tar([M("keep", data="k\n")])], ["localhost/ok:1"])])
    cli("image", "import", str(tmp_path / "ok.tar"), store=store)
    assert os.listdir(store / "tmp") == []


def test_untag_keeps_image_with_other_names(tmp_path: Path) -> None:
    docker_archive(tmp_path / "t.tar", [([layer_tar(BASE)], ["localhost/one:1", "localhost/two:1"])])
    store = tmp_path / "store"
    cli("image", "import", str(tmp_path / "t.tar"), store=store)
    cli("image", "rm", "one:1", store=store)
    assert [line.split()[0] for line in cli("images", store=store).stdout.splitlines()[1:]] == ["localhost/two:1"]
    assert any(p.is_dir() for p in (store / "layers").iterdir())


def test_help_for_every_image_command() -> None:
    for args in (["images"], ["image"], ["diff"], ["commit"], *(["image", c] for c in
                                                            ("import", "inspect", "rm", "prune", "export"))):
        for flag in ("--help", "-h"):
            r = cli(*args, flag)
            assert "Usage:" in r.stdout and "Example:" in r.stdout or args == ["image"], (args, r.stdout)


def test_store_option_and_missing_image_one_line(tmp_path: Path) -> None:
    r = cli("image", "inspect", "nothing", store=tmp_path / "s", check=False)
    assert r.returncode == 1 and r.stderr == f"unionfs: nothing: no such image in {tmp_path / 's'}\n"
    r = cli("image", "import", "/etc/passwd", store=tmp_path / "s", check=False)
    assert r.returncode == 1 and r.stderr == "unionfs: /etc/passwd: not a readable image archive: not a tar archive\n"
