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
import gc
import logging
import os
import signal
from collections.abc import Sequence

from launcher import syscalls, timing

# The namespaces the launcher may have entered after the fork, in the order they must be joined:
# the user namespace first, which gives the rights to join the mount namespace it owns.
NAMESPACES = (("user", syscalls.CLONE_NEWUSER), ("mnt", syscalls.CLONE_NEWNS))


class ServerProcess:
    """A forked server child waiting for its order: ``serve()`` sends one, ``cancel()`` ends it.

    After ``serve()``, ``ready`` is the read end of the child's answer: ``ready``, ``error: ...``
    or EOF (it died) once the union is mounted or has failed.
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

    def serve(self, spec: str, mountpoint: str, options: str, logfile: str) -> None:
        """Order the child to mount the union *spec* at *mountpoint* and serve it, logging to *logfile*.

        Call from the process (and namespaces) the union is for; the strings may hold any
        character but NUL.  The server logs at the level the caller's root logger has (DEBUG
        under ``unionfs run -v``), as a child forked at this point would.
        """
        level = str(logging.getLogger().level)
        order = b"\0".join(os.fsencode(x) for x in (spec, mountpoint, options, logfile, level))
        try:
            os.write(self._order_w, order)  # a blocking pipe: all of it, as the child reads
        except BrokenPipeError:
            pass  # the child is gone (it could not import the server): its answer says why
        finally:
            os.close(self._order_w)

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

    It will not when the server is to be an exec'd command (``UNIONFS_RUN_SERVER``) or the union
    kernel overlayfs (``--backend overlay`` before ``--``, or ``UNIONFS_RUN_BACKEND=overlay``); for
    anything subtler (a usage error, ``--help``) the unused child simply ends with the launcher.
    """
    global _started
    if _started is not None or os.environ.get("UNIONFS_RUN_SERVER"):
        return
    options = list(argv[: argv.index("--")] if "--" in argv else argv)
    backend = os.environ.get("UNIONFS_RUN_BACKEND", "fuse")
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
        # unionfs.server.operations first: it loads the core's libfuse shim, which must precede pyfuse3.
        # These imports are the launch's critical path.  Cyclic-GC passes over the modules'
        # objects, which live as long as the server, cost them ~10% and free nothing; so the
        # GC is off while they load, and freezing them afterwards (gc.freeze: never scanned
        # again) keeps the first collection after them from scanning them all at once.
        gc.disable()
        import unionfs.server.operations  # noqa: F401
        from unionfs.core.config import build_config
        from unionfs.server.daemon import serve

        gc.freeze()
        gc.enable()
        timing.stamp("server-imported")

        order = b""
        while chunk := os.read(order_r, 65536):
            order += chunk
        os.close(order_r)
        if not order:  # the launcher needs no FUSE server, or is gone
            os._exit(0)
        spec, mountpoint, options, logfile, level = (os.fsdecode(x) for x in order.split(b"\0"))
        timing.stamp("server-ordered")
        _join_namespaces(parent)
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        handler = logging.FileHandler(logfile)  # a file handler survives serve() detaching stdio
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(int(level))
        for record in held.records:
            handler.handle(record)
        code = serve(build_config(spec, mountpoint, [options]), ready_w)
    except BaseException as exc:  # noqa: B036 - a forked child reports and exits, whatever happened
        if isinstance(exc, OSError):
            from launcher.supervisor import describe

            message = describe(exc)
        else:
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        try:
            os.write(ready_w, f"error: {message}".encode(errors="replace"))
        except OSError:
            pass
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
