"""Fixtures of the hardening tests: hostile branches, crashes, concurrency, data integrity, odd names
and sizes, daemon errors and bad input — nothing lost, nothing escapes.

Each item has a bounded version in the default suite and a long one behind ``@pytest.mark.slow``
(``--runslow``). Every test is seeded; the only waits are bounded ones. Daemons are our own
foreground children (``hardening_util.Daemon``), so we hold their PIDs: SIGKILL goes to them only.
Figures are printed with the ``FIGURE`` prefix (``pytest -s`` shows them;
``scripts/hardening_report.py`` collects them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from hardening_util import Layers


@pytest.fixture
def layers(tmp_path: Path, need_fuse: None) -> Iterator[Layers]:
    ly = Layers(tmp_path / "union")
    yield ly
    # never leave a mount below tmp_path
    prefix = os.fsencode(str(tmp_path)) + b"/"
    for mp, _t, _s in reversed(util.mounts()):
        if mp.startswith(prefix):
            util.umount(os.fsdecode(mp))
