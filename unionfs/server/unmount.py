"""``unionfs umount MNT``: unmount and wait for the mount's daemon to exit.

Kept apart from the daemon's module so that the console script can run it without loading the
CLI or the server (`unionfs.entry`): an unmount is in the loop of every container start and stop.
"""
from __future__ import annotations

import logging
import os
import subprocess

from unionfs.core import mountinfo
from unionfs.core.errors import QuietError

from . import statedir
from .statedir import StateDir

log = logging.getLogger(__name__)


def umount(mountpoint: str, timeout: float = 60.0) -> None:
    """Unmount a unionfs mount and wait for its daemon to exit."""
    mp = os.path.realpath(mountpoint)
    found = mountinfo.mount_at(mp)
    kind = found.fstype if found else None
    if kind is None:
        raise QuietError(f"{mountpoint!r} is not mounted")
    if kind != "fuse.unionfs":
        raise QuietError(f"{mountpoint!r} is not a unionfs mount (it is {kind})")
    daemon = None
    try:
        state = StateDir.open(create=False)
    except QuietError as e:
        log.debug("not waiting for the daemon: %s", e)
        state = None
    if state is not None:
        daemon = state.daemon(statedir.pid_name(mp))   # None: none, or a pidfile a dead one left
        state.close()
    proc = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True, errors="surrogateescape")
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise QuietError(err[-1] if err else f"fusermount3 -u {mp} failed")
    if daemon is not None and not statedir.wait_for_exit(daemon.pid, timeout, daemon.start):
        raise QuietError(f"unmounted, but the daemon (pid {daemon.pid}) has not exited after {timeout:.0f}s")
