"""Smoke test of `perf/run_workloads.py`: one short run of both workloads completes and validates.

Speed is never asserted here: the test checks only that `unionfs run` and bubblewrap on kernel
overlayfs each produced a valid launch and a valid apt run (exit 0, jq in the container layer),
that nothing was left mounted, and that the result files were written.  It uses Debian's mirror
(and builds the Debian root filesystem if it is not cached), hence ``--network`` and ``--runslow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unionfs.core import mountinfo

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.usefixtures("need_fuse", "need_overlay")
def test_run_workloads_runs_and_validates(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the script needs root (mounts, containers)")
    if shutil.which("bwrap") is None:
        pytest.fail("needs bubblewrap (apt-get install bubblewrap; scripts/setup.sh installs it)")
    done = subprocess.run(
        [sys.executable, str(REPO / "perf/run_workloads.py"), "--reps", "1", "--launch-runs", "1",
         "--impls", "unionfs,kernel+bwrap", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unionfs / kernel+bwrap" in done.stdout
    (result,) = tmp_path.glob("run-workloads-*.json")
    samples = json.loads(result.read_text())["samples"]
    assert {(s["workload"], s["impl"]) for s in samples} == {
        (w, i) for w in ("launch", "apt") for i in ("unionfs", "kernel+bwrap")}
    failed = [s for s in samples if s["error"] or s["seconds"] is None]
    assert not failed, failed
    assert all(set(s["phases"]) == {"update", "install"} for s in samples if s["workload"] == "apt")
    assert not [m for m in mountinfo.mounts() if b"/var/tmp/unionfs-runperf/" in m.point]
