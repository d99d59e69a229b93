"""The resident server: trio, pyfuse3 and the union already imported, a worker forked per mount.

A client (`unionfs.server.fastmount`) mounts FUSE itself and hands the server, over a unix socket
in the state directory (``server.sock``, beside the pidfiles; see `unionfs.server.statedir`), the
config and the /dev/fuse and branch fds.  The server checks the peer (its own user, or root) and the
client's build, forks a worker and goes back to accepting; the worker builds the union from the
fds, answers "ready" (or one "error: ..." line) and serves as a background daemon does, with its
pidfile and log in the state directory, until the kernel ends the session.

The accept loop is plain blocking sockets: trio runs only in the workers, each started after the
fork.  A worker keeps neither the listening socket nor the lock, and lives on when the server is
stopped or killed.  Two workers are forked ahead of the next mounts (the *spares*): each pays what a
fresh fork pays first (its copy-on-write faults, trio's first run in the process) while nothing
waits, and is handed a mount over a socket pair.  When that mount ends, the worker lets go of all of
it (the shim lets go of the branches, the state files and the pidfile's lock, which `unionfs umount`
waits for, as the session ends; then `daemon.serve` unwinds) and says so
on the pair: it is a spare again, the first in line, for up to ``UNIONFS_REUSE`` mounts in all
(default 50; 1: it exits with its mount).  One that finds anything of its mount still open, or whose
mount a signal ended, exits instead.  So a mount loop or a podman build's steps fork nothing: the
server forks a spare only while fewer than two are idle or serving (but one at least is idle).
A spare exits when the server does (its end of the pair closes); a worker serving a mount then
exits when the mount ends.  ``UNIONFS_SPARE=N`` keeps N (0: a worker forked per mount; at most 4).

The server reaps its workers, and exits by itself after ``--idle`` seconds without a mount handed
over (default ten minutes).

``python -m unionfs.server.resident start`` is what a client runs when it finds no server: it
returns once a server listens.
"""
from __future__ import annotations

import ast
import contextlib
import fcntl
import gc
import logging
import os
import pickle
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from unionfs.core.config import MountConfig, build_config
from unionfs.core.errors import QuietError

from . import statedir
from .fastmount import (
    MAX_FDS,
    SOCKET_NAME,
    build_id,
    command,
    connect,
    fusermount_options,
    kernel_options,
    message,
    mount_notes,
    root_mount_flags,
)
from .statedir import StateDir

log = logging.getLogger(__name__)

LOCK_NAME = "server.lock"
LOG_NAME = "server.log"
DEFAULT_IDLE = 600.0
CHECK_EVERY = 5.0       # seconds between checks that the socket is still ours
CLIENT_TIMEOUT = 30.0   # seconds a client may take between its messages (its mount is in between)
ARGV_HELLO = b"argv1\0"  # a C client's first message (fastclient.c)
SPARE_NAMES = ("unionfs-warming", "unionfs-spare")  # a spare's /proc/PID/comm: rehearsing, then ready
SPARE_READY = b"warm"          # what a spare says once it has rehearsed
MAX_SPARES = 4
DEFAULT_REUSE = 50   # mounts a worker serves in turn before it exits (UNIONFS_REUSE)


def config_from(fields: dict[str, Any]) -> MountConfig:
    """The `MountConfig` a client sent (`unionfs.server.fastmount.message`)."""
    return MountConfig.from_fields(fields)


class Server:
    """The listening socket in the state directory, held under an exclusive lock."""

    def __init__(self, state: StateDir, lock_fd: int, listener: socket.socket, idle: float) -> None:
        self.state = state
        self.lock_fd = lock_fd
        self.listener = listener
        self.idle = idle
        self.build = build_id()
        self.workers: set[int] = set()
        self.bound = (-1, -1)   # the socket file's (device, inode)
        self.handed = 0
        self.max_spares = _spares_wanted()
        self.spares: list[tuple[int, socket.socket]] = []   # their pids, our ends of their socket pairs
        self.busy: dict[int, socket.socket] = {}   # spares serving a mount, to come back for another
        self.reuse = _reuses_wanted()

    def serve_forever(self) -> None:
        """Accept until stopped (SIGTERM, SIGINT), idle for ``idle`` seconds, asked to give way to
        another build, or left without a way in (the socket or its directory removed)."""
        signal.signal(signal.SIGCHLD, lambda *_: self.reap())
        self.listener.settimeout(min(self.idle, CHECK_EVERY) if self.idle else CHECK_EVERY)
        log.info("listening (pid %d, build %s)", os.getpid(), self.build)
        last = time.monotonic()
        while True:
            self.fork_spares()
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if self.idle and time.monotonic() - last >= self.idle:
                    log.info("idle for %.0f s: exiting", self.idle)
                    return
                if not self.reachable():
                    log.info("the socket is gone: exiting")
                    return
                continue
            last = time.monotonic()
            with conn:
                conn.settimeout(CLIENT_TIMEOUT)
                if not self.take(conn):
                    return

    def reachable(self) -> bool:
        """Whether the socket we listen on is still the one in the state directory."""
        try:
            named = os.stat(SOCKET_NAME, dir_fd=self.state.fd, follow_symlinks=False)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == self.bound and os.fstat(self.state.fd).st_nlink > 0

    def take(self, conn: socket.socket) -> bool:
        """Serve one client's request; False when the server must give way."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid = (int.from_bytes(creds[i:i + 4], sys.byteorder) for i in (0, 4))
        if uid not in (os.geteuid(), 0):
            log.warning("refused pid %d of uid %d", pid, uid)
            return True
        hello = _receive(conn, pid)
        if hello is None:   # a client that only looked
            return True
        if hello[0].startswith(ARGV_HELLO):
            return self.take_argv(conn, pid, uid, hello[0], hello[1])
        if hello[0] != self.build.encode():
            log.info("pid %d runs another build: giving way", pid)
            self.close()    # before the answer: the client starts a server of its build next
            _send(conn, "refused: another build")
            return False
        _send(conn, "ok")
        request = _receive(conn, pid)
        if request is None:
            return True
        data, fds = request
        try:
            cfg = config_from(ast.literal_eval(data.decode()))
            if len(fds) != _fd_count(cfg):
                raise ValueError(f"{len(fds)} fds")
        except (ValueError, KeyError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            log.warning("pid %d: bad request: %s", pid, e)
            _send(conn, "refused: bad request")
            _close(fds)
            return True
        return self.start_worker(conn, pid, cfg, fds, "Python")

    def give_way(self, conn: socket.socket, pid: int) -> bool:
        """Stop serving (another build is installed): False, for `serve_forever` to return."""
        log.info("pid %d runs another build: giving way", pid)
        self.close()
        _send(conn, "refused: another build")
        return False

    def take_argv(self, conn: socket.socket, pid: int, uid: int, data: bytes, fds: list[int]) -> bool:
        """A client that is not Python (``unionfs/server/fastclient.c``): it sends its build (the
        directory of the Python console scripts it would fall back to), its command line and its
        working directory; the command line is parsed and checked here, exactly as the Python
        client does it, and the answer says what to open and how to mount (`plan`).  Then come the
        fds, as from the Python client.  Anything unusual is answered "fallback", and the client
        runs the Python command instead, which says any error in its own words."""
        fields = data.split(b"\0")
        if len(fields) < 3 or os.fsdecode(fields[1]) != _bin_dir():
            _close(fds)
            return self.give_way(conn, pid)
        prog, args = os.fsdecode(fields[2]), [os.fsdecode(a) for a in fields[3:]]
        try:
            planned = plan(pid, uid, prog, args, fds)
        finally:
            _close(fds)
        if planned is None:
            _send(conn, "fallback")
            return True
        cfg, answer = planned
        try:
            conn.send(answer)
        except OSError:
            return True
        # The check that this code is still the installed one (a stat of each module, 0.1-0.25 ms)
        # runs while the client opens the directories and mounts: one of another build unmounts
        # what it mounted and runs the Python command, which starts a server of its own.
        if build_id() != self.build:
            return self.give_way(conn, pid)
        # A warm spare takes the client now and gets ready while the client mounts; it receives
        # the fds itself.
        spare = self.hand_to_spare(conn, cfg, [])
        if spare is not None:
            self.handed_over(spare, pid, cfg, "C")
            return True
        request = _receive(conn, pid)
        if request is None:
            return True
        if request[0] != b"fds" or len(request[1]) != _fd_count(cfg):
            log.warning("pid %d: bad request: %d fds", pid, len(request[1]))
            _send(conn, "refused: bad request")
            _close(request[1])
            return True
        return self.start_worker(conn, pid, cfg, request[1], "C")

    def start_worker(self, conn: socket.socket, pid: int, cfg: MountConfig, fds: list[int], via: str) -> bool:
        """Hand *cfg* and *fds* (the FUSE fd first) to the spare, or fork a worker, to serve them and
        answer *conn*, the client (*via*: its language, for the log)."""
        worker = self.hand_to_spare(conn, cfg, fds)
        if worker is None:
            try:
                worker = os.fork()
            except OSError as e:
                log.warning("cannot fork a worker: %s", e.strerror)
                _send(conn, "refused: no worker")
                _close(fds)
                return True
            if worker == 0:
                self._worker(conn, cfg, fds)   # never returns
        _close(fds)
        self.handed_over(worker, pid, cfg, via)
        return True

    def handed_over(self, worker: int, pid: int, cfg: MountConfig, via: str) -> None:
        self.workers.add(worker)
        self.handed += 1
        log.info("mount %d for pid %d (%s client) on %s: worker %d",
                 self.handed, pid, via, cfg.mountpoint, worker)
        self.keep_log_small()

    def keep_log_small(self) -> None:
        """Once the state directory's server.log we write is over `statedir.LOG_LIMIT`, rename it
        to server.log.1 (replacing the one before) and go on in a new one: one fstat a mount."""
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.StreamHandler):
                continue
            stream = handler.stream
            try:
                ours = os.fstat(stream.fileno())
                if ours.st_size <= statedir.LOG_LIMIT:
                    continue
                named = os.stat(LOG_NAME, dir_fd=self.state.fd, follow_symlinks=False)
                if (named.st_dev, named.st_ino) != (ours.st_dev, ours.st_ino):
                    continue   # not the state directory's log (a server in the foreground)
                if not self.state.rotate(LOG_NAME):
                    continue
                new = self.state.open_log(LOG_NAME)
            except (OSError, QuietError):
                continue
            handler.setStream(new.text())
            os.close(new.fd)
            stream.close()

    def hand_to_spare(self, conn: socket.socket, cfg: MountConfig, fds: list[int]) -> int | None:
        """The pid of the spare that has the mount now, the first of those that are warm (the
        client's socket and the fds go with it); None when none is (a spare still warming up stays
        for a later mount: a fresh fork serves this one as soon).  A worker back from its last
        mount comes first: its memory is its own already."""
        self.collect_returned()
        for spare in list(self.spares):
            pid, ours = spare
            try:
                said = ours.recv(16, socket.MSG_DONTWAIT)   # read, not peeked: a close with unread
                # data would reset the connection, and the spare's read of the mount with it
            except BlockingIOError:
                continue
            except OSError:
                said = b""
            with contextlib.suppress(ValueError):   # (reaped meanwhile)
                self.spares.remove(spare)
            try:
                if said != SPARE_READY:
                    ours.close()
                    continue
                socket.send_fds(ours, [pickle.dumps(cfg)], [conn.fileno(), *fds])
            except OSError as e:
                log.debug("spare %d: %s", pid, e.strerror)
                ours.close()
                continue
            if self.reuse > 1:
                self.busy[pid] = ours
            else:
                ours.close()
            return pid
        return None

    def collect_returned(self) -> None:
        """Take back as spares, first in line, the workers whose mount has ended and that said so
        (`_spare`: peeked, `hand_to_spare` reads it); forget those that exited.  Spares beyond
        `max_spares` are let go (they exit)."""
        for pid, ours in list(self.busy.items()):
            try:
                said = ours.recv(16, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError:
                said = b""
            del self.busy[pid]
            if said == SPARE_READY:
                self.spares.insert(0, (pid, ours))
            else:
                ours.close()
        while len(self.spares) > max(self.max_spares, 1):
            self.spares.pop()[1].close()

    def fork_spares(self) -> None:
        """Fork workers for the next mounts until `max_spares` wait, counting those serving a mount
        that will come back to serve another (a mount loop then forks nothing): but one at least."""
        self.collect_returned()
        while len(self.spares) < self.max_spares and (
                not self.spares or len(self.spares) + len(self.busy) < self.max_spares):
            if not self.fork_spare():
                return

    def fork_spare(self) -> bool:
        """Fork a worker for a next mount; whether one was forked."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("cannot fork a spare worker: %s", e.strerror)
            ours.close()
            theirs.close()
            return False
        if pid == 0:
            ours.close()
            self._spare(theirs)   # never returns
        theirs.close()
        self.spares.append((pid, ours))
        return True

    def reap(self) -> None:
        """Collect every worker that has exited (the server has no other children)."""
        while True:
            try:
                done, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not done:
                return
            self.workers.discard(done)
            for spare in [s for s in self.spares if s[0] == done]:
                self.spares.remove(spare)
                spare[1].close()
            ours = self.busy.pop(done, None)
            if ours is not None:
                ours.close()
            log.debug("worker %d exited with %d", done, os.waitstatus_to_exitcode(status))

    def _leave(self) -> None:
        """What a worker does first: default signals, and none of the server's fds."""
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        self.listener.close()
        os.close(self.lock_fd)
        self.state.close()
        for _, ours in self.spares:
            ours.close()
        for ours in self.busy.values():
            ours.close()

    def _worker(self, conn: socket.socket, cfg: MountConfig, fds: list[int]) -> None:
        """The forked worker: serve *cfg* on the FUSE fd ``fds[0]`` as a background daemon would."""
        code = 1
        try:
            self._leave()
            code = _serve_worker(conn, cfg, fds)
        except BaseException as e:  # noqa: B036 - a forked worker reports, never raises past fork
            _send(conn, f"error: {e}")
        finally:
            os._exit(code)

    def _spare(self, sock: socket.socket) -> None:
        """The spare: warm up, wait for a mount (`hand_to_spare`), serve it as `_worker` does; then
        say so and wait for the next, up to `reuse` mounts in all.  Exit when the server closes its
        end first, after a mount a signal ended, or when the mount left anything open."""
        code = 1
        conn = None
        try:
            niced = _lower_priority()   # first: all of the warming up at the lowest priority
            self._leave()
            comm = _set_comm(SPARE_NAMES[0])
            from .rehearsal import rehearse

            try:
                failed = rehearse()
                if failed:
                    log.debug("spare %d: rehearsal: %s failed", os.getpid(), ", ".join(failed))
            except Exception as e:  # noqa: BLE001 - a rehearsal only saves time: serve all the same
                log.debug("spare %d: rehearsal: %s", os.getpid(), e)
            gc.collect()   # what the rehearsal left; then all that lives now is kept out of later
            gc.freeze()    # collections, as the server does after its imports
            if niced is not None:
                os.setpriority(os.PRIO_PROCESS, 0, niced)   # raises if it cannot: never serve niced
            root = logging.getLogger()
            handlers, level = root.handlers[:], root.level
            from . import daemon

            serving = os.getpriority(os.PRIO_PROCESS, 0)
            if niced is not None:   # its priority can be had back: a mount's end unwinds at the lowest
                daemon.unwind_nice = daemon.UNWIND_NICE
            for served in range(self.reuse):
                if niced is not None:   # (its last mount's end unwound at the lowest priority)
                    _set_priority(serving)   # raises if it cannot: never serve niced
                _set_comm(SPARE_NAMES[1])
                before = daemon._open_fds()
                sock.send(SPARE_READY)
                data, fds, _, _ = socket.recv_fds(sock, 1 << 16, MAX_FDS + 1)
                if not data or not fds:
                    _close(fds)
                    code = 0
                    return
                conn = socket.socket(fileno=fds[0])
                _set_comm(comm)
                code = _serve_worker(conn, pickle.loads(data), fds[1:], reuse=served + 1 < self.reuse)
                conn = None
                if code != 0 or daemon.last_end != "kernel" or served + 1 == self.reuse:
                    return
                root.handlers[:], root.level = handlers, level
                gc.collect()
                left = daemon._open_fds() - before
                if left:
                    log.debug("worker %d: fds %s left open by its mount: exiting", os.getpid(), sorted(left))
                    return
        except BaseException as e:  # noqa: B036 - a forked worker reports, never raises past fork
            if conn is not None:
                _send(conn, f"error: {e}")
        finally:
            os._exit(code)

    def close(self) -> None:
        """Stop listening and let go of the lock (again: nothing); the spares exit."""
        spares, self.spares = self.spares, []
        for _, ours in spares:
            ours.close()
        busy, self.busy = self.busy, {}
        for ours in busy.values():
            ours.close()
        if self.lock_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(SOCKET_NAME, dir_fd=self.state.fd)
        self.listener.close()
        os.close(self.lock_fd)
        self.lock_fd = -1
        self.state.close()


def _spares_wanted() -> int:
    """``UNIONFS_SPARE``: how many spares to keep (2 unless set; 0 to 4)."""
    try:
        return min(max(int(os.environ.get("UNIONFS_SPARE", "2")), 0), MAX_SPARES)
    except ValueError:
        return 2


def _reuses_wanted() -> int:
    """``UNIONFS_REUSE``: how many mounts a spare serves, one after another, before it exits (1: one
    mount, the process exits with it)."""
    try:
        return min(max(int(os.environ.get("UNIONFS_REUSE", str(DEFAULT_REUSE))), 1), 10_000)
    except ValueError:
        return DEFAULT_REUSE


def _lower_priority() -> int | None:
    """Rehearse at the lowest priority where the priority can be had back afterwards (root; a
    user whose RLIMIT_NICE allows it): the rehearsal then takes no CPU from the mounts being
    served.  The priority it had; None when it is left as it was."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_NICE)[0] < 20 - before:
        return None
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    return before


_PR_SET_NAME, _PR_GET_NAME = 15, 16


def _set_priority(value: int) -> None:
    """Every thread of this process at priority *value* (a nice value is a thread's: one started
    while the process unwound at the lowest, a trio worker thread say, would keep it)."""
    os.setpriority(os.PRIO_PROCESS, 0, value)
    for name in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):   # ended meanwhile
            os.setpriority(os.PRIO_PROCESS, int(name), value)


def _set_comm(name: str) -> str:
    """Name this process in /proc/PID/comm (what ps shows); the name it had.  prctl(2), one system
    call each way: a worker renames itself on each mount's path (two opens of /proc/self/comm took
    about 30 µs of it)."""
    import ctypes

    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        old = ctypes.create_string_buffer(16)
        if _libc.prctl(_PR_GET_NAME, old, 0, 0, 0) != 0:
            raise OSError("prctl")
        if _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
            raise OSError("prctl")
        return old.value.decode(errors="replace")
    except (OSError, AttributeError):
        return name


_libc: Any = None


def _bin_dir() -> str:
    """Where this interpreter's console scripts are (what a C client falls back to)."""
    return os.path.realpath(os.path.dirname(sys.executable))


def _same_view(pid: int) -> bool:
    """Whether *pid* sees the files as we do: same PID, user and mount namespaces, same root."""
    try:
        for ns in ("pid", "user", "mnt"):
            if os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino:
                return False
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def plan(pid: int, uid: int, prog: str, args: list[str], fds: list[int]) -> tuple[MountConfig, bytes] | None:
    """Parse and check a C client's command line in its working directory (``fds[0]``): the config
    and the answer (NUL-separated: "plan", mount point, fsname, mount(2) flags, the FUSE mount's
    options, fusermount3's options, the notes to print, the number of directories to open and
    their paths); None for the Python command to take it."""
    parsed = command(prog, args) if prog in ("unionfs", "unionfs-overlay") else None
    if parsed is None or len(fds) != 1 or uid != os.geteuid() or not _same_view(pid):
        return None
    if any(a.startswith("~") or "=~" in a for a in args):
        return None   # the caller's HOME, not ours
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(fds[0])
        cfg = build_config(*parsed)
        if len(cfg.branches) + 2 > MAX_FDS:
            return None
        fields = message(cfg)
    except (QuietError, OSError, ValueError) as e:
        log.debug("pid %d: %s: the Python command says it", pid, e)
        return None
    finally:
        os.fchdir(here)
        os.close(here)
    paths = [p for p, _ in cfg.branches] + ([cfg.workdir] if cfg.workdir is not None else [])
    words = ["plan", cfg.mountpoint, cfg.fsname, str(root_mount_flags(cfg)), ",".join(kernel_options(cfg)),
             ",".join(fusermount_options(cfg)), "\n".join(mount_notes(prog, cfg, parsed[3])), str(len(paths)),
             *paths]
    return config_from(fields), b"\0".join(os.fsencode(w) for w in words)


def _serve_worker(conn: socket.socket, cfg: MountConfig, fds: list[int], reuse: bool = False) -> int:
    """Serve *cfg* on the FUSE fd and branch fds *fds* from the client *conn*; with no *fds*, the
    client sends them here itself once it has mounted (`Server.take_argv`), and everything that
    does not need them (the state directory, the log, the session's set-up) is done meanwhile."""
    from unionfs.core.branches import LayerStack, stack_from_fds

    from .daemon import hold_stop_signals, serve_handed_over

    hold_stop_signals()   # the mount is there (or about to be): from here a SIGTERM must unmount it

    received = list(fds)

    def fds_now() -> list[int]:
        """The client's fds: the FUSE device's first (received now if they were not handed over)."""
        if not received:
            try:
                conn.settimeout(CLIENT_TIMEOUT)
                data, got, _, _ = socket.recv_fds(conn, 64, MAX_FDS)
            except OSError as e:
                raise QuietError(f"no mount from the client: {e.strerror or e}") from None
            finally:
                conn.close()
            if data != b"fds" or len(got) != _fd_count(cfg):
                _close(got)
                raise QuietError(f"bad request: {len(got)} fds")
            received.extend(got)
        return received

    def opener(branches: list[tuple[str, bool]]) -> LayerStack:
        """The stack over copies of the fds given: a retry read-only gets fresh ones."""
        given = fds_now()[1:]
        work_root = given[len(cfg.branches)] if cfg.workdir is not None else None
        opened = [(path, os.dup(fd), w) for (path, w), fd in zip(branches, given, strict=False)]
        work = os.dup(work_root) if work_root is not None else None
        stack = stack_from_fds(opened, work, cfg.workdir, cfg.style == "aufs")
        _close(given)
        del received[1:]   # closed (the FUSE device's stays)
        return stack

    conn.settimeout(None)   # blocking again: the reply is written to a plain fd
    reply = os.dup(conn.fileno())
    if received:
        conn.close()
    try:
        return serve_handed_over(cfg, reply, opener, lambda: fds_now()[0], reuse=reuse)
    finally:
        conn.close()


def _fd_count(cfg: MountConfig) -> int:
    """How many fds a client hands over for *cfg*: the FUSE device's, each branch's, the work dir's."""
    return 1 + len(cfg.branches) + (cfg.workdir is not None)


def _receive(conn: socket.socket, pid: int) -> tuple[bytes, list[int]] | None:
    """One message and the fds it carried; None at the end (the fds that came with it closed)."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS)
    except OSError as e:
        log.warning("pid %d: %s", pid, e.strerror)
        return None
    if not data:
        _close(fds)
        return None
    return data, fds


def _send(conn: socket.socket, msg: str) -> None:
    with contextlib.suppress(OSError):
        conn.send(os.fsencode(msg))


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def listening(idle: float) -> Iterator[Server | None]:
    """This user's server, listening; None when one runs already (the lock is held)."""
    state = StateDir.open(create=True)
    if state is None:
        raise QuietError("no state directory for the server's socket")
    lock_flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    lock_fd = os.open(LOCK_NAME, lock_flags, 0o600, dir_fd=state.fd)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        state.close()
        yield None
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SOCKET_NAME, dir_fd=state.fd)   # a stale one: the lock says no server has it
    listener.bind(f"/proc/self/fd/{state.fd}/{SOCKET_NAME}")   # in a 0700 directory
    listener.listen(64)
    server = Server(state, lock_fd, listener, idle)
    named = os.stat(SOCKET_NAME, dir_fd=state.fd, follow_symlinks=False)
    server.bound = (named.st_dev, named.st_ino)
    try:
        yield server
    finally:
        server.close()


def run(idle: float = DEFAULT_IDLE, foreground: bool = False) -> int:
    """Start this user's server: in the foreground, or in the background once it listens."""
    _warm_up()
    if foreground:
        return _serve_here(idle, None)
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        os.setsid()
        os.chdir("/")
        code = 1
        try:
            code = _serve_here(idle, w)
        finally:
            os._exit(code)
    os.close(w)
    said = os.read(r, 4096).decode(errors="replace")
    os.close(r)
    if said not in ("listening", "running"):
        print(f"unionfs server: {said or 'exited before listening'}", file=sys.stderr)
        return 1
    return 0


def _warm_up() -> None:
    """Do once here what every worker would do first: import what serving needs (`preload`, which
    also freezes what it loaded out of the garbage collector's scans, so that a worker's collections
    do not touch, and copy, the pages it shares with us), and run trio once (its first run sets up
    what later ones reuse), and import the spares' rehearsal (2.4 ms a spare otherwise)."""
    import trio

    from unionfs.core import union  # noqa: F401

    from .daemon import preload

    preload()
    from . import rehearsal  # noqa: F401 - after preload(): it imports most of what preload does
    trio.run(trio.sleep, 0)
    gc.collect()
    gc.freeze()


def _serve_here(idle: float, ready_fd: int | None) -> int:
    try:
        with listening(idle) as server:
            if ready_fd is not None:
                _detach(ready_fd, "listening" if server is not None else "running")
            if server is not None:
                signal.signal(signal.SIGTERM, _stop)
                with contextlib.suppress(KeyboardInterrupt):
                    server.serve_forever()
        return 0
    except (QuietError, OSError) as e:
        if ready_fd is None:
            raise
        os.write(ready_fd, str(e).encode())
        return 1


def _detach(ready_fd: int, msg: str) -> None:
    """Tell the starter and let go of its stdio; log to the state directory."""
    state = StateDir.open(create=True)
    if state is not None:
        from .daemon import _setup_logging

        if msg == "listening":   # the one server (it holds the lock)
            _tidy(state)
        _setup_logging(False, state.open_log(LOG_NAME))
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.INFO)   # the server's log records every mount handed over
        state.close()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.write(ready_fd, msg.encode())
    os.close(ready_fd)


def _tidy(state: StateDir) -> None:
    """At the server's start: its log, which has a line per mount, is kept under
    `statedir.LOG_LIMIT` (the one before is ``server.log.1``), and what daemons that are gone left
    in the state directory is cleared."""
    try:
        state.rotate(LOG_NAME)
        state.sweep()
    except OSError as e:
        log.debug("state directory not tidied: %s", e)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop(timeout: float = 10.0) -> bool:
    """Stop this user's server (its workers keep serving); whether one was running."""
    sock = connect(start=False)
    if sock is None:
        return False
    with sock:
        pid = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4], sys.byteorder)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if statedir.wait_for_exit(pid, timeout):
        return True
    raise QuietError(f"the server (pid {pid}) has not stopped after {timeout:.0f}s")


def main(argv: list[str]) -> int:
    """``python -m unionfs.server.resident start|stop``: what a client runs to start one."""
    try:
        if argv == ["start"]:
            return run()
        if argv == ["stop"]:
            stop()
            return 0
    except QuietError as e:
        print(f"unionfs server: {e.message}", file=sys.stderr)
        return 1
    print("usage: python -m unionfs.server.resident start|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["Server", "config_from", "listening", "run", "stop"]
