"""Provenance through real mounts: ``unionfs explain`` (text and --json) and the read-only
``user.unionfs.*`` xattrs, in both mount styles and both whiteout dialects."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")
ODD = b"caf\xe9"      # a name that is not UTF-8


def run(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([UNIONFS, *args], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def build(tmp: Path) -> None:
    """Branches U (writable top), B, C:
    f in B and C (copied up by the test); gone in C, whited out in B (AUFS); o opaque in B
    (overlay xattr) over o/hid in C; d merged from B and C; a non-UTF-8 name in C."""
    for d in ("U", "B", "C", "W", "M"):
        (tmp / d).mkdir()
    for b in ("B", "C"):
        (tmp / b / "f").write_text(b)
        (tmp / b / "d").mkdir()
        (tmp / b / "d" / b.lower()).write_text(b)
        (tmp / b / "o").mkdir()
    (tmp / "C" / "gone").write_text("gone")
    (tmp / "B" / ".wh.gone").touch()
    (tmp / "C" / "o" / "hid").write_text("hid")
    os.setxattr(tmp / "B" / "o", "trusted.overlay.opaque", b"y")
    os.mknod(tmp / "B" / "d" / "ow", 0o600 | 0o020000, 0)       # an overlay whiteout of d/ow
    (tmp / "C" / "d" / "ow").write_text("ow")
    (tmp / "C" / os.fsdecode(ODD)).write_text("odd")


@pytest.fixture(params=["aufs", "overlay"])
def mnt(request: pytest.FixtureRequest, tmp_path: Path, need_fuse: None) -> Iterator[Path]:
    build(tmp_path)
    t = tmp_path
    if request.param == "aufs":
        r = run("mount", f"{t}/U:{t}/B:{t}/C", f"{t}/M")
    else:
        r = run("mount", "-o", f"lowerdir={t}/B:{t}/C,upperdir={t}/U,workdir={t}/W", f"{t}/M")
    assert r.returncode == 0, r.stderr
    try:
        with open(t / "M" / "f", "a") as f:     # copies f up
            f.write("+")
        yield t / "M"
    finally:
        util.umount(str(t / "M"))


def explain(path: Path | bytes) -> dict:   # type: ignore[type-arg]
    r = run("explain", "--json", os.fsencode(path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def roles(report: dict) -> list[tuple[str, str]]:   # type: ignore[type-arg]
    return [(b["kind"], b["role"]) for b in report["branches"]]


def test_copied_up_file(mnt: Path) -> None:
    rep = explain(mnt / "f")
    assert rep["serving"] == 0 and rep["copied_up"] is True
    assert roles(rep) == [("file", "serves"), ("file", "shadowed"), ("file", "shadowed")]
    text = run("explain", str(mnt / "f")).stdout.decode()
    assert "copied up" in text and f"branch 0 rw {mnt.parent}/U" in text


def test_whiteout_hides_lower(mnt: Path) -> None:
    rep = explain(mnt / "gone")
    assert rep["exists"] is False and rep["serving"] is None
    assert rep["branches"][1]["dialect"] == "aufs"
    assert roles(rep)[1:] == [("whiteout", "whiteout"), ("file", "hidden")]
    assert "whiteout of /gone in branch 1 (aufs)" in rep["branches"][2]["why"]
    rep = explain(mnt / "d" / "ow")
    assert rep["branches"][1]["dialect"] == "overlay" and rep["branches"][2]["role"] == "hidden"


def test_opaque_dir(mnt: Path) -> None:
    rep = explain(mnt / "o")
    assert rep["serving"] == 1 and rep["merges"] == [1]
    assert rep["branches"][1]["opaque"] == "trusted.overlay.opaque"
    assert rep["branches"][2]["role"] == "hidden"
    rep = explain(mnt / "o" / "hid")
    assert rep["exists"] is False and "opaque directory /o in branch 1" in rep["branches"][2]["why"]


def test_merged_dir(mnt: Path) -> None:
    rep = explain(mnt / "d")
    assert rep["serving"] == 1 and rep["merges"] == [1, 2]
    assert "its listing merges branches 1, 2" in run("explain", str(mnt / "d")).stdout.decode()


def test_non_utf8_name(mnt: Path) -> None:
    path = os.fsencode(mnt) + b"/" + ODD
    rep = explain(path)
    assert os.fsencode(rep["path"]) == path and rep["serving"] == 2
    text = run("explain", path).stdout.decode()
    assert "caf\\xe9" in text
    assert os.getxattr(path, "user.unionfs.branch") == os.fsencode(mnt.parent / "C")


def test_xattrs(mnt: Path) -> None:
    top = os.fsencode(mnt.parent)
    assert os.getxattr(mnt / "f", "user.unionfs.branch") == top + b"/U"
    assert os.getxattr(mnt / "f", "user.unionfs.branches") == b"\n".join(top + b for b in (b"/U", b"/B", b"/C"))
    assert os.getxattr(mnt / "d", "user.unionfs.branches") == top + b"/B\n" + top + b"/C"
    assert os.getxattr(mnt / "o", "user.unionfs.branches") == top + b"/B"
    assert os.getxattr(mnt, "user.unionfs.layout") == b"\0".join(
        [b"rw:" + top + b"/U", b"ro:" + top + b"/B", b"ro:" + top + b"/C"])
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "f", "user.unionfs.layout")      # the root only
    assert e.value.errno == errno.ENODATA
    for p in (mnt, mnt / "f", mnt / "d"):
        assert not [n for n in os.listxattr(p) if n.startswith("user.unionfs.")]
    for call in (lambda: os.setxattr(mnt / "f", "user.unionfs.branch", b"x"),
                 lambda: os.removexattr(mnt / "f", "user.unionfs.branches")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EPERM
    assert os.getxattr(mnt / "f", "user.unionfs.branch") == top + b"/U"


def test_branch_own_xattr_of_that_name_is_not_shown(mnt: Path) -> None:
    # Set directly in a branch: the union's answer wins, the branch's is never listed.
    os.setxattr(mnt.parent / "C" / "gone", "user.unionfs.branch", b"/elsewhere")
    os.setxattr(mnt.parent / "B" / "d", "user.unionfs.branch", b"/elsewhere")
    assert os.getxattr(mnt / "d", "user.unionfs.branch") == os.fsencode(mnt.parent / "B")
    assert "user.unionfs.branch" not in os.listxattr(mnt / "d")


def test_cp_a_carries_no_provenance(mnt: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(mnt), str(dst)], check=True)
    for root, dirs, files in os.walk(dst):
        for n in [*dirs, *files]:
            assert not [x for x in os.listxattr(os.path.join(root, n), follow_symlinks=False)
                        if x.startswith("user.unionfs.")]
    assert (dst / "f").read_text() == "B+"


def test_not_a_unionfs_path(tmp_path: Path) -> None:
    r = run("explain", str(tmp_path))
    assert r.returncode == 1
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and "is not on a unionfs mount" in lines[0], lines
