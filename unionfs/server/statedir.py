"""The daemon's state directory: its pidfile and its default log, keyed by the mount point.

The directory is /run/unionfs for root, ``$XDG_RUNTIME_DIR/unionfs``, or else ``/tmp/unionfs-<uid>``.
Anyone can make a name in /tmp first, so a state directory is used only when it is a real directory
(not a symlink), owned by us and of mode 0700 exactly; anything else is refused in one line.  Once
checked it is held open, and every state file is made relative to that fd with ``O_NOFOLLOW``: new
files with ``O_EXCL``, and a pidfile that replaces an old one is written to a temp name and renamed
into place.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import stat
import time
from dataclasses import dataclass

from unionfs.core.errors import QuietError

log = logging.getLogger(__name__)

STATE_MODE = 0o700
#: A mount's control socket is its key and this (see `unionfs.server.control`).
CONTROL_SUFFIX = ".ctl"
#: The largest control request or reply.
CONTROL_MAX = 1 << 17
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def state_dir() -> str:
    if os.geteuid() == 0:
        return "/run/unionfs"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base):
        return os.path.join(base, "unionfs")
    return f"/tmp/unionfs-{os.getuid()}"


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether the process *pid* (a daemon or server named by a pidfile or a socket's peer) has exited
    within *timeout* seconds: gone, or a zombie its parent has not reaped yet.

    Woken by the kernel at the exit (a pidfd is readable from then on, zombie or not); where there
    are no pidfds, by looking every 10 ms."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return _poll_for_exit(pid, timeout)
    try:
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        return bool(waiter.poll(max(0, math.ceil(timeout * 1000))))
    finally:
        os.close(fd)


def _poll_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if _is_zombie(pid):
            return True
        time.sleep(0.01)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def pid_name(mountpoint: str, resolved: bool = False) -> str:
    """The pidfile's name for the daemon of *mountpoint* (see `key_for`)."""
    return f"{key_for(mountpoint, resolved)}.pid"


def key_for(mountpoint: str, resolved: bool = False) -> str:
    """The file name stem for *mountpoint* (any bytes: a str as os.fsdecode gives it); *resolved*
    when it is a real path already (and may not be looked at: mounted, and served by this thread)."""
    import hashlib  # (not on the resident server's client's path)

    real = mountpoint if resolved else os.path.realpath(mountpoint)
    return hashlib.sha1(os.fsencode(real)).hexdigest()[:16]


def control_abstract(uid: int, key: str) -> str:
    """The abstract socket name of the control channel of a daemon with no state directory."""
    return f"\0unionfs/{uid}/{key}"


def unsafe_reason(st: os.stat_result) -> str | None:
    """Why a directory with this lstat() result must not hold our state, or None when it may."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.geteuid():
        return f"it belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
    if stat.S_IMODE(st.st_mode) != STATE_MODE:
        return f"its mode is {stat.S_IMODE(st.st_mode):04o}, not {STATE_MODE:04o}"
    return None


@dataclass
class StateDir:
    """A checked state directory, open as *fd*; *created* when this process made it."""

    path: str
    fd: int
    created: bool

    @classmethod
    def open(cls, create: bool, path: str | None = None) -> StateDir | None:
        """Open (with *create*, first make) the state directory and check it.

        None when it does not exist and *create* is false, or when it cannot be made (a daemon that
        is root only in a user namespace cannot write /run): the pidfile is a convenience.
        Raises `QuietError` when something is there that we must not use.
        """
        path = path or state_dir()
        created = False
        if create:
            try:
                os.mkdir(path, STATE_MODE)
                created = True
            except FileExistsError:
                pass
            except OSError as e:
                log.debug("no state directory %s: %s", path, e.strerror)
                return None
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            return None
        reason = unsafe_reason(before) if not created else None
        if reason is None:
            try:
                fd = os.open(path, _DIR_FLAGS)
            except OSError as e:
                reason = e.strerror
            else:
                if created:
                    os.fchmod(fd, STATE_MODE)  # the umask may have taken bits away
                after = os.fstat(fd)
                reason = unsafe_reason(after)
                if reason is None and (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
                    reason = "it was replaced while being opened"
                if reason is None:
                    return cls(path, fd, created)
                os.close(fd)
        hint = "remove it" if os.geteuid() == 0 else "remove it, or set XDG_RUNTIME_DIR to a dir of yours"
        raise QuietError(f"refusing the state directory {path}: {reason} ({hint})")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def discard(self) -> None:
        """Close, and remove the directory if this process made it and it is still empty."""
        self.close()
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    def write_pid(self, name: str, pid: int) -> None:
        """Write *pid* to *name*: a new temp file renamed into place, never through a symlink."""
        tmp = f".{name}.{pid}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.fd)  # left by a daemon that died with our pid
        fd = os.open(tmp, _NEW_FILE, 0o644, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{pid}\n")
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise

    def read_pid(self, name: str) -> int | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            try:
                return int(f.read(64).strip())
            except ValueError:
                return None

    def remove_pid(self, name: str, pid: int) -> None:
        """Remove *name* if it still holds *pid* (a later mount on the same point may own it now)."""
        if self.read_pid(name) == pid:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)

    def open_log(self, name: str) -> LogFile:
        """Open *name* for appending: made new (O_EXCL), or an earlier log of ours, never a symlink."""
        path = os.path.join(self.path, name)
        try:
            try:
                fd = os.open(name, _NEW_FILE | os.O_APPEND, 0o600, dir_fd=self.fd)
                return LogFile(fd, path, created=True, in_state_dir=True)
            except FileExistsError:
                fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=self.fd)
        except OSError as e:
            why = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
            raise QuietError(f"refusing the log file {path}: {why}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise QuietError(f"refusing the log file {path}: not a regular file of ours")
        return LogFile(fd, path, created=False, in_state_dir=True)


@dataclass
class LogFile:
    """A daemon's log, open as *fd*: *created* when this mount made it, *in_state_dir* when it is
    the default log beside the pidfile (rather than one the user named)."""

    fd: int
    path: str
    created: bool
    in_state_dir: bool = False

    @classmethod
    def open_user(cls, path: str) -> LogFile:
        """The log the user named with --log-file (a path the user gives is followed like any other)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            try:
                return cls(os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), path, created=True)
            except FileExistsError:
                fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as e:
            raise QuietError(f"log file {path!r}: {e.strerror}") from None
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise QuietError(f"log file {path!r}: Is a directory")
        return cls(fd, path, created=False)

    def tidy(self) -> None:
        """At exit: an empty log goes, when it is ours to remove (the default log, or one this
        mount made)."""
        if self.created or self.in_state_dir:
            self._unlink(only_if_empty=True)

    def discard(self) -> None:
        """After a failed mount: a default log this mount made goes, whatever it holds (the error
        reached the user); any other log as at exit."""
        if self.created and self.in_state_dir:
            self._unlink(only_if_empty=False)
        else:
            self.tidy()

    def _unlink(self, only_if_empty: bool) -> None:
        with contextlib.suppress(OSError):
            ours = os.fstat(self.fd)
            named = os.stat(self.path, follow_symlinks=False)
            if only_if_empty and ours.st_size != 0:
                return
            if (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino):
                os.unlink(self.path)
