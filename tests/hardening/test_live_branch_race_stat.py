"""Branch changes back to back under readers that stat every name and writers, as in
test_live_branch_race, the window wider: no pause between changes, more threads, and stats (a stat
of a name the kernel has cached sends GETATTR for the node it holds, which a change may have
overtaken).  Names every branch list has (shared/fK, common/same) never fail; a name that went with
its branch is ENOENT, never ESTALE: the kernel retries ESTALE only once.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_live_branch_race import FILES, POOL, Loops, race

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


@pytest.mark.parametrize("seed", [3, 4])
def test_back_to_back_changes_under_stat(tmp_path: Path, need_fuse: None, seed: int) -> None:
    race(tmp_path, Statting, seed, {"reader": 4, "stat_reader": 2, "writer": 3}, changes=100, pause=0)
