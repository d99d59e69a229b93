"""perf/launch_latency.py runs and prints every row (slow: it launches each variant a few times)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts and makes namespaces as root")
@pytest.mark.usefixtures("need_fuse")
def test_launch_latency_smoke() -> None:
    r = subprocess.run([sys.executable, str(REPO / "perf" / "launch_latency.py"), "--runs", "1"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = {line[:34].strip(): line[34:].split() for line in r.stdout.splitlines()[2:]}
    assert "failed:" not in r.stdout, r.stdout
    for name in ("unionfs run (fuse)", "unionfs run (overlay)", "unionfs run --rootless (fuse)"):
        to_exec, total = (float(x) for x in rows[name])
        assert 0 < to_exec <= total, r.stdout
