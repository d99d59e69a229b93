"""The daemon's state directory: its pidfile and its default log, keyed by the mount point.

The directory is /run/unionfs for root, ``$XDG_RUNTIME_DIR/unionfs``, or else ``/tmp/unionfs-<uid>``.
Anyone can make a name in /tmp first, so a state directory is used only when it is a real directory
(not a symlink), owned by us and of mode 0700 exactly; anything else is refused in one line.  Once
checked it is held open, and every state file is made relative to that fd with ``O_NOFOLLOW``: new
files with ``O_EXCL``, and a pidfile that replaces an old one is written to a temp name and renamed
into place.

A pidfile is one line, ``PID START PIDNS``: the daemon's pid, its start time (``/proc/PID/stat``'s
22nd field, clock ticks since boot) and the inode of its PID namespace.  A pid alone names the daemon
only while it lives and only in its own PID namespace: a daemon killed with SIGKILL, or with the
PID namespace it ran in, leaves a pidfile whose pid is another process's by the time it is read
(pid 6 in a namespace is a kernel thread on the host).  A reader (`StateDir.daemon`, the C client's
``daemon_pidfd``) takes the pid only when it is in the reader's PID namespace and the process of that
pid (held by a pidfd, found in /proc through its fdinfo) started when the daemon did; anything else
(an old bare pid too) names no daemon to wait for.  A daemon holds its pidfile locked (``flock``)
from before it is in place until it has let go of the mount (the union's files and directories, pidfile and
control socket); the C client's `unionfs umount` waits for that lock rather than for the process's
exit.  A log is held in use (``flock``, shared) by each daemon writing to it: the one that tidies
an empty log away at its end does it only while no other holds it (a later mount on the same point
may have opened it before this one's end was done), and one that opens a log a tidy has just
removed opens it anew.
What such daemons leave, `StateDir.sweep` removes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import select
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from unionfs.core.errors import QuietError

log = logging.getLogger(__name__)

STATE_MODE = 0o700
#: A mount's control socket is its key and this (see `unionfs.server.control`).
CONTROL_SUFFIX = ".ctl"
#: The largest control request or reply.
CONTROL_MAX = 1 << 17
#: How old a state file must be before a sweep may take it for one a gone daemon left: a daemon
#: makes its log, its pidfile and its control socket within a second or so of each other.
SWEEP_GRACE = 60.0
REHEARSAL_PREFIX = "rehearsal-"   # what a spare worker makes and removes (server/rehearsal.py)
#: How often the daemons sweep their state directory (the last time is ``.swept``'s mtime).
SWEEP_EVERY = 600.0
SWEPT = ".swept"
#: The size past which a long-lived log (the resident server's) is renamed to ``NAME.1``.
LOG_LIMIT = 1 << 20
_KEY_SUFFIXES = (".pid", CONTROL_SUFFIX, ".log")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OLD_LOG = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def state_dir() -> str:
    if os.geteuid() == 0:
        return "/run/unionfs"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base):
        return os.path.join(base, "unionfs")
    return f"/tmp/unionfs-{os.getuid()}"


@dataclass(frozen=True)
class PidRecord:
    """What a pidfile says: a process and the PID namespace its pid is a number in."""

    pid: int
    start: int
    pidns: int

    def line(self) -> str:
        return f"{self.pid} {self.start} {self.pidns}\n"

    @classmethod
    def parse(cls, data: bytes) -> PidRecord | None:
        """The record in *data*: three fields of ASCII digits (at most 19 each: the C client reads
        the same), the pid not 0; None for anything else (an old pidfile's bare pid too)."""
        fields = data.split()
        if len(fields) != 3 or not all(0 < len(f) <= 19 and f.isdigit() for f in fields):
            return None
        pid, start, pidns = (int(f) for f in fields)
        return cls(pid, start, pidns) if 0 < pid < 1 << 31 else None

    @classmethod
    def of(cls, pid: int) -> PidRecord | None:
        """The record of the process *pid* of this PID namespace (None: gone, or no /proc); this
        process's is read through /proc/self (in a PID namespace of its own, /proc may be the
        host's, where its pid is another process's)."""
        global _own_record
        own = pid == os.getpid()
        if own and _own_record is not None and _own_record.pid == pid:
            return _own_record   # (a reused worker writes a pidfile per mount: same process, same record)
        found = _proc_stat("self" if own else str(pid))
        pidns = pid_namespace()
        record = None if found is None or pidns is None else cls(pid, found[1], pidns)
        if own and record is not None:
            _own_record = record
        return record

    def state(self) -> str:
        """``running``; ``zombie`` (exited, not reaped: it holds nothing, and its pidfd says it
        exited); ``gone``; or ``unknown``: a pid of another PID namespace, or of this one that /proc
        (another namespace's) does not show.  The process is the one a pidfd holds, so a pid reused
        while it is looked at is not taken for it."""
        if self.pidns != pid_namespace():
            return "unknown"
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return "gone"
        except OSError:
            held: tuple[bytes, int] | str = _proc_stat(str(self.pid)) or "gone"   # no pidfds
        else:
            try:
                held = _held(fd)
            finally:
                os.close(fd)
        if isinstance(held, str):
            return held
        if held[1] != self.start:
            return "gone"
        return "zombie" if held[0] == b"Z" else "running"


_own_record: PidRecord | None = None   # this process's (its start time and PID namespace never change)


def start_time(pid: int) -> int | None:
    """When process *pid* started (clock ticks since boot), as /proc tells it; None when gone."""
    found = _proc_stat(str(pid))
    return found[1] if found is not None else None


def _proc_stat(pid: str) -> tuple[bytes, int] | None:
    """The state letter and the start time of process *pid* (or ``self``); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _held(pidfd: int) -> tuple[bytes, int] | str:
    """`_proc_stat` of the process *pidfd* holds, through the pid /proc gives it (its fdinfo), or
    ``gone`` (it exited) or ``unknown`` (/proc does not show it: another PID namespace's /proc)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            pid = next((int(line.split()[1]) for line in f if line.startswith(b"Pid:")), 0)
    except (OSError, IndexError, ValueError):
        return "unknown"
    if pid == 0:
        return "unknown"
    return "gone" if pid < 0 else _proc_stat(str(pid)) or "gone"


def pid_namespace() -> int | None:
    """The inode of this process's PID namespace (None without /proc)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def wait_released(fd: int, timeout: float) -> bool:
    """Whether the daemon holding the pidfile open as *fd* locked (`StateDir.locked_pidfile`) has
    let go of the lock within *timeout* seconds: it had let go of everything else before."""
    deadline = time.monotonic() + timeout
    while _held_elsewhere(fd):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def _held_elsewhere(fd: int) -> bool:
    """Whether another open file holds *fd*'s file locked (``flock``, exclusive): a shared lock is
    tried without waiting (had, it lasts until *fd* is closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


def wait_for_exit(pid: int, timeout: float, start: int | None = None) -> bool:
    """Whether the process *pid* (a daemon or server named by a pidfile or a socket's peer) has exited
    within *timeout* seconds: gone, or a zombie its parent has not reaped yet.  With *start* (its
    `start_time`), a process of that pid that started at another time is another: ours has exited.

    Woken by the kernel at the exit (a pidfd is readable from then on, zombie or not); where there
    are no pidfds, by looking every 10 ms."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return _poll_for_exit(pid, timeout, start)
    try:
        if start is not None:   # checked while the pidfd holds the pid
            held = _held(fd)
            if held == "gone" or not isinstance(held, str) and held[1] != start:
                return True
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        return bool(waiter.poll(max(0, math.ceil(timeout * 1000))))
    finally:
        os.close(fd)


def _poll_for_exit(pid: int, timeout: float, start: int | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if start is not None and start_time(pid) != start:
            return True
        if _is_zombie(pid):
            return True
        time.sleep(0.01)
    return False


def _is_zombie(pid: int) -> bool:
    found = _proc_stat(str(pid))
    return found is None or found[0] == b"Z"


def pid_name(mountpoint: str, resolved: bool = False) -> str:
    """The pidfile's name for the daemon of *mountpoint* (see `key_for`)."""
    return f"{key_for(mountpoint, resolved)}.pid"


def key_for(mountpoint: str, resolved: bool = False) -> str:
    """The file name stem for *mountpoint* (any bytes: a str as os.fsdecode gives it); *resolved*
    when it is a real path already (and may not be looked at: mounted, and served by this thread)."""
    import hashlib  # (not on the resident server's client's path)

    real = mountpoint if resolved else os.path.realpath(mountpoint)
    return hashlib.sha1(os.fsencode(real)).hexdigest()[:16]


def _is_key(stem: str) -> bool:
    return len(stem) == 16 and all(c in "0123456789abcdef" for c in stem)


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

    def write_pid(self, name: str, pid: int, hold: bool = False) -> int | None:
        """Write the record of the live process *pid* to *name*: a new temp file renamed into place,
        never through a symlink.  With *hold*, the file is locked (``flock``, exclusive) before it
        is renamed into place and its fd returned, to be closed once the daemon has let go of all it
        held: a reader that finds the pidfile locked can wait for that (the C client's `unionfs
        umount` does).
        Raises `OSError` when there is no record to write (no /proc)."""
        record = PidRecord.of(pid)
        if record is None:
            raise OSError(errno.ESRCH, f"no start time or PID namespace of pid {pid} in /proc")
        tmp = f".{name}.{pid}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.fd)  # left by a daemon that died with our pid
        fd = os.open(tmp, _NEW_FILE, 0o644, dir_fd=self.fd)
        try:
            os.write(fd, record.line().encode())
            if hold:
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        if hold:
            return fd
        os.close(fd)
        return None

    def read_record(self, name: str) -> PidRecord | None:
        """What the pidfile *name* says, checked against nothing (see `daemon`)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return PidRecord.parse(f.read(64))

    def daemon(self, name: str) -> PidRecord | None:
        """The daemon the pidfile *name* names when it is a process of this PID namespace that has
        not been reaped; None when there is none (no pidfile, or one its daemon left behind)."""
        record = self.read_record(name)
        return record if record is not None and record.state() in ("running", "zombie") else None

    def locked_pidfile(self, name: str) -> int | None:
        """An fd of the pidfile *name* while its daemon holds it locked (`write_pid`), for
        `wait_released`; None when it is not locked (an older daemon's) or not there."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None
        with contextlib.suppress(OSError):
            if _held_elsewhere(fd):
                return fd
        os.close(fd)
        return None

    def remove_pid(self, name: str, pid: int, held: int | None = None) -> None:
        """Remove *name* if it still names *pid* of this PID namespace (a later mount on the same
        point may own it now): with *held*, the fd `write_pid` returned, if it is still that file."""
        if held is not None:
            with contextlib.suppress(OSError):
                ours = os.fstat(held)
                self.remove_if(name, (ours.st_dev, ours.st_ino))
            return
        record = self.read_record(name)
        if record is not None and record.pid == pid and record.pidns == pid_namespace():
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)

    def remove_if(self, name: str, ident: tuple[int, int]) -> None:
        """Remove *name* while it is still the file *ident* (st_dev, st_ino): a later mount on the
        same point may have made its own by now."""
        with contextlib.suppress(OSError):
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(name, dir_fd=self.fd)

    def sweep(self) -> list[str]:
        """Remove what daemons that are gone left (killed with SIGKILL, or with their PID namespace);
        the names removed.

        A mount's pidfile goes when the process it names is gone or a zombie (`PidRecord.state`),
        or, when that cannot be told (another PID namespace's pid, an old bare pid), when it is
        older than `SWEEP_GRACE` and nothing listens on the mount's control socket; with it, a
        control socket nothing listens on and an empty log, each older than `SWEEP_GRACE` (a daemon
        being set up makes them shortly before its pidfile).  A log with something in it stays.
        """
        removed = []
        now = time.time()
        names = os.listdir(self.fd)
        keys = {n[:-4] for n in names if n.endswith(_KEY_SUFFIXES) and _is_key(n[:-4])}
        for key in sorted(keys):
            pid, ctl, log_ = key + ".pid", key + CONTROL_SUFFIX, key + ".log"
            found = {n: st for n in (pid, ctl, log_) if (st := self._lstat(n)) is not None}
            stale = {n for n, st in found.items() if now - st.st_mtime > SWEEP_GRACE}
            if ctl in stale and (not stat.S_ISSOCK(found[ctl].st_mode) or self._listening(ctl)):
                stale.discard(ctl)
            if pid in found:
                record = self.read_record(pid)
                state = record.state() if record is not None else "unknown"
                if state == "running":
                    continue
                if state == "unknown" and (pid not in stale or ctl not in stale and ctl in found):
                    continue
                stale.add(pid)
            if log_ in stale and found[log_].st_size != 0:
                stale.discard(log_)
            for name in sorted(stale):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)
                    removed.append(name)
        for name in sorted(n for n in names if n.startswith(REHEARSAL_PREFIX)):
            st = self._lstat(name)   # a spare worker's throwaways (server/rehearsal.py), left if killed
            if st is None or now - st.st_mtime <= SWEEP_GRACE:
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=self.fd)
                else:
                    os.unlink(name, dir_fd=self.fd)
                removed.append(name)
        return removed

    def sweep_due(self) -> bool:
        """Whether the last `sweep` was `SWEEP_EVERY` ago (or never was)."""
        try:
            last = os.stat(SWEPT, dir_fd=self.fd, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            last = 0.0
        return not 0 <= time.time() - last < SWEEP_EVERY

    def sweep_now_and_then(self) -> list[str]:
        """`sweep`, when it is due (`sweep_due`): what a daemon does once mounted."""
        if not self.sweep_due():
            return []
        fd = os.open(SWEPT, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        try:
            os.utime(fd)
        finally:
            os.close(fd)
        return self.sweep()

    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return None

    def _listening(self, name: str) -> bool:
        """Whether a process listens on the socket *name* (a daemon that is gone listens no more)."""
        import socket  # (not on `unionfs umount`'s path)

        kind = socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(f"/proc/self/fd/{self.fd}/{name}")
            except BlockingIOError:
                return True    # its backlog is full
            except OSError:
                return False
        return True

    def rotate(self, name: str, limit: int = LOG_LIMIT) -> bool:
        """Rename the log *name* to *name*.1, replacing an older one, when it is a regular file of
        ours of more than *limit* bytes; whether it was."""
        st = self._lstat(name)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size <= limit:
            return False
        os.replace(name, name + ".1", src_dir_fd=self.fd, dst_dir_fd=self.fd)
        return True

    def open_log(self, name: str) -> LogFile:
        """Open *name* for appending: made new (O_EXCL), or an earlier log of ours, never a symlink;
        held in use (see the module's text)."""
        path = os.path.join(self.path, name)
        try:
            fd, created = _open_in_use(lambda: os.open(name, _NEW_FILE | os.O_APPEND, 0o600, dir_fd=self.fd),
                                       lambda: os.open(name, _OLD_LOG, dir_fd=self.fd))
        except OSError as e:
            why = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
            raise QuietError(f"refusing the log file {path}: {why}") from None
        if created:
            return LogFile(fd, path, created=True, in_state_dir=True)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise QuietError(f"refusing the log file {path}: not a regular file of ours")
        with contextlib.suppress(OSError):
            os.utime(fd)   # in use again: not for a `sweep` to take while its pidfile is not written yet
        return LogFile(fd, path, created=False, in_state_dir=True)


_LOG_TRIES = 3
_LOG_WAIT = 1.0   # seconds: a tidy holds a log exclusively for two system calls


def _open_in_use(new: Callable[[], int], old: Callable[[], int]) -> tuple[int, bool]:
    """A log opened and held in use (`_hold_in_use`): made by *new* (O_EXCL; FileExistsError when
    there is one), else the one there opened by *old*, made anew when a tidy removed it meanwhile.
    The fd, and whether it was made.  OSError as *new* and *old* raise it; one of ENOENT when the
    log was removed at each of `_LOG_TRIES` tries."""
    for _ in range(_LOG_TRIES):
        try:
            fd = new()
            _hold_in_use(fd)
            return fd, True
        except FileExistsError:
            fd = old()
        if _hold_in_use(fd):
            return fd, False
        os.close(fd)   # an empty log another daemon tidied away just now: made anew
    raise OSError(errno.ENOENT, "removed each time it was opened")


def _hold_in_use(fd: int) -> bool:
    """Hold the log *fd* in use (``flock``, shared), waiting out a tidy that holds it for a moment;
    whether it is still linked (False: that tidy removed it).  Where locks fail: True, unheld."""
    deadline = time.monotonic() + _LOG_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.0002)
        except OSError:
            break
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError:
        return True


@dataclass
class LogFile:
    """A daemon's log, open as *fd*: *created* when this mount made it, *in_state_dir* when it is
    the default log beside the pidfile (rather than one the user named)."""

    fd: int
    path: str
    created: bool
    in_state_dir: bool = False

    def text(self) -> TextIO:
        """A line-buffered text stream appending to the log, on an fd of its own."""
        return open(os.dup(self.fd), "a", buffering=1, encoding="utf-8", errors="backslashreplace")

    @classmethod
    def open_user(cls, path: str) -> LogFile:
        """The log the user named with --log-file (a path the user gives is followed like any other)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd, created = _open_in_use(lambda: os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644),
                                       lambda: os.open(path, flags | os.O_NONBLOCK))
        except OSError as e:
            raise QuietError(f"log file {path!r}: {e.strerror}") from None
        if created:
            return cls(fd, path, created=True)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise QuietError(f"log file {path!r}: Is a directory")
        return cls(fd, path, created=False)

    def tidy(self) -> None:
        """At exit: an empty log goes, when it is ours to remove (the default log, or one this
        mount made).  Lines logged after the shim removed it empty at the session's end (see
        `unionfs.server.daemon._let_go_at_session_end`) are appended to the log of its name."""
        if self.created or self.in_state_dir:
            self._unlink(only_if_empty=True)
        if self.in_state_dir:
            self._salvage()

    def _salvage(self) -> None:
        with contextlib.suppress(OSError):
            st = os.fstat(self.fd)
            if st.st_nlink != 0 or st.st_size == 0:
                return
            with open(f"/proc/self/fd/{self.fd}", "rb") as f:
                lines = f.read()
            fd = os.open(self.path, _OLD_LOG | os.O_CREAT, 0o600)
            try:
                os.write(fd, lines)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """After a failed mount: a default log this mount made goes, whatever it holds (the error
        reached the user); any other log as at exit."""
        if self.created and self.in_state_dir:
            self._unlink(only_if_empty=False)
        else:
            self.tidy()

    def _unlink(self, only_if_empty: bool) -> None:
        # Only while no other daemon holds it in use; held in use again (shared) when it stays.
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:   # (the failed attempt may have given up the shared lock)
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError:
            pass   # no locks here (or none on this fd): as before there were any
        try:
            ours = os.fstat(self.fd)
            named = os.stat(self.path, follow_symlinks=False)
            if only_if_empty and ours.st_size != 0:
                return
            if (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
