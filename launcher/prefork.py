"""The union's FUSE server, forked before the launcher has done anything else.

The server's imports (trio, pyfuse3 and the union's modules: about 100 ms) take longer than the
whole of the launcher's own start-up (click, option parsing, namespaces, the init layer: about
50 ms), and the two are independent.  So the entry points call ``start()`` first thing: it forks a
child that imports the server's modules at once, on another core, while the launcher starts; the
child then waits for its order.  ``FuseUnion`` takes that child with ``take()`` and sends it the
union to serve; a launcher that needs no FUSE server (kernel overlayfs, a usage error, ``--help``)
never sends one, and the child exits when the launcher does.

The launcher enters its private mount namespace (and its user namespace when rootless) after this
fork, so the child joins them (setns) before it serves: it then runs where a server forked at
mount time would, and the union it mounts is the launcher's alone.

From its first instruction the child is in a session of its own (the terminal's Ctrl-C is for the
command) and dies with the launcher (PR_SET_PDEATHSIG); before its order it holds nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from launcher import syscalls, timing

if TYPE_CHECKING:
    from unionfs.core.config import MountConfig

# The namespaces the launcher may have entered after the fork, in the order they must be joined:
# the user namespace first, which gives the rights to join the mount namespace it owns.
NAMESPACES = (("user", syscalls.CLONE_NEWUSER), ("mnt", syscalls.CLONE_NEWNS))


class ServerProcess:
    """A forked server child waiting for its order: ``serve()`` sends one, ``cancel()`` ends it.

    After ``serve()``, ``wait_ready()`` returns once the union is mounted, or raises the
    ``QuietError`` the child answered (or that it died).
    """

    def __init__(self) -> None:
        parent = os.getpid()
        order_r, self._order_w = os.pipe()
        self.ready, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._order_w)
            os.close(self.ready)
            _child(parent, order_r, ready_w)
        os.close(order_r)
        os.close(ready_w)

    def serve(self, config: MountConfig, logfile: str) -> None:
        """Order the child to serve *config*, logging to *logfile*.

        Call from the process (and namespaces) the union is for.  The server logs at the level
        the caller's root logger has (DEBUG under ``unionfs run --verbose``), as a child forked
        at this point would.
        """
        from unionfs.server import protocol

        order = protocol.Order(config, logfile, logging.getLogger().level)
        protocol.send_order(self._order_w, order)

    def wait_ready(self) -> None:
        """Wait for the child's answer to ``serve()``: see ``unionfs.server.protocol.wait_ready``."""
        from unionfs.server import protocol

        protocol.wait_ready(self.ready)

    def cancel(self) -> None:
        """End a child that has had no order (it holds no mount yet) and reap it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self._order_w)
        os.close(self.ready)
        os.waitpid(self.pid, 0)


_started: ServerProcess | None = None


def start(argv: Sequence[str]) -> None:
    """Fork the server child now, unless the command line *argv* (``unionfs run``'s own) will not need it.

    It will not when the union is kernel overlayfs (``--backend overlay`` before ``--``); for
    anything subtler (a usage error, ``--help``) the unused child simply ends with the launcher.
    """
    global _started
    if _started is not None:
        return
    options = list(argv[: argv.index("--")] if "--" in argv else argv)
    backend = "fuse"
    for i, arg in enumerate(options):
        if arg == "--backend" and i + 1 < len(options):
            backend = options[i + 1]
        elif arg.startswith("--backend="):
            backend = arg.removeprefix("--backend=")
    if backend == "fuse":
        _started = ServerProcess()


def discard() -> None:
    """End the child forked by ``start()``, if any: this launcher needs no FUSE server."""
    global _started
    if _started is not None:
        _started.cancel()
        _started = None


def take() -> ServerProcess:
    """The child forked by ``start()``, or one forked now (library callers of ``supervisor.run``)."""
    global _started
    server, _started = _started, None
    return server if server is not None else ServerProcess()


def _child(parent: int, order_r: int, ready_w: int) -> None:
    """The server: import, wait for the order, join the launcher's namespaces, serve.  Never returns."""
    code = 1
    ready = False

    def on_ready() -> None:
        nonlocal ready
        ready = True

    timing.stamp("server-forked")
    try:
        syscalls.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)
        os.setsid()  # the terminal's Ctrl-C is for the command, not for the server
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if timing.ENABLED else (0, 1, 2):  # until the log file exists
            os.dup2(null, fd)
        os.close(null)
        held = _HeldRecords()  # what the imports log (a missing shim, say) waits for the log file
        logging.getLogger().handlers[:] = [held]
        from unionfs.server import daemon, protocol

        daemon.preload()  # the launch's critical path
        timing.stamp("server-imported")

        order = protocol.read_order(order_r)
        if order is None:  # the launcher needs no FUSE server, or is gone
            os._exit(0)
        timing.stamp("server-ordered")
        _join_namespaces(parent)
        assert order.log_file is not None
        fd = os.open(order.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        handler = logging.FileHandler(order.log_file)  # a file handler survives serve() detaching stdio
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(order.log_level)
        for record in held.records:
            handler.handle(record)
        code = daemon.serve(order.config, ready_w, on_ready=on_ready)
    except BaseException as exc:  # noqa: B036 - a forked child reports and exits, whatever happened
        if not ready:  # once ready, ready_w is closed (and its number may be another file's)
            from unionfs.server import protocol

            protocol.report_error(ready_w, exc)
    finally:
        os._exit(code)


class _HeldRecords(logging.Handler):
    """Keeps the log records it is given, to be written once the log file is known."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _join_namespaces(parent: int) -> None:
    """setns into each of the launcher's namespaces that this process is not in yet.

    The kernel lets only a single-threaded process join a user or mount namespace: the
    server's modules must not start threads when imported.
    """
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise OSError(errno.EINVAL, f"setns needs a single-threaded server, not {threads} threads in",
                      "/proc/self/task")
    fds: list[tuple[int, int, str]] = []
    try:
        for name, flag in NAMESPACES:  # open all first: /proc may look different once inside
            path = f"/proc/{parent}/ns/{name}"
            theirs, ours = os.stat(path), os.stat(f"/proc/self/ns/{name}")
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag, path))
        for fd, flag, path in fds:
            syscalls.setns(fd, flag, path)
    finally:
        for fd, _, _ in fds:
            os.close(fd)
