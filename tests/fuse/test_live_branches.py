"""Branch changes on a mounted union, as a user sees them: ``unionfs branch list|add|del|mode`` and
AUFS's ``unionfs remount -o add:...,del:...,mod:...,append:...,prepend:...``.

A new branch's names show at once (also names looked up before, while missing); names still served
by the same branch keep their inode numbers; removing a branch with an open file, or changing the
writable top with a file open for writing, is EBUSY; a read-only top makes the union read-only;
nothing is written into the branches; every refused change is one line, a non-zero exit, and
leaves the branch list as it was.  (The owner/root rule and the race: test_live_branches_*.py.)
"""
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


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([UNIONFS, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def ok(*args: str) -> str:
    r = run(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def refused(*args: str) -> str:
    """The one line a refused command says."""
    r = run(*args)
    assert r.returncode != 0, f"{args} was not refused"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def branches(mnt: Path) -> list[tuple[str, str]]:
    reply = json.loads(ok("branch", "list", "--json", str(mnt)))
    return [(Path(b["path"]).name, b["mode"]) for b in reply["branches"]]


def tree(root: Path) -> dict[str, str | None]:
    """Every path under *root* with a file's content (None for a directory)."""
    out: dict[str, str | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() and not p.is_symlink() else \
            os.readlink(p) if p.is_symlink() else p.read_text()
    return out


def snapshot(*dirs: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """What a branch holds, to the byte and the mtime: nothing may change it."""
    out = {}
    for d in dirs:
        for p in [d, *d.rglob("*")]:
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


@pytest.fixture
def area(tmp_path: Path, need_fuse: None) -> Iterator[Path]:
    """U (writable top) over L; N, with its own names, and X, to be added; mounted AUFS-style at M."""
    for d in ("U", "L", "N", "X", "M", "W"):
        (tmp_path / d).mkdir()
    (tmp_path / "L" / "low").write_text("L\n")
    (tmp_path / "L" / "both").write_text("L\n")
    (tmp_path / "L" / "d").mkdir()
    (tmp_path / "L" / "d" / "l").write_text("L\n")
    (tmp_path / "N" / "both").write_text("N\n")
    (tmp_path / "N" / "new").write_text("N\n")
    (tmp_path / "N" / "d").mkdir()
    (tmp_path / "N" / "d" / "n").write_text("N\n")
    (tmp_path / "N" / ".wh.low").touch()          # N hides L's low while it is a branch
    (tmp_path / "X" / "x").write_text("X\n")
    yield tmp_path
    while util.is_mounted(tmp_path / "M"):
        util.umount(str(tmp_path / "M"))


def mount(t: Path, spec: str = "{t}/U=rw:{t}/L") -> Path:
    ok("mount", spec.format(t=t), str(t / "M"))
    return t / "M"


def test_add_shows_new_names_at_once_and_keeps_inode_numbers(area: Path) -> None:
    t = area
    mnt = mount(t)
    before = {n: os.lstat(mnt / n).st_ino for n in ("low", "d", "d/l")}
    assert not (mnt / "new").exists() and not (mnt / "d" / "n").exists()   # now cached as missing
    assert sorted(os.listdir(mnt / "d")) == ["l"]
    held = snapshot(t / "N", t / "L")
    ok("branch", "add", str(mnt), str(t / "N"))
    assert branches(mnt) == [("U", "rw"), ("N", "ro"), ("L", "ro")]
    assert (mnt / "new").read_text() == "N\n"
    assert (mnt / "both").read_text() == "N\n"           # N is above L
    assert not (mnt / "low").exists()                    # whited out in N
    assert sorted(os.listdir(mnt / "d")) == ["l", "n"]   # the kernel's cached listing was dropped
    assert os.lstat(mnt / "d" / "l").st_ino == before["d/l"]
    assert os.lstat(mnt / "d").st_ino == os.lstat(t / "N" / "d").st_ino   # N's is the top one now
    assert snapshot(t / "N", t / "L") == held            # nothing written into the branches
    # Only the top may be rw: a branch over it needs it made read-only first (one batch here).
    assert "only the top" in refused("branch", "add", "--index", "0", str(mnt), str(t / "X"))
    ok("remount", "-o", f"mod:{t}/U=ro,add:0:{t}/X", str(mnt))
    assert branches(mnt) == [("X", "ro"), ("U", "ro"), ("N", "ro"), ("L", "ro")]
    assert (mnt / "x").read_text() == "X\n"


def test_add_at_the_bottom_and_modes(area: Path) -> None:
    t = area
    mnt = mount(t)
    ok("remount", "-o", f"append:{t}/N=rr", str(mnt))
    assert branches(mnt) == [("U", "rw"), ("L", "ro"), ("N", "rr")]
    assert (mnt / "both").read_text() == "L\n"           # L is above N now
    assert (mnt / "low").read_text() == "L\n"            # N's whiteout hides nothing above it
    assert (mnt / "new").read_text() == "N\n"


def test_del_hides_its_names_and_reveals_what_it_hid(area: Path) -> None:
    t = area
    mnt = mount(t, "{t}/U=rw:{t}/N:{t}/L")
    assert not (mnt / "low").exists()
    ino = os.lstat(mnt / "d" / "l").st_ino
    with open(mnt / "new") as f:
        line = refused("branch", "del", str(mnt), str(t / "N"))
        assert "open files" in line
        assert f.read() == "N\n"
    assert branches(mnt) == [("U", "rw"), ("N", "ro"), ("L", "ro")]
    ok("branch", "del", str(mnt), str(t / "N"))
    assert branches(mnt) == [("U", "rw"), ("L", "ro")]
    assert not (mnt / "new").exists()
    assert (mnt / "low").read_text() == "L\n"
    assert (mnt / "both").read_text() == "L\n"
    assert sorted(os.listdir(mnt / "d")) == ["l"]
    assert os.lstat(mnt / "d" / "l").st_ino == ino


def test_a_read_only_top_makes_the_union_read_only(area: Path) -> None:
    t = area
    mnt = mount(t)
    with open(mnt / "w", "w") as f:
        assert "open for writing" in refused("branch", "mode", str(mnt), str(t / "U"), "ro")
        f.write("still\n")
    with open(mnt / "low") as f:         # open for reading only: no obstacle
        ok("branch", "mode", str(mnt), str(t / "U"), "ro")
        assert f.read() == "L\n"
    with pytest.raises(OSError) as e:
        (mnt / "new2").write_text("no")
    assert e.value.errno == errno.EROFS
    assert json.loads(ok("branch", "list", "--json", str(mnt)))["readonly"] is True
    assert not (t / "U" / ".wh..wh.unionfs.work").exists()
    ok("branch", "mode", str(mnt), str(t / "U"), "rw")
    (mnt / "new2").write_text("yes\n")
    assert (t / "U" / "new2").read_text() == "yes\n"
    assert (mnt / "w").read_text() == "still\n"


def test_a_new_writable_top(area: Path) -> None:
    """AUFS's prepend:DIR=rw, with the old top made read-only in the same remount."""
    t = area
    mnt = mount(t)
    (mnt / "old").write_text("in U\n")
    ok("remount", "-o", f"mod:{t}/U=ro,prepend:{t}/X=rw", str(mnt))
    assert branches(mnt) == [("X", "rw"), ("U", "ro"), ("L", "ro")]
    with open(mnt / "old", "a") as f:
        f.write("+\n")                      # copied up into X
    assert (t / "X" / "old").read_text() == "in U\n+\n"
    assert (t / "U" / "old").read_text() == "in U\n"
    ok("umount", str(mnt))
    assert sorted(os.listdir(t / "X")) == ["old", "x"]     # its work dir went at unmount
    assert sorted(os.listdir(t / "U")) == ["old"]


@pytest.mark.parametrize("case", ["twice", "inside", "around", "index", "last", "rw-below", "unknown",
                                  "itself", "missing"])
def test_refusals_change_nothing(area: Path, case: str) -> None:
    t = area
    mnt = mount(t, "{t}/L" if case == "last" else "{t}/U=rw:{t}/L")
    before = branches(mnt)
    args = {
        "twice": ("add", str(mnt), str(t / "L")),
        "inside": ("add", str(mnt), str(t / "L" / "d")),
        "around": ("add", str(mnt), str(t)),
        "index": ("add", "--index", "3", str(mnt), str(t / "N")),
        "last": ("del", str(mnt), str(t / "L")),
        "rw-below": ("add", "--mode", "rw", str(mnt), str(t / "N")),
        "unknown": ("del", str(mnt), str(t / "N")),
        "itself": ("add", str(mnt), str(mnt / "d")),
        "missing": ("add", str(mnt), str(t / "nowhere")),
    }[case]
    line = refused("branch", *args)
    assert line.startswith("unionfs: ") and "Traceback" not in line
    assert branches(mnt) == before
    assert (mnt / "low").read_text() == "L\n"


def test_aufs_spellings(area: Path) -> None:
    t = area
    mnt = mount(t)
    ok("remount", "-o", f"add:1:{t}/N=ro", str(mnt))
    assert branches(mnt) == [("U", "rw"), ("N", "ro"), ("L", "ro")]
    ok("remount", "-o", f"mod:{t}/N=rr,append:{t}/X", str(mnt))
    assert branches(mnt) == [("U", "rw"), ("N", "rr"), ("L", "ro"), ("X", "ro")]
    ok("remount", "-o", f"del:{t}/N,del:{t}/X", str(mnt))
    assert branches(mnt) == [("U", "rw"), ("L", "ro")]
    # A batch is all or nothing: the second word is refused, so the first is not applied.
    refused("remount", "-o", f"add:1:{t}/N,add:9:{t}/X", str(mnt))
    assert branches(mnt) == [("U", "rw"), ("L", "ro")]
    assert tree(mnt) == {"both": "L\n", "d": None, "d/l": "L\n", "low": "L\n"}


def test_overlay_style_changes_only_lower_branches(area: Path) -> None:
    t = area
    ok("mount", "-o", f"lowerdir={t}/L,upperdir={t}/U,workdir={t}/W", str(t / "M"))
    mnt = t / "M"
    ok("branch", "add", str(mnt), str(t / "N"))
    assert (mnt / "new").read_text() == "N\n"
    assert "lower branches" in refused("branch", "mode", str(mnt), str(t / "U"), "ro")
    assert "lower branches" in refused("branch", "del", str(mnt), str(t / "U"))
    ok("branch", "del", str(mnt), str(t / "L"))
    assert branches(mnt) == [("U", "rw"), ("N", "ro")]
    (mnt / "w").write_text("w\n")
    assert (t / "U" / "w").read_text() == "w\n"


def test_not_a_union(tmp_path: Path) -> None:
    assert "not a mount point" in refused("branch", "list", str(tmp_path))


def test_del_of_a_branch_whose_directory_is_gone(area: Path) -> None:
    """Removed from the host while a branch: named by the path it was added as."""
    t = area
    mnt = mount(t, "{t}/U=rw:{t}/N:{t}/L")
    assert (mnt / "new").read_text() == "N\n"
    subprocess.run(["rm", "-rf", str(t / "N")], check=True)
    ok("branch", "del", str(mnt), str(t / "N"))
    assert branches(mnt) == [("U", "rw"), ("L", "ro")]
    assert not (mnt / "new").exists()
    assert "not a branch" in refused("branch", "del", str(mnt), str(t / "N"))
    assert "No such file" in refused("branch", "add", str(mnt), str(t / "N"))
