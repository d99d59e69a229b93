"""Branches added and removed while readers and writers loop on the mount.

Readers walk the tree, read every file and hold some open across changes; writers make, rename,
append to (copying up) and remove files; a changer adds and removes branches between them.  The
only errors allowed are the defined ones: ENOENT for a reader whose name went with its branch, and
EBUSY for a removal of a branch with a file open in it.  Afterwards the tree through the mount is
the tree a fresh mount of the final branch list shows.
"""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
import util

from unionfs import branchctl
from unionfs.core.errors import QuietError

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")
POOL = 4
FILES = 6


def build(t: Path) -> None:
    """U (writable top: w/ for the writers), B (bottom, always there) and pool branches P0..P3,
    whose names overlap B's and each other's, one with a whiteout of a name of B."""
    for d in ("U", "B", "M", "F"):
        (t / d).mkdir()
    (t / "U" / "w").mkdir()
    for d in ("shared", "common"):
        (t / "B" / d).mkdir()
    for k in range(FILES):
        (t / "B" / "shared" / f"f{k}").write_text(f"B-{k}\n")
    (t / "B" / "common" / "base").write_text("B\n")
    (t / "B" / "hidden").write_text("B\n")
    for i in range(POOL):
        p = t / f"P{i}"
        (p / "shared").mkdir(parents=True)
        (p / "common").mkdir()
        (p / f"own{i}").mkdir()
        for k in range(0, FILES, i + 1):
            (p / "shared" / f"f{k}").write_text(f"P{i}-{k}\n")
        (p / "common" / f"c{i}").write_text(f"P{i}\n")
        (p / "common" / "same").write_text(f"P{i}\n")
        (p / f"own{i}" / "x").write_text(f"P{i}\n")
    (t / "P1" / ".wh.hidden").touch()


def tree(root: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_text()
    return out


class Loops:
    def __init__(self, mnt: Path, seed: int) -> None:
        self.mnt = mnt
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.counts = {"reads": 0, "writes": 0, "changes": 0, "busy": 0}
        self.seed = seed

    def unexpected(self, what: str, e: OSError) -> None:
        self.errors.append(f"{what}: {errno.errorcode.get(e.errno or 0, e.errno)} {e}")

    def reader(self, n: int) -> None:
        rnd = random.Random(self.seed * 100 + n)
        while not self.stop.is_set():
            for path in [self.mnt / "shared", self.mnt / "common", *(self.mnt / f"own{i}" for i in range(POOL))]:
                try:
                    names = os.listdir(path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    self.unexpected(f"listdir {path}", e)
                    continue
                for name in names:
                    try:
                        with open(path / name) as f:
                            if rnd.random() < 0.05:
                                time.sleep(0.02)      # held open across a change
                            f.read()
                        self.counts["reads"] += 1
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        self.unexpected(f"read {path / name}", e)

    def writer(self, n: int) -> None:
        rnd = random.Random(self.seed * 1000 + n)
        w = self.mnt / "w"
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                a, b = w / f"{n}-{i}", w / f"{n}-{i}.r"
                a.write_text(f"{n}-{i}\n")
                a.rename(b)
                if rnd.random() < 0.5:
                    b.unlink()
                with open(self.mnt / "shared" / f"f{rnd.randrange(FILES)}", "a") as f:   # copied up
                    f.write(f"w{n}\n")
                self.counts["writes"] += 1
            except OSError as e:
                self.unexpected(f"write {n}-{i}", e)

    def changer(self, t: Path, changes: int, pause: float = 0.01) -> None:
        rnd = random.Random(self.seed)
        inside: list[int] = []
        for _ in range(changes):
            if self.stop.is_set():
                break
            out = [i for i in range(POOL) if i not in inside]
            try:
                if out and (not inside or rnd.random() < 0.6):
                    i = rnd.choice(out)
                    branchctl.change(str(self.mnt), [("add", str(t / f"P{i}"), rnd.randint(1, 1 + len(inside)),
                                                      "ro")])
                    inside.append(i)
                else:
                    i = rnd.choice(inside)
                    branchctl.change(str(self.mnt), [("del", str(t / f"P{i}"), None, None)])
                    inside.remove(i)
                self.counts["changes"] += 1
            except QuietError as e:
                if "open files" in e.message:
                    self.counts["busy"] += 1
                else:
                    self.errors.append(f"change: {e.message}")
            time.sleep(pause)


def race(t: Path, loops_type: type[Loops], seed: int, threads: dict[str, int], changes: int,
         pause: float = 0.01) -> None:
    """Mount U over B at M and run *threads* (a `Loops` method's name: how many threads of it)
    while the changer makes *changes* changes; then no unexpected error, at least half the changes
    made, and the tree through the mount is the one a fresh mount of the final branch list shows."""
    build(t)
    mnt = t / "M"
    r = subprocess.run([UNIONFS, "mount", f"{t}/U=rw:{t}/B", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        loops = loops_type(mnt, seed)
        running = [threading.Thread(target=getattr(loops, name), args=(n,))
                   for name, count in threads.items() for n in range(count)]
        for th in running:
            th.start()
        try:
            loops.changer(t, changes, pause)
        finally:
            loops.stop.set()
            for th in running:
                th.join(timeout=60)
        print("FIGURE", loops_type.__name__, loops.counts)
        assert not loops.errors, "\n".join(loops.errors[:10])
        assert loops.counts["changes"] >= changes // 2 and loops.counts["reads"] > 0 and \
            loops.counts["writes"] > 0, loops.counts
        seen = tree(mnt)
        listed = json.loads(subprocess.run([UNIONFS, "branch", "list", "--json", str(mnt)], capture_output=True,
                                           text=True, check=True).stdout)["branches"]
    finally:
        util.umount(str(mnt))
    spec = ":".join(f"{b['path']}={b['mode']}" for b in listed)
    r = subprocess.run([UNIONFS, "mount", spec, str(t / "F")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        assert seen == tree(t / "F")
    finally:
        util.umount(str(t / "F"))


@pytest.mark.parametrize("seed", [1, 2])
def test_changes_under_readers_and_writers(tmp_path: Path, need_fuse: None, seed: int) -> None:
    race(tmp_path, Loops, seed, {"reader": 3, "writer": 2}, changes=60)
