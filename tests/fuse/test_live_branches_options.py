"""Live branch changes on mounts whose lookups keep branch numbers of their own: a metadata-only
copy remembers the branch that holds its data (-o metacopy), a renamed merged directory reopens its
lower directories from their branch's root (-o redirect_dir).  After a branch is added above them,
both still find what they found before."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")


def ok(*args: str) -> str:
    r = subprocess.run([UNIONFS, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def area(tmp_path: Path, need_fuse: None) -> Iterator[Path]:
    for d in ("U", "W", "L", "N", "M"):
        (tmp_path / d).mkdir()
    (tmp_path / "L" / "f").write_bytes(b"lower data\n" * 1000)
    (tmp_path / "L" / "d").mkdir()
    (tmp_path / "L" / "d" / "inner").write_text("in d\n")
    (tmp_path / "N" / "other").write_text("N\n")
    yield tmp_path
    while util.is_mounted(tmp_path / "M"):
        util.umount(str(tmp_path / "M"))


def test_metacopy_and_moved_directories_survive_a_branch_added_above(area: Path) -> None:
    t, mnt = area, area / "M"
    ok("mount", "-o", f"lowerdir={t}/L,upperdir={t}/U,workdir={t}/W,metacopy=on", str(mnt))
    os.chmod(mnt / "f", 0o600)                      # a metadata-only copy: the data stays in L
    assert (t / "U" / "f").stat().st_blocks == 0
    assert (mnt / "f").read_bytes() == b"lower data\n" * 1000
    os.rename(mnt / "d", mnt / "moved")             # a merged directory renamed with a redirect
    assert os.listdir(mnt / "moved") == ["inner"]
    ok("branch", "add", str(mnt), str(t / "N"))     # just below the top: L's index changes
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2")   # the kernel forgets: it asks again
    assert (mnt / "other").read_text() == "N\n"
    assert (mnt / "f").read_bytes() == b"lower data\n" * 1000
    assert os.listdir(mnt / "moved") == ["inner"]
    assert (mnt / "moved" / "inner").read_text() == "in d\n"
    with open(mnt / "f", "ab") as f:                # the first write copies the data from L
        f.write(b"end\n")
    assert (t / "U" / "f").read_bytes() == b"lower data\n" * 1000 + b"end\n"
