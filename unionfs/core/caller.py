"""What the kernel knows of a requesting process and a FUSE server can only read back from /proc."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CAP_FSETID = 4


def in_group_or_capable(pid: int, fsgid: int, gid: int) -> bool:
    """Whether process *pid*, whose filesystem gid is *fsgid*, is in group *gid* or holds CAP_FSETID:
    what the kernel asks before a change by that process may leave a file's setgid bit in place.

    The supplementary groups and capabilities are read from ``/proc/PID/status``; a process that is
    gone (or a pid from another namespace) counts as neither, unless *fsgid* is *gid*.
    """
    if fsgid == gid:
        return True
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        log.debug("caller %d unknown: %s", pid, e)
        return False
    for line in lines:
        key, _, value = line.partition(b":")
        if key == b"Groups" and gid in {int(g) for g in value.split()}:
            return True
        if key == b"CapEff" and int(value, 16) >> CAP_FSETID & 1:
            return True
    return False
