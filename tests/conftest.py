"""Shared test configuration.

- ``--runslow`` runs tests marked ``@pytest.mark.slow`` (skipped otherwise).
- ``--network`` runs tests marked ``@pytest.mark.network``: they fetch from Debian's mirror (skipped
  otherwise; CI does not pass it).
- Tests that need FUSE or kernel overlayfs skip (with a reason starting "needs FUSE" / "needs
  overlayfs") only when the machine truly lacks them; when the environment variable ``CI`` is set, any
  such skip fails the session.
- At the end of the session no mount may remain below pytest's temporary directory.
- ``UNIONFS_SERVER`` is ``off`` unless set: mounts take the normal path, not a resident server.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import util  # noqa: E402

# The suite finds a mount's daemon by its command line, which a resident server's worker does not
# carry: mounts take the normal path unless a test (tests/test_resident.py) or the caller asks.
os.environ.setdefault("UNIONFS_SERVER", "off")

NEEDS_FUSE = "needs FUSE"
NEEDS_OVERLAY = "needs overlayfs"
_env_skips: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked @pytest.mark.slow")
    parser.addoption("--network", action="store_true", default=False,
                     help="also run tests marked @pytest.mark.network (they use Debian's mirror)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long soaks and stress runs (run with --runslow)")
    config.addinivalue_line("markers", "fuse: needs /dev/fuse and fusermount3")
    config.addinivalue_line("markers", "network: fetches from the network (run with --network)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_network = pytest.mark.skip(reason="network: run with --network")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "network" in item.keywords and not config.getoption("--network"):
            item.add_marker(skip_network)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if NEEDS_FUSE in reason or NEEDS_OVERLAY in reason:
            _env_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    problems = []
    if os.environ.get("CI") and _env_skips:
        problems.append("CI is set but tests needing FUSE/overlayfs were skipped:\n  "
                        + "\n  ".join(_env_skips))
    basetemp = session.config._tmp_path_factory.getbasetemp() if hasattr(  # type: ignore[attr-defined]
        session.config, "_tmp_path_factory") else None
    if basetemp is not None:
        prefix = os.fsencode(str(basetemp)) + b"/"
        left = [mp for mp, _t, _s in util.mounts() if mp.startswith(prefix)]
        if left:
            for mp in reversed(left):
                util.umount(os.fsdecode(mp))
            problems.append(f"tests left mounts behind (now unmounted): {left}")
    if problems:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        for p in problems:
            if tr is not None:
                tr.write_line(f"ERROR: {p}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


TEST_TIMEOUT = float(os.environ.get("UNIONFS_TEST_TIMEOUT", "300"))  # seconds; slow tests: 3x


@pytest.fixture(autouse=True)
def _fuse_watchdog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """A daemon that stops answering would hang the whole run (a FUSE request waits forever). After
    TEST_TIMEOUT, abort the FUSE connections below this test's tmp_path: blocked calls then fail
    with ENOTCONN, and the test is failed with a message saying so."""
    limit = TEST_TIMEOUT * (3 if "slow" in request.keywords else 1)
    fired: list[bytes] = []
    timer = threading.Timer(limit, lambda: fired.extend(util.abort_fuse_under(tmp_path) or [b"-"]))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if fired:
        pytest.fail(f"test ran longer than {limit:.0f}s; aborted the FUSE connections of {fired}")


@functools.cache
def fuse_problem() -> str | None:
    """None when this machine can serve FUSE mounts, else why not."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"{NEEDS_FUSE}: cannot open /dev/fuse: {e.strerror}"
    if shutil.which("fusermount3") is None:
        return f"{NEEDS_FUSE}: fusermount3 not on PATH (apt-get install fuse3)"
    return None


@functools.cache
def overlay_problem() -> str | None:
    """None when kernel overlayfs can be mounted here (tried for real, once), else why not."""
    with tempfile.TemporaryDirectory(prefix="ovl-probe-", dir="/var/tmp") as d:
        for n in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(d, n))
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={d}/l,upperdir={d}/u,workdir={d}/w", f"{d}/m"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"{NEEDS_OVERLAY}: mount -t overlay failed: {r.stderr.strip()}"
        util.umount(f"{d}/m")
    return None


@pytest.fixture
def need_fuse() -> None:
    why = fuse_problem()
    if why:
        pytest.skip(why)


@pytest.fixture
def need_overlay() -> None:
    why = overlay_problem()
    if why:
        pytest.skip(why)


@pytest.fixture
def pair(tmp_path: Path, need_fuse: None, need_overlay: None) -> Iterator[util.Pair]:
    """Kernel overlayfs and the implementation under test on identical copies of the same layers.
    Call ``pair.build(...)`` in the test. At teardown both are unmounted (the daemon must exit 0
    without a traceback) and every lower branch must be unchanged."""
    p = util.Pair(tmp_path)
    try:
        yield p
    finally:
        try:
            p.unmount(final=True)
        finally:
            p.check_lowers()
