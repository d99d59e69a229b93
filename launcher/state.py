"""What a launch holds on the host: the container layer's lock and its per-run directory.

One launch per container layer at a time: the launcher holds an exclusive ``flock`` on
the container layer's directory for as long as it runs.  Nothing is written into the
layer, and the kernel drops the lock when the launcher dies, even of SIGKILL.

The per-run directory (``$TMPDIR/.unionfs-run-UID-ID``, /tmp by default) is only a mount
point: the launcher covers it with a tmpfs in its private mount namespace, so the host
sees it empty.  The launcher removes it when it ends, and holds a ``flock`` on it while
it runs, so that the next launcher can tell a directory left by a SIGKILLed one (no
lock) from a live one, and removes it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat

from launcher.errors import LaunchError

log = logging.getLogger(__name__)

PREFIX = ".unionfs-run-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def lock_container_layer(path: str) -> int:
    """An fd with an exclusive flock on the container layer *path*; LaunchError if another launch has it."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LaunchError(f"the container layer {path} is in use by another unionfs run") from None
    except OSError:
        os.close(fd)
        raise
    return fd


def _base() -> str:
    return os.environ.get("TMPDIR", "/tmp")


def sweep_stale(uid: int, base: str | None = None) -> None:
    """Remove the per-run directories of *uid* that no live launcher holds (their launcher was killed)."""
    base = base or _base()
    mine = f"{PREFIX}{uid}-"
    try:
        entries = [e.name for e in os.scandir(base) if e.name.startswith(mine)]
    except OSError:
        return
    for name in entries:
        remove_unheld(os.path.join(base, name), uid)


def remove_unheld(path: str, uid: int | None = None) -> None:
    """Remove the empty directory *path* unless a live launcher holds its flock (or, with *uid*, it
    belongs to someone else): what a SIGKILLed launcher left.  Never follows a symlink."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    try:
        if uid is not None and os.fstat(fd).st_uid != uid:
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rmdir(path)
        log.debug("removed %s, left by a launcher that was killed", path)
    except OSError as exc:  # held by a live launcher, or not empty: not ours to remove
        log.debug("kept %s: %s", path, os.strerror(exc.errno or 0))
    finally:
        os.close(fd)


class RunDir:
    """This launch's directory on the host, locked while the launch runs; ``remove()`` at the end."""

    def __init__(self, uid: int, run_id: str) -> None:
        base = _base()
        sweep_stale(uid, base)
        for attempt in range(5):
            path = os.path.join(base, f"{PREFIX}{uid}-{run_id}" + (f"-{attempt}" if attempt else ""))
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            try:
                fd = os.open(path, _DIR_FLAGS)
            except FileNotFoundError:  # another launcher's sweep took it between our mkdir and open
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                same = os.path.samestat(os.fstat(fd), os.lstat(path))
            except OSError:  # ... or between our open and flock
                same = False
            if same:
                self.path, self._fd = path, fd
                return
            os.close(fd)
        raise LaunchError(f"could not make a run directory in {base}")

    @property
    def lock_fd(self) -> int:
        """The fd that holds the directory's flock (a process that must keep it locked inherits it)."""
        return self._fd

    def remove(self) -> None:
        """Remove the directory (its tmpfs unmounted first); never raises."""
        try:
            st = os.lstat(self.path)
            if stat.S_ISDIR(st.st_mode) and os.path.samestat(st, os.fstat(self._fd)):
                os.rmdir(self.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("run directory %s: %s", self.path, os.strerror(exc.errno or 0))
        os.close(self._fd)
