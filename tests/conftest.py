"""Shared test configuration.

- ``--runslow`` runs tests marked ``@pytest.mark.slow`` (skipped otherwise).
- ``--network`` runs tests marked ``@pytest.mark.network``: they fetch from Debian's mirror (skipped
  otherwise; CI does not pass it).
- Tests that need FUSE, kernel overlayfs or podman skip (with a reason starting "needs FUSE" /
  "needs overlayfs" / "needs podman") only when the machine truly lacks them; when the environment
  variable ``CI`` is set, such a skip is a failure of that test.
- The log checker: a test fails when a daemon it started through the harness
  (`unionfs.conformance.harness.start_daemon`: the ``pair`` fixture, ``util.mount_impl``, the
  hardening daemons, the oracle's FUSE implementations) logged a warning, an error or a traceback, or
  when the union's code logged one in the test process itself (the handler tests) — unless the test
  declares it: ``@pytest.mark.daemon_log_ok("regex", ...)`` allows the lines matching any of them.
- At the end of the session no mount may remain below pytest's temporary directory, and /dev/fuse has
  the mode it had at the start (put back, with the tests after which it differed named).
- ``UNIONFS_SERVER`` is ``off`` unless set: mounts take the normal path, not a resident server.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import util  # noqa: E402

from unionfs.conformance import harness  # noqa: E402

# The suite finds a mount's daemon by its command line, which a resident server's worker does not
# carry: mounts take the normal path unless a test (tests/fuse/test_resident.py) or the caller asks.
os.environ.setdefault("UNIONFS_SERVER", "off")

#: Skips that say the machine lacks what the test is about: a failure under CI.
ENV_SKIP = re.compile(rf"\b({harness.NEEDS_FUSE}|{harness.NEEDS_OVERLAY}|needs podman)\b")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked @pytest.mark.slow")
    parser.addoption("--network", action="store_true", default=False,
                     help="also run tests marked @pytest.mark.network (they use Debian's mirror)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long soaks and stress runs (run with --runslow)")
    config.addinivalue_line("markers", "fuse: needs /dev/fuse and fusermount3")
    config.addinivalue_line("markers", "network: fetches from the network (run with --network)")
    config.addinivalue_line("markers", "daemon_log_ok(*patterns): the daemon may log warnings, errors or "
                            "tracebacks matching these regular expressions")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_network = pytest.mark.skip(reason="network: run with --network")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "network" in item.keywords and not config.getoption("--network"):
            item.add_marker(skip_network)


def ci_failure(reason: str, ci: str | None) -> str | None:
    """Under CI (*ci* set and not "false"/"0"), the failure a skip for *reason* becomes, else None."""
    if not ci or ci.lower() in ("0", "false") or not ENV_SKIP.search(reason):
        return None
    return f"CI is set, but this test was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and isinstance(report.longrepr, tuple):
        failure = ci_failure(str(report.longrepr[2]), os.environ.get("CI"))
        if failure is not None:
            report.outcome = "failed"
            report.longrepr = failure


def _fuse_mode() -> int | None:
    try:
        return os.stat("/dev/fuse").st_mode & 0o7777
    except OSError:
        return None


FUSE_MODE_AT_START = _fuse_mode()
fuse_mode_changed_by: list[str] = []   # the tests after which /dev/fuse's mode was not as before


@pytest.fixture(autouse=True)
def _dev_fuse_mode_kept(request: pytest.FixtureRequest) -> Iterator[None]:
    """Rootless tests set /dev/fuse to 0666 and must put it back: note a test after which the mode
    differs (a module's fixture that sets it for all its tests sets it before this looks)."""
    before = _fuse_mode()
    yield
    after = _fuse_mode()
    if after != before:
        fuse_mode_changed_by.append(f"{request.node.nodeid}: {before:o} -> {after:o}" if before is not None
                                    and after is not None else request.node.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    problems = []
    if FUSE_MODE_AT_START is not None and _fuse_mode() != FUSE_MODE_AT_START:
        os.chmod("/dev/fuse", FUSE_MODE_AT_START)   # as the machine had it (Debian's udev: 0666)
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"WARNING: /dev/fuse's mode was left changed (put back to "
                          f"{FUSE_MODE_AT_START:o}); changed across: {fuse_mode_changed_by}", yellow=True)
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


class _Records(logging.Handler):
    """Keeps the union's own log records of WARNING and above emitted in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name} {record.levelname} {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            line += f" (traceback: {type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        self.lines.append(line)


@pytest.fixture(autouse=True)
def _log_checker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test when a daemon it started, or the union's code in this process, logged a
    warning, an error or a traceback it did not declare with ``@pytest.mark.daemon_log_ok``.
    Runs after every other fixture of the test has been torn down (daemons unmounted)."""
    harness.started_logs.clear()
    records = _Records()
    logger = logging.getLogger("unionfs")
    logger.addHandler(records)
    try:
        yield
    finally:
        logger.removeHandler(records)
    allowed = [p for m in request.node.iter_markers("daemon_log_ok") for p in m.args]
    problems = [f"in this process: {line}" for line in records.lines
                if not any(re.search(p, line) for p in allowed)]
    for path in dict.fromkeys(harness.started_logs):
        problems += [f"{path}: {line}" for line in harness.log_problems(harness.read_log(path), allowed)]
    harness.started_logs.clear()
    if problems:
        shown = "\n  ".join(problems[:20])
        pytest.fail(f"unexpected warnings, errors or tracebacks in the daemon's log (declare expected ones "
                    f"with @pytest.mark.daemon_log_ok):\n  {shown}", pytrace=False)


@pytest.fixture
def need_fuse() -> None:
    why = util.fuse_problem()
    if why:
        pytest.skip(why)


@pytest.fixture
def need_overlay() -> None:
    why = util.overlay_problem()
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
