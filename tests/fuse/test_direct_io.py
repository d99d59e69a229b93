"""O_DIRECT writes and the page cache: buffered readers of the same file, through an fd opened
before the writes and through fds opened after each, see what the direct writes wrote, on unionfs
as on kernel overlayfs (`c/direct_race.c`: asynchronous O_DIRECT writes with io_submit racing a
reader thread)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from util import F, Pair, Side

pytestmark = pytest.mark.fuse

SOURCE = Path(__file__).parent / "c" / "direct_race.c"
ROUNDS = 1000


@pytest.fixture
def direct_race(tmp_path: Path) -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "direct_race"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(SOURCE)], check=True)
    return str(exe)


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_buffered_reads_see_async_direct_writes(pair: Pair, direct_race: str, where: str) -> None:
    data = [F("f", b"\0" * 65536)]
    pair.build([data] if where == "lower" else [[F("x", b"x")]], [] if where == "lower" else data)

    def run(side: Side) -> str:
        out = subprocess.run([direct_race, side.p("f"), str(ROUNDS)], capture_output=True,
                             check=True, timeout=120)
        return out.stdout.decode().strip().splitlines()[-1]
    assert pair.same(run, "stale rounds") == f"0 of {ROUNDS} rounds stale"
