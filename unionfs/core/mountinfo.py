"""The mount table of this process's mount namespace, read from /proc/self/mountinfo.

The one reader of mountinfo for the daemon, the CLI, the oracle, the benchmark and the tests. Mount
points are bytes (a mount point's name need not be UTF-8); mountinfo escapes space, tab, newline and
backslash as a backslash and three octal digits.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
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
