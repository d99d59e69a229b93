"""The mount table of this process's mount namespace, read from /proc/self/mountinfo.

The one reader of mountinfo for the daemon, the CLI, the oracle, the benchmark and the tests. Mount
points are bytes (a mount point's name need not be UTF-8); mountinfo escapes space, tab, newline and
backslash as a backslash and three octal digits.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple


class Mount(NamedTuple):
    point: bytes    # where it is mounted, unescaped
    dev: str        # "major:minor"
    fstype: str     # e.g. "fuse.unionfs", "overlay"
    source: str     # the mount source ("overlay", "/dev/vda", ...)
    options: str    # the per-mount options ("rw,nosuid,nodev,relatime")
    root: bytes     # the path, inside its filesystem, that is mounted here ("/" for a whole one)
    super_options: str  # the filesystem's own options ("rw,memory" for a cgroup v1 hierarchy)


def unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def parse(data: bytes) -> Iterator[Mount]:
    """The mounts in mountinfo text *data* (of this process or, for tests, captured)."""
    for line in data.splitlines():
        fields = line.split()
        if b"-" not in fields:
            continue
        sep = fields.index(b"-")
        if len(fields) < sep + 4 or sep < 6:
            continue
        yield Mount(unescape(fields[4]), fields[2].decode(), os.fsdecode(fields[sep + 1]),
                    os.fsdecode(unescape(fields[sep + 2])), fields[5].decode(), unescape(fields[3]),
                    os.fsdecode(fields[sep + 3]))


def mounts() -> Iterator[Mount]:
    """Every mount, in mount order (a later one at the same point is on top)."""
    with open("/proc/self/mountinfo", "rb") as f:
        data = f.read()
    yield from parse(data)


def mount_at(point: str | bytes) -> Mount | None:
    """The topmost mount at *point* (as given: nothing is resolved here)."""
    target = os.fsencode(point)
    found = None
    for m in mounts():
        if m.point == target:
            found = m
    return found


def is_mounted(point: str | bytes | os.PathLike[str]) -> bool:
    """Whether something is mounted at *point* (its real path)."""
    return mount_at(os.path.realpath(os.fsencode(point))) is not None


def wait_for_mount(point: str | bytes | os.PathLike[str], timeout: float, *,
                   exited: Callable[[], int | None] | None = None, fstype: str = "") -> Mount:
    """Wait (bounded) until a filesystem whose type starts with *fstype* is mounted at *point*; its mount.

    Only mountinfo is read, never the mount point (a daemon still starting could not answer for it);
    *point*'s parent is resolved, not *point*.  Raises `ChildProcessError` once *exited* (a daemon's
    ``poll``) gives an exit status, and `TimeoutError` after *timeout* seconds.
    """
    path = os.path.abspath(os.fsencode(point))
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        found = mount_at(target)
        if found is not None and found.fstype.startswith(fstype):
            return found
        status = exited() if exited is not None else None
        if status is not None:
            raise ChildProcessError(f"the daemon exited with status {status} before {os.fsdecode(target)} "
                                    "was mounted")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{os.fsdecode(target)} not mounted after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
