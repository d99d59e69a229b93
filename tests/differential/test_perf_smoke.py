"""Smoke test of the benchmark harness: `perf/bench.py --quick` runs to completion and validates.

Speed is never asserted here; the test checks only that every reference implementation produced a valid
measurement for every workload and that the result files were written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCES = ("native", "kernel", "fuse-overlayfs")


@pytest.mark.slow
def test_quick_benchmark_runs_and_validates(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmark needs root (mounts, drop_caches)")
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("needs FUSE: fuse-overlayfs is not installed")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "perf/bench.py"),
            "--quick",
            "--only",
            "W1,W2,W3,W4,W5,W6,W7,W8,W10",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Targets:" in done.stdout
    document = json.loads((tmp_path / "latest.json").read_text())
    records = [r for r in document["records"] if r["impl"] in REFERENCES]
    workloads = {r["workload"] for r in records}
    assert workloads == {*(f"W{i}" for i in range(1, 9)), "W10"}
    invalid = [r for r in records if r["seconds"] is None]
    assert not invalid, invalid[:3]
    assert (tmp_path / "latest.csv").exists()
