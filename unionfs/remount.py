"""`mount -o remount,ro|rw MNT` on a unionfs mount, as mount(8) and mount.fuse3 ask for it.

mount(8) hands a remount of a ``fuse.unionfs`` (or ``fuse.unionfs-overlay``) mount to mount.fuse3,
which runs ``PROGRAM SOURCE MNT -o ro,remount,dev,suid``: the program, not the kernel, must do it.
The kernel's FUSE module takes a remount itself (read-only on and off, and the per-mount flags), so
this is one mount(2) call with MS_REMOUNT and nothing asked of the daemon: a daemon mounted with a
writable top serves writes whenever the kernel lets them through (see `server.daemon.serve`).

The flags not named keep their current value, read from mountinfo, as mount(8) does for a
filesystem it remounts itself.  ``suid`` and ``dev`` are not acted on: mount.fuse3 adds them to every
call, so they say nothing of what the user asked (``nosuid``, ``nodev``, ``noexec``, ``exec`` and the
atime flags are).  Options of the union itself (``lowerdir=``...) cannot change on a live mount and are
ignored, as the kernel's FUSE module ignores its own.
"""
from __future__ import annotations

import errno
import os

from unionfs.branchctl import AUFS_WORDS, union_mount
from unionfs.core import sysx
from unionfs.core.errors import QuietError

ATIME = sysx.MS_NOATIME | sysx.MS_RELATIME | sysx.MS_STRICTATIME
# What an asked-for option does to the flags: (flags to clear, flags to set).
CHANGES = {
    "ro": (0, sysx.MS_RDONLY), "rw": (sysx.MS_RDONLY, 0),
    "nosuid": (0, sysx.MS_NOSUID), "nodev": (0, sysx.MS_NODEV),
    "noexec": (0, sysx.MS_NOEXEC), "exec": (sysx.MS_NOEXEC, 0),
    "noatime": (ATIME, sysx.MS_NOATIME), "relatime": (ATIME, sysx.MS_RELATIME),
    "strictatime": (ATIME, sysx.MS_STRICTATIME), "atime": (ATIME, 0),
    "nodiratime": (0, sysx.MS_NODIRATIME), "diratime": (sysx.MS_NODIRATIME, 0),
    "nosymfollow": (0, sysx.MS_NOSYMFOLLOW), "symfollow": (sysx.MS_NOSYMFOLLOW, 0),
}


def words(options: list[str] | tuple[str, ...]) -> list[str]:
    """The comma-separated words of every ``-o`` value, in order."""
    return [w for o in options for w in o.split(",") if w]


def asked(options: list[str] | tuple[str, ...]) -> bool:
    """Whether these ``-o`` values ask for a remount."""
    return "remount" in words(options)


def flags_for(current: str, options: list[str]) -> int:
    """The mount flags for a remount: *current* (mountinfo's per-mount options) changed by *options*."""
    flags = 0
    for word in current.split(","):
        flags |= sysx.FLAG_WORDS.get(word, 0)
    for word in options:
        clear, add = CHANGES.get(word, (0, 0))
        flags = (flags & ~clear) | add
    return flags


def branch_words(options: list[str] | tuple[str, ...]) -> list[str]:
    """The words of *options* that change branches (AUFS's add:, del:, mod:...)."""
    return [w for w in words(options) if w.partition(":")[0] in AUFS_WORDS and ":" in w]


def remount(mountpoint: str, options: list[str] | tuple[str, ...]) -> None:
    """Remount the unionfs mount at *mountpoint* with *options* (``-o`` values); QuietError if not.

    AUFS's branch words (``add:1:/dir=ro``, ``del:/dir``, ``mod:/dir=rr``...) go to the mount's daemon
    first, all together (`unionfs.branchctl`); the mount flags change only when one is asked for
    beside them (``rw``, which mount(8) adds to a remount, is not counted then)."""
    branches = branch_words(options)
    if branches:
        from unionfs.branchctl import aufs_changes, change

        change(mountpoint, aufs_changes(branches))
        if not any(w in CHANGES and w != "rw" for w in words(options)):
            return
    point, found = union_mount(mountpoint)
    try:
        sysx.remount(os.fsencode(point), flags_for(found.options, words(options)))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise QuietError(f"cannot remount {mountpoint!r} read-only: a file on it is open for "
                             "writing") from None
        if e.errno == errno.EPERM:
            raise QuietError(f"cannot remount {mountpoint!r}: only root (or the mount's user namespace "
                             "owner) may") from None
        raise QuietError(f"cannot remount {mountpoint!r}: {e.strerror}") from None
