"""The life of a mount: open the branches, mount, serve until unmounted, clean up in order.

`mount()` returns once the kernel has the mount and a daemon serves it (or serves in the foreground).
`umount()` unmounts and waits for that daemon to exit.  The daemon records its pid in a small file
keyed by the mount point, in a state directory that `unionfs.server.statedir` checks before use.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import gc
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from unionfs.core import mountinfo, sysx
from unionfs.core.config import MountConfig
from unionfs.core.errors import QuietError

from . import protocol, statedir
from .statedir import LogFile, StateDir

if TYPE_CHECKING:
    import socket

    from unionfs.core.branches import LayerStack

    from . import control
    from .operations import Operations

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_WAIT = 1.0   # seconds a stop signal may wait for INIT to be answered
last_end = ""     # how `serve` last ended: "kernel" (unmounted), "signal", "" (an error, or serving)
_stopped: list[int] = []   # stop signals that came before the session loop's handlers took over
GC_YOUNG = 10_000   # allocations between collections of the youngest generation while serving


def pidfile_for(mountpoint: str) -> str:
    """Where the daemon serving *mountpoint* records its pid (see `unionfs.server.statedir`)."""
    return os.path.join(statedir.state_dir(), _pid_name(mountpoint))


_pid_name = statedir.pid_name


def check_fuse_device() -> None:
    """Fail early, in one line, when this process cannot use /dev/fuse."""
    if not os.path.exists(FUSE_DEVICE):
        raise QuietError(f"{FUSE_DEVICE} does not exist: load the fuse module (modprobe fuse)")
    if os.geteuid() != 0:
        return  # fusermount3 (setuid) opens the device for unprivileged users
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise QuietError(
            f"cannot open {FUSE_DEVICE}: {e.strerror}; fix: chmod 666 {FUSE_DEVICE} "
            "(as Debian's udev rules ship it)") from None
    os.close(fd)


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = {f"fsname={cfg.fsname}", "subtype=unionfs", "default_permissions"}
    if cfg.allow_other or os.geteuid() == 0:
        opts.add("allow_other")
    if not cfg.writable:
        opts.add("ro")
    opts.update(cfg.flags)
    return opts


def _mount_at(mountpoint: str | bytes) -> tuple[str, str] | None:
    """(device, type) of the topmost mount at *mountpoint* (as given: nothing is resolved here)."""
    found = mountinfo.mount_at(mountpoint)
    return (found.dev, found.fstype) if found else None


def mount_type(mountpoint: str) -> str | None:
    found = _mount_at(os.path.realpath(mountpoint))
    return found[1] if found else None


def mount(cfg: MountConfig, foreground: bool = False, debug: bool = False,
          log_file: str | None = None) -> int:
    """Mount *cfg*; return an exit status.  In the background, return once the mount is ready.

    A mount that fails leaves nothing behind: no state directory, pidfile or log it made.
    """
    check_fuse_device()
    if foreground:
        log_ = LogFile.open_user(log_file) if log_file is not None else None
        _setup_logging(debug, log_)
        try:
            return serve(cfg, None, debug)
        finally:
            if log_ is not None:
                log_.tidy()
    # The daemon's own log (warnings, and any unexpected error with its traceback) lives next to
    # its pidfile by default, so a background mount never loses one.
    state = StateDir.open(create=True)
    try:
        if log_file is not None:
            log_ = LogFile.open_user(log_file)
        else:
            log_ = state.open_log(_log_name(cfg.mountpoint)) if state else None
    except BaseException:
        if state is not None:
            state.discard()
        raise
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        if state is not None:
            state.close()
        code = 1
        try:
            code = _daemon(cfg, w, debug, log_)
        finally:
            os._exit(code)
    os.close(w)
    if log_ is not None:
        os.close(log_.fd)
    try:
        protocol.wait_ready(r)
    except QuietError:
        os.waitpid(pid, 0)
        if state is not None:
            state.discard()
        raise
    if state is not None:
        state.close()
    return 0


def _daemon(cfg: MountConfig, ready_fd: int, debug: bool, log_: LogFile | None, **serve_args: Any) -> int:
    """A background daemon's life, in the child forked for it: its exit status.  What goes wrong
    before the mount is ready goes to *ready_fd* as one "error: ..." line.  With ``reuse=True``
    (a resident server's worker that may serve another mount next) it returns once the session
    has ended, its log closed, rather than exiting."""
    code = 1
    ready = False

    def on_ready() -> None:
        nonlocal ready
        ready = True

    try:
        if os.getsid(0) != os.getpid():   # (a worker's second mount: its own session already)
            os.setsid()
        _setup_logging(debug, log_)
        os.chdir("/")   # the directory it was started from must not stay busy (paths are absolute)
        def at_exit() -> None:
            if log_ is not None:
                log_.tidy()
            if serve_args.get("reuse"):
                _close_log(log_)

        code = serve(cfg, ready_fd, debug, on_ready=on_ready, at_exit=at_exit, log_file=log_, **serve_args)
    except BaseException as e:  # noqa: B036 - the daemon must report, never raise past fork
        if not ready:  # once ready, the fd is closed (and its number may be another file's)
            protocol.report_error(ready_fd, e)
    finally:
        if log_ is not None and log_.fd >= 0:
            log_.tidy() if ready else log_.discard()
            if serve_args.get("reuse"):
                _close_log(log_)
    return code


def _close_log(log_: LogFile | None) -> None:
    """A worker to be reused is done with its mount's log: no handler writes to it any more."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = []
    if log_ is not None and log_.fd >= 0:
        os.close(log_.fd)
        log_.fd = -1


def serve_handed_over(cfg: MountConfig, ready_fd: int, opener: Callable[[list[tuple[str, bool]]], LayerStack],
                      fuse_fd: int | Callable[[], int], reuse: bool = False) -> int:
    """A resident server's worker (`unionfs.server.resident`): serve the FUSE fd *fuse_fd* a client
    mounted (on *cfg.mountpoint*, a real path), on the branches *opener* gives, as a background
    daemon with its log beside its pidfile; its exit status.  With *reuse*, return once the kernel
    has ended the session and all of the mount is let go of (`serve`), rather than exit."""
    state = StateDir.open(create=True)
    try:
        log_ = state.open_log(_log_name(cfg.mountpoint, resolved=True)) if state else None
    finally:
        if state is not None:
            state.close()
    return _daemon(cfg, ready_fd, False, log_, opener=opener, fuse_fd=fuse_fd, reuse=reuse)


def _log_name(mountpoint: str, resolved: bool = False) -> str:
    return _pid_name(mountpoint, resolved).removesuffix(".pid") + ".log"



def hold_stop_signals() -> dict[int, Any]:
    """From now until the session loop's own handlers take over (`_main`): a stop signal (SIGTERM,
    SIGINT, SIGHUP) is remembered rather than fatal, and ends the session as soon as it is served,
    which then unmounts as for any signal.  Before, a SIGTERM right after the mount was ready could
    kill the daemon first and leave its mount behind.  The handlers there were; nothing outside the
    main thread."""
    before: dict[int, Any] = {}
    with contextlib.suppress(ValueError):   # (not the main thread)
        for sig in STOP_SIGNALS:
            before[sig] = signal.signal(sig, _remember_stop)
    return before


def _remember_stop(sig: int, _frame: object) -> None:
    _stopped.append(sig)


def _restore_handlers(before: dict[int, Any]) -> None:
    for sig, handler in before.items():
        signal.signal(sig, handler)


def _setup_logging(debug: bool, log_file: LogFile | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        handler = logging.StreamHandler(log_file.text())
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    if log_file is not None and log_file.in_state_dir and not debug:
        # The default log is for warnings and errors: with nothing of the kind it goes at exit.
        handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def serve(cfg: MountConfig, ready_fd: int | None, debug: bool = False,
          on_ready: Callable[[], None] | None = None,
          opener: Callable[[list[tuple[str, bool]]], LayerStack] | None = None,
          fuse_fd: int | Callable[[], int] | None = None, at_exit: Callable[[], None] | None = None,
          reuse: bool = False, log_file: LogFile | None = None) -> int:
    """Open the branches, mount, serve until unmounted or signalled; always clean up.

    *on_ready* is called once the mount is ready (after the answer went to *ready_fd*, which is
    then closed; see `protocol`).  With *at_exit* (a daemon's), the process exits as soon as the
    kernel has ended the session and what a user can see is cleaned up (the branches let go of,
    the pidfile and control socket removed, then *at_exit* called): the rest of the unwinding
    (trio's, the session's) frees only what the exit frees.  `unionfs umount` waits for the
    pidfile's lock, which the shim lets go of as the session ends (`_let_go_at_session_end`), or
    else the daemon just before its exit, once every other fd is closed.  Call `preload` first
    where the imports' time matters.  A resident server's worker gives *opener* (the branches it
    was handed open, by writability) and *fuse_fd*, a /dev/fuse fd its client mounted already:
    libfuse serves it as ``/dev/fd/N`` (or what gives it, once *opener* has been called: a worker
    handed its client before the client mounted receives the fds then).
    With *reuse* as well, the process does not exit when the kernel ends the session: everything
    unwinds in order (the pidfile's lock last, where the shim has not let go of it already) and
    `last_end` says "kernel".
    *log_file*: the daemon's log (with *at_exit*: tidied away by the shim when the session ends, if
    it is the state directory's and empty; see `_let_go_at_session_end`).
    """
    global last_end
    last_end = ""
    import trio

    from unionfs.core.branches import open_stack, raise_nofile_limit

    from . import compat, control
    from .compat import pyfuse3
    from .operations import Operations

    os.umask(0)
    raise_nofile_limit()
    # No collection while the mount starts (a young one took 0.3 ms of a 3 ms start): on again,
    # with the serving threshold, just before serving.
    collecting = gc.isenabled()
    gc.disable()
    with contextlib.ExitStack() as stack:
        if collecting:
            stack.callback(gc.enable)
        stack.callback(_stopped.clear)   # (one that came too late to end this session)
        stack.callback(_restore_handlers, hold_stop_signals())
        # The pidfile's fd, locked until the daemon has let go of all it held (statedir.write_pid):
        # closed last of all, or by exit_now just before the exit.
        held: list[int] = []
        stack.callback(_close_all, held)
        inherited = _files_open()   # the log's, inherited ones (see `_still_open`)
        not_ours: set[int] = set()
        # The pidfile and the control socket come first: a worker handed its client before the
        # client mounted (`unionfs.server.resident`) makes them while the client mounts.  Nothing
        # here touches the mount point path: once mounted, a stat of it from this thread would wait
        # for a reply only this thread can give.
        pidfile = _pid_name(cfg.mountpoint, resolved=fuse_fd is not None)   # mounted already: not looked at
        state = StateDir.open(create=True)
        undo = stack.enter_context(contextlib.ExitStack())  # what a mount that fails must not leave
        if state is not None:
            stack.callback(state.close)
            undo.callback(state.discard)
            not_ours.add(state.fd)
        visible = stack.enter_context(contextlib.ExitStack())   # what a user sees of the daemon
        if state is not None:
            fd = _write_pidfile(state, pidfile)
            visible.callback(state.remove_pid, pidfile, os.getpid(), fd)
            if fd is not None:
                held.append(fd)
                not_ours.add(fd)   # not the shim's to let go of with the branches
        key = pidfile.removesuffix(".pid")
        listener = control.listen(state, key)
        made = control.bound(state, key) if listener is not None else None
        if listener is not None:
            visible.callback(control.forget, state, key, made)
            visible.callback(listener.close)
        # A writable top is opened for writing even under -o ro (the kernel's mount is then
        # read-only), so that `mount -o remount,rw` needs nothing from the daemon, as on overlayfs;
        # an upper on a read-only filesystem is served read-only.
        writable = bool(cfg.branches) and cfg.branches[0][1]
        read_only = [(p, False) for p, _ in cfg.branches]

        def open_paths(branches: list[tuple[str, bool]]) -> LayerStack:
            return open_stack(branches, cfg.workdir, cfg.style == "aufs")
        open_branches = opener or open_paths
        try:
            try:
                layers = open_branches(cfg.branches if writable else read_only)
            except OSError as e:
                if not (writable and cfg.readonly and e.errno == errno.EROFS):
                    raise
                writable = False
                layers = open_branches(read_only)
        except OSError as e:
            where = os.fsdecode(e.filename) if e.filename is not None else "?"
            raise QuietError(f"cannot open branches: {e.strerror}: {where}") from None
        branches = stack.enter_context(contextlib.ExitStack())
        branches.callback(layers.close)
        ops = Operations.over(layers, cfg.dialect, readonly=not writable, max_listed=cfg.max_cached_entries,
                              timeout=cfg.timeout, debug=debug, udba=cfg.udba,
                              max_watches=cfg.udba_max_watches, metacopy=cfg.metacopy,
                              redirect_dir=cfg.redirect_dir, passthrough=cfg.passthrough,
                              writeback=cfg.writeback)
        branches.callback(ops.union.close)
        if ops.watcher is not None:
            branches.callback(ops.watcher.close)
        ops.use_shim()

        def release_branches() -> None:
            if compat.let_go_early()[1]:   # the shim removed the work dir, and let go of its parent's fd
                layers.remove_work = None
            branches.close()
        ctl = control.Control(ops, cfg.style, cfg.mountpoint if fuse_fd is not None
                              else os.path.realpath(cfg.mountpoint))
        quick = at_exit is not None
        # A worker handed its fds with the mount closed them once it had its own (`opener`): a
        # number among them may be a branch's fd by now, not one of ours to keep.
        not_ours |= _still_open(inherited)

        def at_session_end() -> None:
            _release_at_session_end(layers, not_ours)
            _let_go_at_session_end(state if quick else None, held, pidfile, made, log_file, layers,
                                   UNWIND_NICE if not reuse else unwind_nice)

        def after_change() -> None:   # a live change of branches
            if not compat.session_exited():   # (else too late: the shim may have let go already)
                at_session_end()
        at_session_end()
        ctl.after_change = after_change
        with _stderr_captured() as said:
            try:
                fd = fuse_fd() if callable(fuse_fd) else fuse_fd
                where = cfg.mountpoint if fd is None else f"/dev/fd/{fd}"
                pyfuse3.init(ops, where, fuse_options(cfg))
            except RuntimeError as e:
                why = said()[-1:] or [str(e)]  # libfuse and fusermount3 say why on stderr
                raise QuietError(f"cannot mount on {cfg.mountpoint!r}: {why[0]}") from None
            notes = said()
        compat.quicken_session_loop(pyfuse3)
        for line in notes:
            log.warning("%s", line)
        # A mount made already (a resident server's worker) has its INIT request waiting: answered
        # here, it is usable once the client has our answer, not only once trio and the session
        # loop have started (about half a millisecond).
        init_done = fuse_fd is not None and compat.answer_init()
        session_open = [True]

        def close_session() -> None:
            if session_open:
                session_open.clear()
                _close_session(pyfuse3)
        stack.callback(close_session)
        stack.callback(release_branches)   # before the session is closed
        if ready_fd is not None:
            protocol.report_ready(ready_fd)
            _detach_stdio()
        seen: list[str] = []
        if init_done:
            _raise_read_ahead(cfg.mountpoint, seen)   # before any other request is read
        undo.pop_all()
        if on_ready is not None:
            on_ready()
        if state is not None:
            _sweep_aside(state)
        # Serving allocates a node, its stat and its reply per name a cold listing shows: the
        # cyclic GC's default young generation (700 objects) ran every few dozen names, about a
        # sixth of a cold readdir's CPU; at 10,000 it runs a tenth as often and took a third to a half
        # as long in a direct walk of the perf tree.
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        if collecting:
            gc.enable()

        def exit_now() -> NoReturn:
            visible.close()
            if at_exit is not None:
                at_exit()
            logging.shutdown()
            # Where the shim has not let go of the lock at the session's end already
            # (`_let_go_at_session_end`), every fd goes before it does (the FUSE device's too: the
            # kernel keeps a passthrough file's backing file until it is closed), so that `unionfs
            # umount`, which waits for the lock, returns with nothing of the mount held; the exit's
            # own teardown (about a millisecond for a worker's memory) then runs while it goes on.
            # Up to the highest fd open, not to the highest possible one: where close_range(2) is
            # missing (Linux before 5.9, a seccomp filter) os.closerange closes each number.
            top = max(_open_fds(), default=2) + 1
            first = held[0] if held else top
            os.closerange(3, first)
            os.closerange(first + 1, top)
            _close_all(held)
            os._exit(0)
        def let_go() -> None:
            # A worker to be reused, once the kernel has ended the session: all of the mount goes
            # now (a state directory or a bound socket on the filesystem under the branches would
            # keep it busy), the lock last, as at the quick exit, where the shim has not let go of
            # it already; trio's tasks and the rest unwind afterwards.  The control task is told
            # its listener is closing first (it then ends).
            if listener is not None:
                trio.lowlevel.notify_closing(listener)
            visible.close()
            if at_exit is not None:
                at_exit()
            release_branches()
            close_session()
            if state is not None:
                state.close()
            _close_all(held)
        signalled = trio.run(_main, pyfuse3, ops, cfg.mountpoint, release_branches, ctl, listener,
                             exit_now if quick and not reuse else None, seen,
                             let_go if quick and reuse else None, init_done)
        last_end = "signal" if signalled else "kernel"
        # (a signal while the kernel was ending the session: the mount is gone, and a later mount
        # on the same point may have the same device number)
        if signalled and fuse_fd is not None and not compat.let_go_early()[2]:
            _unmount_handed_over(cfg.mountpoint, seen)
    return 0


UNWIND_NICE = 19
#: Where the priority is not lowered (it could not be had back: a user's worker, with RLIMIT_NICE 0),
#: a pause off the CPU instead, after the shim let go of the mount: the `unionfs umount` woken then
#: runs first, and the unwinding, woken in turn, may go to an idle CPU (a user's mount loop: its
#: unmount 3.2-3.4 → 2.3-2.5 ms, measured).
UNWIND_PAUSE_US = 300
#: The priority a daemon to be reused (a resident server's worker) unwinds at once the shim has let
#: go of its mount: the spare sets it when it can have its own priority back afterwards
#: (`unionfs.server.resident`); None: unchanged.  A daemon that exits unwinds at UNWIND_NICE.  About
#: a millisecond of CPU that would otherwise keep the `unionfs umount` just woken, or its caller,
#: waiting for up to a scheduler slice on a busy CPU.
unwind_nice: int | None = None


def preload() -> None:
    """Import all that `serve` needs (pyfuse3 behind the libfuse shim, trio, the union): about 100 ms,
    which a starter that forks its server early (``unionfs run``) spends on another core.  Starts no
    thread: a server that joins namespaces afterwards must be single-threaded.
    """
    # Cyclic-GC passes over the modules' objects, which live as long as the server, cost these
    # imports ~10% and free nothing; so the GC is off while they load, and freezing them afterwards
    # (gc.freeze: never scanned again) keeps the first collection from scanning them all at once.
    gc.disable()
    try:
        # Each of these imports compat (which loads the shim, which must precede pyfuse3) first.
        # control: serve() opens a control channel for every mount, and its imports (json, live
        # branch changes) were 3-15 ms of each resident server's worker, after the fork.
        from . import control, operations  # noqa: F401
        from .compat import pyfuse3  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def _open_fds() -> set[int]:
    """The fds open in this process (not the one that listed them, closed by the time each listed
    number is looked at: one F_GETFD each, cheaper than a stat)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.get_inheritable(int(name))
            found.add(int(name))
    return found


def _file_of(fd: int) -> tuple[int, int] | None:
    """The file *fd* is (st_dev, st_ino); None when it is not open (any more)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files_open() -> dict[int, tuple[int, int]]:
    """The fds open in this process, each with the file it is (not the one that listed them)."""
    found = {int(name): _file_of(int(name)) for name in os.listdir("/proc/self/fd")}
    return {fd: ident for fd, ident in found.items() if ident is not None}


def _still_open(before: dict[int, tuple[int, int]]) -> set[int]:
    """Those of *before* (`_files_open`) that are still the same files."""
    return {fd for fd, ident in before.items() if _file_of(fd) == ident}


def _release_at_session_end(layers: LayerStack, not_ours: set[int]) -> None:
    """Have the shim let go of the branches the moment the kernel ends the session, so that whoever
    unmounted the union can unmount the filesystem under them next (see _fuse_shim.c): every fd on
    their filesystems but those in *not_ours* (the log's, the state directory's, inherited ones),
    and but the upper root's when an AUFS-style work dir is still to be removed through it (that
    one goes when serving ends)."""
    from . import compat

    devs = {os.fstat(layer.fd).st_dev for layer in layers.layers}
    if layers.work_fd is not None:
        devs.add(os.fstat(layers.work_fd).st_dev)
    keep = set(not_ours)
    if layers.remove_work is not None:
        keep.add(layers.layers[0].fd)
    try:
        compat.release_on_session_end(sorted(devs), sorted(keep))
    except ValueError as e:   # more filesystems than the shim keeps: released when serving ends
        compat.let_go_at_session_end(-1, -1, [])
        log.debug("branches not released by the shim: %s", e)


def _let_go_at_session_end(state: StateDir | None, held: list[int], pidfile: str,
                           ctl: tuple[str, int, int] | None, log_file: LogFile | None, layers: LayerStack,
                           nice: int | None) -> None:
    """A daemon that lets go of its mount in order at the session's end (`serve`'s *at_exit*) has
    the shim do the part `unionfs umount` waits for right there: its pidfile, control socket and
    empty log go and the pidfile's lock with them, while this thread is still in the session loop,
    about half a millisecond sooner (the rest of the unwinding follows, at priority *nice*, see
    `unwind_nice`, or else after `UNWIND_PAUSE_US`; a line logged meanwhile is kept,
    `LogFile.tidy`); an AUFS-style work dir is removed from the top branch first. Not when the state
    directory is on a branch's filesystem (a mount other than the root's): the shim then sees an fd
    there left and leaves the rest to the daemon. Every other daemon: nothing (the shim forgets an
    earlier session's)."""
    from . import compat

    if state is None or not held:
        compat.let_go_at_session_end(-1, -1, [])
        return
    st = os.fstat(held[0])
    names = [(pidfile, st.st_dev, st.st_ino, -1)]
    if ctl is not None:
        names.append((*ctl, -1))
    if log_file is not None and log_file.in_state_dir and log_file.fd >= 0 and \
            os.path.dirname(log_file.path) == state.path:
        st = os.fstat(log_file.fd)
        names.append((os.path.basename(log_file.path), st.st_dev, st.st_ino, log_file.fd))
    work = None
    if layers.remove_work is not None and layers.layers:
        work = (int(layers.layers[0].fd), layers.remove_work)
    pause = 0 if nice is not None else UNWIND_PAUSE_US
    compat.let_go_at_session_end(held[0], state.fd, names, nice, work, pause)


READ_AHEAD_KB = 1024


def _raise_read_ahead(mountpoint: str, seen: list[str]) -> None:
    """Let the kernel read ahead 1 MiB on this mount (FUSE's default is 128 KiB): big sequential
    reads then arrive as 1 MiB requests instead of 128 KiB ones.  Root only; best effort.  The
    mount's device goes to *seen* (see `_unmount_handed_over`).

    The mount's device comes from mountinfo: a stat of the mount point would wait for this thread.
    """
    try:
        found = _mount_at(mountpoint)
        if found is None or found[1] != "fuse.unionfs":
            return
        dev = found[0]
        seen.append(dev)
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except (OSError, ValueError) as e:
        log.debug("read-ahead left at the default: %s", e)


def _unmount_handed_over(mountpoint: str, seen: list[str]) -> None:
    """Unmount *mountpoint* after a signal ended the session of a mount a client made (a resident
    server's worker): libfuse unmounts only what it mounted itself, and a daemon that mounted
    itself unmounts on SIGTERM (as fuse-overlayfs does).  Only while the mount there is still the
    one served (its device as seen after INIT): the point may have been unmounted and reused."""
    found = _mount_at(mountpoint)
    if found is None or found[1] != "fuse.unionfs" or found[0] not in seen:
        return
    try:
        if os.geteuid() == 0:
            sysx.umount2(os.fsencode(mountpoint), sysx.UMOUNT_NOFOLLOW)
        else:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("cannot unmount %s after the signal: %s", mountpoint, e)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], list[str]]]:
    """Hold what is written to fd 2 in the block (by libfuse and the fusermount3 it runs), so that a
    failure is one line; the callable returns the lines so far."""
    sys.stderr.flush()
    saved = os.dup(2)
    memfd = os.memfd_create("unionfs-stderr", os.MFD_CLOEXEC)
    os.dup2(memfd, 2)

    def lines() -> list[str]:
        text = os.fsdecode(os.pread(memfd, 65536, 0))
        return [ln.strip() for ln in text.splitlines() if ln.strip()]

    try:
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(memfd)


def _close_session(pyfuse3: object) -> None:
    try:
        pyfuse3.close(unmount=True)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - unmount on the way out must not hide the real error
        log.exception("closing the FUSE session")


async def _main(pyfuse3: object, ops: Operations, mountpoint: str,
                release_branches: Callable[[], None], ctl: control.Control | None = None,
                listener: socket.socket | None = None, exit_now: Callable[[], None] | None = None,
                seen: list[str] | None = None, let_go: Callable[[], None] | None = None,
                init_done: bool = False) -> bool:
    """Serve until the session ends; then let go of the branches first, before the rest winds
    down, or call *exit_now* (or *let_go*, which returns) when the kernel ended the session.
    Whether a signal ended it; the mount's device, once known, goes to *seen*."""
    seen = [] if seen is None else seen
    import trio

    from . import compat
    initialised = trio.Event()
    raise_read_ahead = functools.partial(_raise_read_ahead, mountpoint, seen)

    def on_init() -> None:
        # The kernel sets the read-ahead from our INIT reply, which goes out right after init():
        # raised before the next request is read where the quick loop can, else by a task soon.
        if not compat.before_next_read(raise_read_ahead):
            initialised.set()

    if not init_done:   # (else answered before the loop, the read-ahead raised: `serve`)
        ops.on_init = on_init

    async def after_init() -> None:
        await initialised.wait()
        raise_read_ahead()

    signalled = False

    async def stop(sig: int) -> None:
        nonlocal signalled
        log.info("signal %d: unmounting", sig)
        signalled = True
        # A worker unmounts its mount after the session only while the mount there is the one it
        # served, as seen after INIT (`_unmount_handed_over`): a signal that comes right after the
        # mount was ready lets the session loop answer INIT first (the kernel sent it at the mount).
        with trio.move_on_after(STOP_WAIT):
            while not seen:
                await trio.sleep(0.001)
        pyfuse3.terminate()  # type: ignore[attr-defined]

    async def on_signals(signals: AsyncIterator[int]) -> None:
        async for sig in signals:
            await stop(sig)

    # The handlers are in place before the session loop first runs, not once their task gets a
    # turn: the loop may serve a run of requests first, and a signal meanwhile would kill the
    # daemon and leave its mount behind.
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_signals, signals)
            if _stopped:   # before the receiver was there (`hold_stop_signals`)
                nursery.start_soon(stop, _stopped.pop(0))
            if not init_done:
                nursery.start_soon(after_init)
            if ctl is not None and listener is not None:
                from . import control
                nursery.start_soon(control.serve, ctl, listener)

            if ops.watcher is not None:
                nursery.start_soon(ops.watcher.run)
            try:
                await pyfuse3.main()  # type: ignore[attr-defined]
            finally:
                release_branches()
                from .operations import entry_invalidations
                entry_invalidations.stop()
            if exit_now is not None and not signalled:
                exit_now()   # the kernel ended the session: the mount is gone, nothing else is owed
            if let_go is not None and not signalled:
                let_go()
            nursery.cancel_scope.cancel()
    return signalled


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    root = logging.getLogger()
    if any(isinstance(h, logging.StreamHandler) and h.stream not in (sys.stderr, sys.__stderr__)
           for h in root.handlers):
        os.dup2(devnull, 2)
    else:
        os.dup2(devnull, 2)
        root.handlers[:] = [logging.NullHandler()]
    os.close(devnull)


def _sweep_aside(state: StateDir) -> None:
    """Now and then, once mounted, clear what daemons that are gone left in the state directory: on a
    thread of its own, with an fd of its own, so that the mount's first requests do not wait."""
    import threading

    try:
        if not state.sweep_due():   # one stat: no thread for most mounts
            return
        own = StateDir(state.path, os.dup(state.fd), created=False)
    except OSError as e:
        log.debug("state directory not swept: %s", e)
        return

    def sweep() -> None:
        try:
            removed = own.sweep_now_and_then()
        except OSError as e:
            log.debug("state directory not swept: %s", e)
        else:
            if removed:
                log.debug("swept %d state files of daemons that are gone", len(removed))
        finally:
            own.close()
    threading.Thread(target=sweep, name="sweep", daemon=True).start()


def _write_pidfile(state: StateDir, name: str) -> int | None:
    """Best effort: `unionfs umount` uses it to wait for the daemon.  The pidfile's fd, held locked
    (see `statedir.StateDir.write_pid`); None when there is none."""
    try:
        return state.write_pid(name, os.getpid(), hold=True)
    except OSError as e:
        log.debug("no pidfile: %s", e)
        return None


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
