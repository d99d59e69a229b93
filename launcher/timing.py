"""``UNIONFS_RUN_TIMING=1``: the launch's milestones on stderr, for ``perf/launch_latency.py``.

Each is one line, ``unionfs-run-timing NAME=SECONDS``, on the CLOCK_MONOTONIC clock that the
benchmark also reads; ``exec`` is when the command was exec'd.
"""

from __future__ import annotations

import os
import time

ENABLED = bool(os.environ.get("UNIONFS_RUN_TIMING"))


def stamp(name: str) -> None:
    """Write the milestone *name* with the time now, when timing is enabled."""
    if ENABLED:
        os.write(2, f"unionfs-run-timing {name}={time.monotonic():.6f}\n".encode())
