"""``unionfs umount MNT``: unmount and wait for the mount's daemon to let go of it.

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
    """Unmount a unionfs mount and wait for its daemon to let go of it: to let go of its pidfile's
    lock, which it holds until all else of the mount is closed (a resident server's worker may then
    serve another mount), or, for a daemon of an older build, to exit."""
    mp = os.path.realpath(mountpoint)
    found = mountinfo.mount_at(mp)
    kind = found.fstype if found else None
    if kind is None:
        raise QuietError(f"{mountpoint!r} is not mounted")
    if kind != "fuse.unionfs":
        raise QuietError(f"{mountpoint!r} is not a unionfs mount (it is {kind})")
    daemon = None
    held = None
    try:
        state = StateDir.open(create=False)
    except QuietError as e:
        log.debug("not waiting for the daemon: %s", e)
        state = None
    if state is not None:
        daemon = state.daemon(statedir.pid_name(mp))   # None: none, or a pidfile a dead one left
        if daemon is not None:
            held = state.locked_pidfile(statedir.pid_name(mp))
        state.close()
    try:
        proc = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True,
                              errors="surrogateescape")
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            raise QuietError(err[-1] if err else f"fusermount3 -u {mp} failed")
        if daemon is not None and held is not None:
            if not statedir.wait_released(held, timeout):
                raise QuietError(f"unmounted, but the daemon (pid {daemon.pid}) has not let go of it after "
                                 f"{timeout:.0f}s")
            return
    finally:
        if held is not None:
            os.close(held)
    if daemon is not None and not statedir.wait_for_exit(daemon.pid, timeout, daemon.start):
        raise QuietError(f"unmounted, but the daemon (pid {daemon.pid}) has not exited after {timeout:.0f}s")
