"""Programs under test, the mount table, and the daemons our tests started.

Mounting, waiting for a mount and unmounting are `unionfs.conformance.harness`'s (shared with the
conformance oracle and the benchmark); the names here are the ones the tests have always used.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from unionfs.conformance import harness
from unionfs.core import mountinfo

BIN_DIR = Path(sys.executable).parent


def program(name: str) -> str:
    """Path of one of our console scripts, next to the interpreter running the tests."""
    cand = BIN_DIR / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    return found if found else str(cand)


#: Which implementation the differential tests drive: ``unionfs`` (default), ``unionfs-overlay`` (the
#: fuse-overlayfs command line of unionfs; AUFS-style layouts are mapped to overlay options), or
#: ``fuse-overlayfs`` (to validate the harness itself against another FUSE overlay).
IMPL = os.environ.get("UNIONFS_TEST_IMPL", "unionfs")

MOUNT_TIMEOUT = harness.MOUNT_TIMEOUT  # bounded wait for a mount to appear / a daemon to exit

abort_fuse_under = harness.abort_fuse_under
mount_fstype = harness.mount_type
#: Why this machine cannot serve FUSE mounts / mount kernel overlayfs (None: it can); asked once.
fuse_problem = functools.cache(harness.fuse_problem)
overlay_problem = functools.cache(harness.overlay_problem)


def mounts() -> list[tuple[bytes, str, str]]:
    """(mountpoint, fstype, source) for every mount in this mount namespace, in mount order."""
    return [(m.point, m.fstype, m.source) for m in mountinfo.mounts()]


def is_mounted(path: os.PathLike[str] | str | bytes) -> bool:
    return mount_fstype(path) is not None


def wait_for_mount(path: os.PathLike[str] | str, proc: subprocess.Popen[bytes] | None = None,
                   timeout: float = MOUNT_TIMEOUT, fstype_prefix: str = "fuse") -> None:
    """Wait (bounded) until a filesystem whose type starts with ``fstype_prefix`` is mounted at
    ``path``. Raises if ``proc`` exits first or the time runs out."""
    harness.wait_mounted(path, proc, timeout, fstype_prefix)


def umount(path: os.PathLike[str] | str, proc: subprocess.Popen[bytes] | None = None,
           timeout: float = MOUNT_TIMEOUT) -> int | None:
    """Unmount ``path`` and never leave it mounted (a lazy unmount as the last resort); with
    ``proc``, wait (bounded) for that daemon to exit and return its status."""
    return harness.unmount(path, proc, timeout)


def find_daemons(marker: str) -> list[int]:
    """PIDs of processes whose command line contains ``marker`` (a unique temporary path that only
    our own test used), excluding ourselves."""
    res = []
    me = os.getpid()
    needle = os.fsencode(marker)
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if needle in f.read():
                    res.append(int(d))
        except OSError:
            pass
    return res


def wait_daemons_gone(marker: str, timeout: float = MOUNT_TIMEOUT) -> list[int]:
    """Wait (bounded) until no process mentions ``marker``; return those still there."""
    deadline = time.monotonic() + timeout
    while (pids := find_daemons(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids


def kill_daemons(marker: str) -> list[int]:
    """Kill daemons that our test started (identified by the unique ``marker`` path)."""
    pids = find_daemons(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def requests_served(mnt: os.PathLike[str] | str, request: str) -> int:
    """How many *request* requests (``getxattr``, ``lookup``...) the daemon of *mnt* has answered,
    as ``unionfs stats --json`` says."""
    r = subprocess.run([program("unionfs"), "stats", "--json", str(mnt)], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, r.stderr
    count: int = json.loads(r.stdout)["requests"].get(request, {}).get("count", 0)
    return count
