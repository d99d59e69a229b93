"""The suite's own rules: the log checker's reading of a daemon's log, and CI failing a test that was
skipped because the machine lacks FUSE, overlayfs or podman."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unionfs.conformance import harness

LOG = """\
2024-01-01 10:00:00,000 unionfs.server.daemon INFO mounted /m
2024-01-01 10:00:01,000 unionfs.server.daemon WARNING the libfuse shim was bypassed: no fallocate
2024-01-01 10:00:02,000 unionfs.server.operations ERROR unexpected error in lookup(1, b'boom')
Traceback (most recent call last):
  File "x.py", line 1, in lookup
    raise RuntimeError("planted fault")
RuntimeError: planted fault
2024-01-01 10:00:03,000 unionfs.server.daemon INFO unmounted
fuse: a libfuse line that is not ours
"""


def test_log_problems_finds_warnings_errors_and_tracebacks() -> None:
    assert harness.log_problems(LOG) == [
        "2024-01-01 10:00:01,000 unionfs.server.daemon WARNING the libfuse shim was bypassed: no fallocate",
        "2024-01-01 10:00:02,000 unionfs.server.operations ERROR unexpected error in lookup(1, b'boom')",
        "traceback: RuntimeError: planted fault",
    ]


def test_log_problems_leaves_out_what_is_allowed() -> None:
    assert harness.log_problems(LOG, ["shim was bypassed", "unexpected error in lookup", "planted fault"]) == []
    assert harness.log_problems(LOG, ["planted fault"]) == [
        "2024-01-01 10:00:01,000 unionfs.server.daemon WARNING the libfuse shim was bypassed: no fallocate",
        "2024-01-01 10:00:02,000 unionfs.server.operations ERROR unexpected error in lookup(1, b'boom')",
    ]


def test_a_clean_log_has_no_problems() -> None:
    assert harness.log_problems("2024-01-01 10:00:00,000 unionfs.server.daemon INFO mounted /m\n") == []


PROBE_REASON = "UNIONFS_TEST_PROBE_SKIP"


def test_probe() -> None:
    """Run only by the tests below, in a pytest of their own: skips for the reason it is given."""
    reason = os.environ.get(PROBE_REASON)
    if reason:
        pytest.skip(reason)


def _probe(reason: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[PROBE_REASON] = reason
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{__file__}::test_probe"], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("reason", [harness.NEEDS_FUSE + ": no /dev/fuse", harness.NEEDS_OVERLAY + ": EPERM",
                                    "needs podman: podman not on PATH"])
def test_under_ci_a_skip_for_a_missing_fuse_overlayfs_or_podman_fails(reason: str) -> None:
    under_ci = _probe(reason, "true")
    assert under_ci.returncode == 1, under_ci.stdout
    assert "CI is set, but this test was skipped" in under_ci.stdout


def test_without_ci_a_skip_for_a_missing_fuse_is_a_skip() -> None:
    r = _probe(harness.NEEDS_FUSE + ": no /dev/fuse", None)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout


def test_under_ci_other_skips_stay_skips() -> None:
    r = _probe("slow: run with --runslow", "true")
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout
