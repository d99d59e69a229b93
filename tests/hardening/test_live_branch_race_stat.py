"""Branch changes back to back under readers that stat every name and writers, as in
test_live_branch_race, the window wider: no pause between changes, more threads, and stats (a stat
of a name the kernel has cached sends GETATTR for the node it holds, which a change may have
overtaken).  Names every branch list has (shared/fK, common/same) never fail; a name that went with
its branch is ENOENT, never ESTALE: the kernel retries ESTALE only once.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest
import util
from test_live_branch_race import FILES, POOL, UNIONFS, Loops, build, tree

from unionfs import branchctl
from unionfs.core.errors import QuietError

pytestmark = pytest.mark.fuse

DIRS = ["shared", "common", *(f"own{i}" for i in range(POOL))]


class Statting(Loops):
    def stat_reader(self, n: int) -> None:
        while not self.stop.is_set():
            for k in range(FILES):          # always there
                try:
                    os.stat(self.mnt / "shared" / f"f{k}")
                except OSError as e:
                    self.unexpected(f"stat shared/f{k}", e)
            for d in DIRS:
                try:
                    fd = os.open(self.mnt / d, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    self.unexpected(f"open {d}", e)
                    continue
                try:
                    names = os.listdir(fd)
                except FileNotFoundError:
                    names = []
                except OSError as e:
                    self.unexpected(f"getdents {d}", e)
                    names = []
                finally:
                    os.close(fd)
                for name in names:
                    try:
                        os.stat(self.mnt / d / name)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        self.unexpected(f"stat {d}/{name}", e)

    def changer(self, t: Path, changes: int) -> None:
        """As `Loops.changer`, without a pause between changes."""
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


@pytest.mark.parametrize("seed", [3, 4])
def test_back_to_back_changes_under_stat(tmp_path: Path, need_fuse: None, seed: int) -> None:
    t = tmp_path
    build(t)
    mnt = t / "M"
    r = subprocess.run([UNIONFS, "mount", f"{t}/U=rw:{t}/B", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        loops = Statting(mnt, seed)
        threads = [threading.Thread(target=loops.reader, args=(n,)) for n in range(4)]
        threads += [threading.Thread(target=loops.stat_reader, args=(n,)) for n in range(2)]
        threads += [threading.Thread(target=loops.writer, args=(n,)) for n in range(3)]
        for th in threads:
            th.start()
        try:
            loops.changer(t, changes=100)
        finally:
            loops.stop.set()
            for th in threads:
                th.join(timeout=60)
        print("FIGURE live_branch_race_stat", loops.counts)
        assert not loops.errors, "\n".join(loops.errors[:10])
        assert loops.counts["changes"] >= 50 and loops.counts["reads"] > 0 and loops.counts["writes"] > 0, \
            loops.counts
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
