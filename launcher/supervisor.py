"""Run a command with a union as its root: the launcher's main sequence.

``run(RunConfig(...))`` reads as the script of a container start:

1. check the request (branches, volumes, /dev/fuse for rootless), lock the
   container layer (one launch per layer) and make the per-run directory on the
   host, removing those of killed launchers (``launcher.state``); with
   ``--memory``, ``--pids-limit`` or ``--cpus``, make the run's cgroup
   (``launcher.cgroups``), which PID 1 joins first thing after the fork;
2. move the launcher into a private mount namespace (and a user namespace when
   rootless), and put a tmpfs over its per-run directory there: the init
   layer, the mount point and a throwaway upper live in it and vanish with it;
3. write the init layer (/etc/hostname, /etc/hosts, /etc/resolv.conf, and the
   mount points the image lacks, their parent directories carrying the image's
   metadata: see ``rootfs.InitLayer``) and mount the union UPPER:INIT:LAYERS...
   with the FUSE server as the launcher's child, outside the container;
4. fork the command as PID 1 of a new PID namespace; it unshares mount, UTS,
   IPC (and network) namespaces, applies the rootfs steps, pivots and execs;
5. supervise: forward signals (SIGTERM as ``docker stop``: SIGKILL after
   ``--stop-timeout``), wait, and turn the status into ours (128+N when killed
   by signal N);
6. always unmount, wait for the server and remove the per-run directory and
   cgroup.  If the launcher is SIGKILLed, the command and the server get SIGKILL
   from PR_SET_PDEATHSIG, the kernel frees the private mount namespace with the
   union in it and drops the container layer's lock; the next launch removes the
   (empty) per-run directory and cgroup.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from launcher import cgroups, namespaces, rootfs, security, state, syscalls, timing, users
from launcher.errors import EXIT_LAUNCH_FAILED, EXIT_USAGE, LaunchError
from launcher.stopping import FORWARDED_SIGNALS, StopClock
from launcher.union import DEFAULT_BACKEND, UnionHandle, mount_union
from unionfs.core import config
from unionfs.core.branchview import BranchView, components
from unionfs.core.config import BranchSpec
from unionfs.core.errors import QuietError, describe

if TYPE_CHECKING:
    from launcher import terminal

DEAD_UNION_GRACE = 0.5  # seconds a command whose union died has to end by itself before SIGKILL
log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_MOUNTPOINTS = ("/proc", "/dev", "/sys")
"""Mount points the container needs (/sys as Docker's init layer has it); made where the image lacks them."""
TMP_MODE = 0o1777  # /tmp where the image has none
TMPFS_FLAGS = {
    "ro": (syscalls.MS_RDONLY, True), "rw": (syscalls.MS_RDONLY, False),
    "nosuid": (syscalls.MS_NOSUID, True), "suid": (syscalls.MS_NOSUID, False),
    "nodev": (syscalls.MS_NODEV, True), "dev": (syscalls.MS_NODEV, False),
    "noexec": (syscalls.MS_NOEXEC, True), "exec": (syscalls.MS_NOEXEC, False),
}
SI_KERNEL = 0x80
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class RunConfig(NamedTuple):
    """Everything ``unionfs run`` was asked to do."""

    branches: str
    command: Sequence[str]
    hostname: str | None = None
    env: Sequence[str] = ()
    workdir: str = "/"
    net: str = "host"
    tmp_upper: bool = False
    rootless: bool | None = None  # None: automatic, rootless when not root
    keep_mounted: bool = False
    init: bool = False  # a reaping init as PID 1, the command as PID 2 (as docker run --init)
    backend: str = DEFAULT_BACKEND
    container_id: str | None = None  # default: 12 random hex digits, as Docker's short ids
    volumes: Sequence[str] = ()  # HOST:CTR[:ro|rw], as docker run -v
    tmpfs: Sequence[str] = ()  # PATH[:OPTIONS], as docker run --tmpfs
    user: str | None = None  # UID[:GID] or NAME[:GROUP], from the image's /etc/passwd and /etc/group
    read_only: bool = False  # the root read-only; tmpfs on /tmp, /var/tmp and /run
    stop_timeout: float = 10.0  # after SIGTERM to PID 1, seconds until SIGKILL
    policy: security.Policy = security.Policy()  # capabilities, no-new-privileges, seccomp, masks
    tty: bool = False  # a pty of the container's own, relayed to ours (also when our stdin is a terminal)
    limits: cgroups.Limits = cgroups.Limits()  # --memory, --pids-limit, --cpus: a cgroup of the run's own
    runtime: str | None = None  # an OCI runtime (runc, crun, a path) to start the container instead of ours
    image_env: Sequence[str] = ()  # the image's Env (KEY=VALUE): over the defaults, under -e


def container_env(cfg: RunConfig, hostname: str) -> dict[str, str]:
    """A clean environment, as Docker gives: PATH, HOSTNAME, HOME, TERM for a terminal, then the
    image's Env, then -e."""
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, "HOME": "/root"}
    if os.isatty(0) and "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    elif cfg.tty:
        env["TERM"] = "xterm"  # as docker run -t sets it
    for item in cfg.image_env:
        key, sep, value = item.partition("=")
        if key and sep:
            env[key] = value
    for item in cfg.env:
        key, sep, value = item.partition("=")
        if not key:
            raise LaunchError(f"bad environment variable {item!r} (want KEY=VALUE or KEY)", EXIT_USAGE)
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def _check_fuse_access(rootless: bool, backend: str) -> None:
    if backend != "fuse" or not rootless or os.getuid() == 0:
        return
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        try:
            mode = f"mode {stat.S_IMODE(os.stat('/dev/fuse').st_mode):04o}"
        except OSError as exc:
            mode = os.strerror(exc.errno or 0)
        raise LaunchError(
            f"/dev/fuse is not usable by uid {os.getuid()} ({mode}); "
            "fix with: chmod 666 /dev/fuse (as Debian's udev rules ship it)"
        )


def _container_path(value: str, what: str) -> str:
    if not value.startswith("/"):
        raise LaunchError(f"{what} must be an absolute path inside the container: {value}", EXIT_USAGE)
    try:
        names = components(value)
    except ValueError:
        raise LaunchError(f"{what} must not contain '..': {value}", EXIT_USAGE) from None
    return "/" + "/".join(names)


def parse_volume(spec: str) -> rootfs.Volume:
    """``HOST:CTR[:ro|rw]`` as docker run -v; HOST must exist (a file or a directory)."""
    parts = spec.split(":")
    readonly = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        readonly = parts.pop() == "ro"
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise LaunchError(f"bad --volume {spec!r} (want HOST:CONTAINER[:ro])", EXIT_USAGE)
    source = os.path.abspath(parts[0])
    if not os.path.exists(source):
        raise LaunchError(f"--volume source does not exist: {source}", EXIT_USAGE)
    return rootfs.Volume(source, _container_path(parts[1], "--volume destination"), readonly)


def parse_tmpfs(spec: str) -> rootfs.TmpfsMount:
    """``PATH[:OPTIONS]`` as docker run --tmpfs: mode 1777, nosuid, nodev, noexec unless told."""
    path, _, options = spec.partition(":")
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    data = {"mode": "1777"}
    for opt in filter(None, options.split(",")):
        key, sep, value = opt.partition("=")
        if opt in TMPFS_FLAGS:
            bit, on = TMPFS_FLAGS[opt]
            flags = flags | bit if on else flags & ~bit
        elif sep and key in ("size", "mode", "nr_inodes", "uid", "gid"):
            data[key] = value
        else:
            raise LaunchError(f"bad --tmpfs option {opt!r} in {spec!r}", EXIT_USAGE)
    options_data = ",".join(f"{k}={v}" for k, v in data.items())
    return rootfs.TmpfsMount(_container_path(path, "--tmpfs"), flags, options_data)


def _unmapped_owner(upper: str) -> tuple[int, int] | None:
    """Rootless: whether the writable branch's top directory has an owner or group outside the
    user's own ids and subordinate ranges.

    Only a guess: the union shows such an id as the overflow id (65534), which the namespace
    may map after all (a subordinate range of 65536 ids does), and only an id that stays
    unmapped makes the kernel refuse writes.  ``_warn_if_root_not_writable`` checks.
    Returns the directory's (uid, gid) when either looks unmapped.
    """
    uid, gid = os.getuid(), os.getgid()
    try:
        st = os.stat(upper)
    except OSError:
        return None
    subuid = namespaces.subordinate_range("/etc/subuid", uid)
    subgid = namespaces.subordinate_range("/etc/subgid", uid)

    def mapped(value: int, own: int, sub: namespaces.IdRange | None) -> bool:
        return value == own or (sub is not None and sub.start <= value < sub.start + sub.length)

    if mapped(st.st_uid, uid, subuid) and mapped(st.st_gid, gid, subgid):
        return None
    return st.st_uid, st.st_gid


def _warn_if_root_not_writable(root: str, upper: str, owner: tuple[int, int], user: tuple[int, int],
                               probe: str) -> None:
    """Create (and remove) the file *probe* at the union's root; when that is refused, warn and say
    how to fix it (*owner*: the host's owner and group of *upper*; *user*: the launching user's)."""
    path = os.path.join(root, probe)
    before = os.stat(root)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EOVERFLOW):
            log.warning("%s belongs to uid %d, gid %d, which the user namespace cannot map: nothing can be "
                        "created in the container's / (fix: chown %d:%d %s)", upper, *owner, *user, upper)
        return
    os.unlink(path)
    try:  # the probe leaves no trace but the root's ctime
        os.utime(root, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError as exc:
        log.debug("restore the times of %s: %s", root, exc)


def _resolv_conf(net: str) -> bytes:
    if net == "none":
        return b"# no network: this container has only a loopback interface\n"
    try:
        with open("/etc/resolv.conf", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _exec_failure_code(exc: OSError) -> int:
    if exc.errno == errno.ENOENT:
        return EXIT_NOT_FOUND
    if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
        return EXIT_NOT_EXECUTABLE
    return EXIT_LAUNCH_FAILED


def _container_child(
    cfg: RunConfig,
    root: str,
    steps: Sequence[rootfs.Step],
    hostname: str,
    env: dict[str, str],
    workdir: str,
    user: users.User | None,
    rootless: bool,
    errw: int,
    alive_r: int,
    old_mask: set[int | signal.Signals],
    console: Console | None,
    cgroup: cgroups.RunCgroup | None = None,
) -> None:
    """PID 1 of the new PID namespace, from fork to exec.  Never returns."""
    code = EXIT_LAUNCH_FAILED
    try:
        if cgroup is not None:  # first: the limits hold for the setup and the whole command
            cgroup.join_in_child()
        # Die with the launcher.  If it died already, the pipe it holds open is at EOF.
        syscalls.set_pdeathsig(signal.SIGKILL)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(EXIT_LAUNCH_FAILED)
        flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
        if cfg.net == "none":
            flags |= syscalls.CLONE_NEWNET
        syscalls.unshare(flags)
        try:
            socket.sethostname(hostname)
        except OSError as exc:
            raise OSError(exc.errno, "sethostname", hostname) from None
        if cfg.net == "none":
            namespaces.bring_loopback_up()
        rootfs.apply(steps, root)
        rootfs.enter_root(root, workdir)
        security.apply(cfg.policy)
        slave = None
        if console is not None:
            from launcher import terminal  # imported by the launcher before the fork: no file is read

            slave = terminal.open_pty(console.socket, console.winsize, user.uid if user else None)
        if user is not None:
            _switch_user(user, rootless)
        if cfg.policy.no_new_privs:
            security.set_no_new_privs()
        if cfg.init and os.fork() != 0:
            os.close(errw)  # the command's copy closes on exec, and that EOF is what the launcher waits for
            if slave is not None:
                os.close(slave)
            _mini_init()
        if slave is not None:
            terminal.become_controlling(slave)
        for sig in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        try:
            os.execvpe(cfg.command[0], list(cfg.command), env)
        except OSError as exc:
            code = _exec_failure_code(exc)
            raise OSError(exc.errno, "exec", cfg.command[0]) from None
    except OSError as exc:
        msg = describe(exc)
    except BaseException as exc:  # noqa: B036 - nothing may escape a forked child
        msg = f"container setup failed: {exc!r}"
    try:
        os.write(errw, msg.encode(errors="replace")[:4000])
    finally:
        os._exit(code)


def _switch_user(user: users.User, rootless: bool) -> None:
    """Become ``--user``: supplementary groups, group, then user (the last drops the capabilities)."""
    try:
        os.setgroups(list(user.groups))
    except PermissionError:
        if not rootless:
            raise
        # a user namespace with only the launching user's ids denies setgroups; none are held anyway
        log.debug("setgroups refused in the user namespace; no supplementary groups")
    ids = f"{user.uid}:{user.gid}"
    hint = " (not mapped in the user namespace: rootless maps your subordinate ids only)" if rootless else ""
    try:
        os.setgid(user.gid)
        os.setuid(user.uid)
    except OSError as exc:
        raise OSError(exc.errno, "switch to --user", ids + hint) from None


def _mini_init() -> None:
    """PID 1 with --init: run the command as PID 2, forward signals to it, reap every orphan.

    Exits with the command's status (128+N when it was killed by signal N).  The
    forwarded signals stay blocked and arrive through sigwaitinfo, but each has a
    handler installed so that the launcher (reading SigCgt) sees that PID 1 takes them.
    """
    code = EXIT_LAUNCH_FAILED
    try:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, lambda *_: None)
        command = 2  # the first child of PID 1 in a fresh namespace
        while True:
            info = signal.sigwaitinfo({signal.SIGCHLD, *FORWARDED_SIGNALS})
            if info.si_signo != signal.SIGCHLD:
                _kill(command, info.si_signo)
                continue
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid = 0
                if pid == 0:
                    break
                if pid == command:
                    code = os.waitstatus_to_exitcode(status)
                    os._exit(128 - code if code < 0 else code)
    finally:
        os._exit(code)


def _signal_masks(pid: int) -> tuple[int, int]:
    """(caught, ignored) signal bit masks of *pid*, from /proc/PID/status."""
    caught = ignored = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    caught = int(line.split()[1], 16)
                elif line.startswith("SigIgn:"):
                    ignored = int(line.split()[1], 16)
    except OSError:
        pass
    return caught, ignored


def _forward(pid: int, info: signal.struct_siginfo) -> int | None:
    """Pass a signal the launcher received on to PID 1 of the container.

    The kernel drops a signal sent to a PID namespace's init when init has no
    handler for it (only SIGKILL and SIGSTOP get through), so a plain command
    as PID 1 would never die of SIGTERM.  Where the command would have died
    had it not been PID 1, we kill it and return the signal, so the launcher
    exits 128+N all the same.  A signal the terminal sent to our whole process
    group has already reached a command that catches it, and is not sent twice.
    """
    sig = info.si_signo
    bit = 1 << (sig - 1)
    caught, ignored = _signal_masks(pid)
    log.debug("signal %d (code %d) for PID 1 (%d): caught=%s", sig, info.si_code, pid, bool(caught & bit))
    if caught & bit:
        try:
            same_group = os.getpgid(pid) == os.getpgrp()
        except OSError:
            same_group = False
        if not (info.si_code == SI_KERNEL and same_group):
            _kill(pid, sig)
        return None
    if ignored & bit:
        return None
    _kill(pid, signal.SIGKILL)
    return sig


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(pid: int) -> None:
    """SIGTERM for the container, as ``docker stop`` sends it: to PID 1 if it has a handler.

    A PID 1 without one never sees it (the kernel drops it), as under Docker; the supervisor
    SIGKILLs it when ``--stop-timeout`` has passed.
    """
    caught, _ = _signal_masks(pid)
    if caught & (1 << (signal.SIGTERM - 1)):
        _kill(pid, signal.SIGTERM)
    else:
        log.debug("PID 1 (%d) has no SIGTERM handler; SIGKILL after the stop timeout", pid)


def _supervise(pid: int, handle: UnionHandle, stop_timeout: float = 10.0,
               resize: Callable[[], None] | None = None) -> int:
    """Wait for PID 1, forwarding signals; its exit status, 128+N if killed by signal N.

    SIGTERM starts the stop timeout: when PID 1 is still there after *stop_timeout*
    seconds it is SIGKILLed (status 137), as ``docker stop`` does.  With *resize* (a pty
    relayed), SIGWINCH calls it.
    """
    waited = {signal.SIGCHLD, *FORWARDED_SIGNALS, *((signal.SIGWINCH,) if resize else ())}
    emulated: int | None = None
    clock = StopClock(stop_timeout)
    while True:
        info = clock.wait(waited)
        if info is None:
            log.debug("PID 1 (%d) still runs %.1fs after SIGTERM: SIGKILL", pid, stop_timeout)
            _kill(pid, signal.SIGKILL)  # only its SIGCHLD is left to wait for
            continue
        if info.si_signo == signal.SIGWINCH and resize is not None:
            resize()
            continue
        if info.si_signo == signal.SIGTERM:
            _stop(pid)
            clock.start()
            continue
        if info.si_signo != signal.SIGCHLD:
            emulated = _forward(pid, info) or emulated
            continue
        wpid, status = os.waitpid(pid, os.WNOHANG)
        server = handle.poll()
        if server is None and wpid == pid and not _union_alive(handle.mountpoint):
            # The command may die of a dead union (SIGBUS on its mapped pages) before the
            # server has finished exiting: the connection is gone, so its exit is near.
            server = _wait_server(handle)
        if server is not None:
            # Its root is gone, so the command fails at its next step: a moment to end on its own lets
            # what it says about that end whole, before our line (else SIGKILL cuts it mid-line).
            if wpid != pid and not _exits_within(pid, DEAD_UNION_GRACE):
                _kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            how = f"was killed by signal {-server}" if server < 0 else f"exited with status {server}"
            raise LaunchError(f"the union's FUSE server {how} while the command ran; the command was stopped")
        if wpid == pid:
            break
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sig = -code
        if sig == signal.SIGKILL and emulated is not None:
            sig = emulated
        code = 128 + sig
    return code


def _union_alive(mountpoint: str) -> bool:
    """False once the union's FUSE connection is gone (its server died): statfs says ENOTCONN."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED)
    return True


def _exits_within(pid: int, seconds: float) -> bool:
    """Whether child *pid* exits (and is reaped) within *seconds*."""
    deadline = time.monotonic() + seconds
    while True:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _wait_server(handle: UnionHandle, timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    while (status := handle.poll()) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return status


def _wait_for_release(root: str, code: int) -> None:
    pid = os.getpid()
    sys.stderr.write(
        f"unionfs run: command exited with status {code}; the union stays mounted at "
        f"/proc/{pid}/root{root} (or: nsenter -t {pid} -m). "
        f"Press Ctrl-C or kill -TERM {pid} to unmount.\n"
    )
    sys.stderr.flush()
    signal.sigwaitinfo(set(FORWARDED_SIGNALS))


def _restore_terminal(was_foreground: bool) -> None:
    """Take the terminal back if an interactive command left its own process group in the foreground."""
    if not was_foreground:
        return
    try:
        if os.tcgetpgrp(0) != os.getpgrp():
            old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            try:
                os.tcsetpgrp(0, os.getpgrp())
            finally:
                signal.signal(signal.SIGTTOU, old)
    except OSError:
        pass


def run(cfg: RunConfig) -> int:
    """Run ``cfg.command`` in a container whose root is the union of ``cfg.branches``; its exit status.

    Raises LaunchError for anything the user can fix; OSError from a setup
    step names the step and the path.  The calling process moves into private
    namespaces of its own (mount, and user when rootless) and its later children
    would land in the container's PID namespace: call this once per process,
    as the CLI does, and only while the process is single-threaded.
    """
    timing.stamp("run")
    if not cfg.command:
        raise LaunchError("no command given (usage: unionfs run BRANCHES -- COMMAND [ARGS...])", EXIT_USAGE)
    workdir = _container_path(cfg.workdir, "--workdir")
    volumes = [parse_volume(v) for v in cfg.volumes]
    tmpfs = [parse_tmpfs(t) for t in cfg.tmpfs]
    if cfg.stop_timeout < 0:
        raise LaunchError(f"--stop-timeout must not be negative: {cfg.stop_timeout}", EXIT_USAGE)
    try:
        branches = config.parse_branches(cfg.branches, top=not cfg.tmp_upper)
    except QuietError as exc:  # the command line's fault: exit 2, as for any bad option
        raise LaunchError(exc.message, EXIT_USAGE) from None
    rootless = cfg.rootless if cfg.rootless is not None else os.getuid() != 0
    if not rootless and os.geteuid() != 0:
        raise LaunchError("--no-rootless needs root; without it unionfs run uses a user namespace",
                          EXIT_USAGE)
    if cfg.runtime is not None:
        _check_runtime_request(cfg)
    container_id = cfg.container_id or os.urandom(6).hex()
    hostname = cfg.hostname or container_id
    env = container_env(cfg, hostname)
    _check_fuse_access(rootless, cfg.backend)
    host_ids = os.getuid(), os.getgid()
    unmapped = _unmapped_owner(branches[0].path) if rootless and not cfg.tmp_upper and host_ids[0] else None
    layer_lock = None if cfg.tmp_upper else state.lock_container_layer(branches[0].path)
    run_dir = state.RunDir(host_ids[0], container_id)
    cgroup = None
    try:
        locks = (run_dir.lock_fd, *(() if layer_lock is None else (layer_lock,)))
        cgroups.sweep_all()
        # With a runtime, the runtime makes the cgroup from config.json; the check that limits can be
        # had at all (root, or a delegated subtree) is the same.
        cgroup = cgroups.RunCgroup(cfg.limits, container_id) if cfg.limits.any() else None
        return _run(cfg, branches, rootless, run_dir.path, container_id, hostname, env, workdir, volumes,
                    tmpfs, unmapped, host_ids, cgroup, locks)
    finally:
        if cgroup is not None:
            cgroup.remove()
        run_dir.remove()
        if layer_lock is not None:
            os.close(layer_lock)


def _run(
    cfg: RunConfig,
    branches: list[BranchSpec],
    rootless: bool,
    base: str,
    container_id: str,
    hostname: str,
    env: dict[str, str],
    workdir: str,
    volumes: list[rootfs.Volume],
    tmpfs: list[rootfs.TmpfsMount],
    unmapped: tuple[int, int] | None,
    host_ids: tuple[int, int],
    cgroup: cgroups.RunCgroup | None,
    locks: tuple[int, ...] = (),
) -> int:
    try:
        was_foreground = os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        was_foreground = False

    # The launcher's own namespaces: everything mounted from here on is invisible to the host
    # and is freed by the kernel when the launcher, its server and its command are gone.
    namespaces.enter_launcher_namespaces(rootless)
    syscalls.mount("tmpfs", base, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0700",
                   step="mount state tmpfs")
    try:
        init_path, root = os.path.join(base, "init"), os.path.join(base, "root")
        os.mkdir(root, 0o755)
        with BranchView([b.path for b in branches]) as view:
            init_files, tmpfs = _write_init_layer(cfg, view, init_path, hostname, workdir, volumes, tmpfs)
            user = users.resolve(cfg.user, view.read_file("/etc/passwd"), view.read_file("/etc/group")) \
                if cfg.user is not None else None
        if user is not None and not any(e.partition("=")[0] == "HOME" for e in (*cfg.image_env, *cfg.env)):
            env["HOME"] = user.home
        if cfg.tmp_upper:
            upper = os.path.join(base, "upper")
            os.mkdir(upper, 0o755)
            layers = [BranchSpec(upper, "rw"), BranchSpec(init_path, "ro"), *branches]
        else:
            layers = [branches[0], BranchSpec(init_path, "ro"), *branches[1:]]
        timing.stamp("mount")
        handle = mount_union(layers, root, rootless=rootless, logfile=os.path.join(base, "server.log"),
                             backend=cfg.backend, keep=[v.source for v in volumes])
        timing.stamp("mounted")
        try:
            if unmapped is not None:
                _warn_if_root_not_writable(root, branches[0].path, unmapped, host_ids,
                                           f".unionfs-run-probe-{container_id}")
            if cfg.runtime is not None:
                return _run_with_runtime(cfg, handle, rootless, base, root, container_id, hostname, env,
                                         workdir, user, init_path, init_files, volumes, tmpfs, locks)
            steps = rootfs.container_steps(rootless=rootless, init_layer=init_path, init_files=init_files,
                                           read_only=cfg.read_only, volumes=volumes, tmpfs=tmpfs,
                                           privileged=cfg.policy.privileged)
            return _start_and_supervise(cfg, handle, root, steps, hostname, env, workdir, user, rootless,
                                        was_foreground, cgroup)
        finally:
            handle.close()
    finally:
        try:
            syscalls.umount2(base, syscalls.MNT_DETACH)
        except OSError as exc:
            log.debug("umount %s: %s", base, exc)


def _check_runtime_request(cfg: RunConfig) -> None:
    """``--runtime``: the runtime is an executable, and nothing was asked that only our own set-up does."""
    from launcher import bundle  # json and subprocess: only for a runtime

    bundle.find_runtime(cfg.runtime or "")
    if cfg.init:
        raise LaunchError("--init is not available with --runtime (the runtime starts PID 1)", EXIT_USAGE)
    if cfg.tty and not os.isatty(0):
        raise LaunchError("-t with --runtime needs a terminal on stdin (the runtime relays its own pty)",
                          EXIT_USAGE)


def _run_with_runtime(
    cfg: RunConfig,
    handle: UnionHandle,
    rootless: bool,
    base: str,
    root: str,
    container_id: str,
    hostname: str,
    env: dict[str, str],
    workdir: str,
    user: users.User | None,
    init_path: str,
    init_files: Sequence[str],
    volumes: Sequence[rootfs.Volume],
    tmpfs: Sequence[rootfs.TmpfsMount],
    locks: tuple[int, ...],
) -> int:
    """Start the container with the OCI runtime ``cfg.runtime`` on the union mounted at *root*.

    *locks* (the per-run directory's and the container layer's) stay held until the container is
    deleted, also by the watchdog that deletes it after a SIGKILL of the launcher: until then no
    other launch may sweep the per-run directory (which would unmount the runtime's state) or use
    the container layer.
    """
    from launcher import bundle

    mount_list = bundle.mounts(init_layer=init_path, init_files=init_files, volumes=volumes, tmpfs=tmpfs,
                               privileged=cfg.policy.privileged, rootless=rootless, net=cfg.net)
    config = bundle.config(root=root, args=cfg.command, env=env, cwd=workdir, hostname=hostname, user=user,
                           policy=cfg.policy, terminal=os.isatty(0), read_only=cfg.read_only,
                           net=cfg.net, mount_list=mount_list, limits=cfg.limits)
    path = os.path.join(base, "bundle")
    bundle.write(path, config)
    log.debug("OCI bundle %s for %s", path, cfg.runtime)
    code = bundle.run(bundle.find_runtime(cfg.runtime or ""), path, container_id, cfg.stop_timeout, locks)
    server = handle.poll()
    if server is not None:
        how = f"was killed by signal {-server}" if server < 0 else f"exited with status {server}"
        raise LaunchError(f"the union's FUSE server {how} while the command ran")
    if cfg.keep_mounted:
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)  # for sigwaitinfo, as without a runtime
        _wait_for_release(root, code)
    return code


def _write_init_layer(
    cfg: RunConfig,
    view: BranchView,
    path: str,
    hostname: str,
    workdir: str,
    volumes: Sequence[rootfs.Volume],
    tmpfs: Sequence[rootfs.TmpfsMount],
) -> tuple[list[str], list[rootfs.TmpfsMount]]:
    """Write the init layer at *path*: the container's files and the mount points the image lacks.

    Returns the init files written and the tmpfs mounts to make (``--tmpfs`` and, with
    ``--read-only``, those of ``rootfs.READ_ONLY_TMPFS`` whose place is a directory).
    """
    layer = rootfs.InitLayer(path, view)
    files = rootfs.write_init_layer(layer, hostname, _resolv_conf(cfg.net))
    for mp in INIT_MOUNTPOINTS:
        if not layer.directory(mp):
            raise LaunchError(f"the image's {mp} is not a directory; the container needs one there")
    layer.directory("/tmp", TMP_MODE)  # where the image has a symlink there, it stays one
    for vol in volumes:
        made = layer.directory(vol.dest) if os.path.isdir(vol.source) else layer.mount_file(vol.dest)
        if not made:
            raise LaunchError(f"--volume destination {vol.dest}: the image has a file, a directory or a "
                              "symlink in the way (give the path a symlink points to)", EXIT_USAGE)
    mounts = list(tmpfs)
    for t in tmpfs:
        if not layer.directory(t.dest):
            raise LaunchError(f"--tmpfs {t.dest}: the image has a file or a symlink in the way", EXIT_USAGE)
    if cfg.read_only:
        for dest, mode in rootfs.READ_ONLY_TMPFS:
            if dest not in {t.dest for t in tmpfs} and layer.directory(dest, mode):
                flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
                mounts.append(rootfs.TmpfsMount(dest, flags, f"mode={mode:o}"))
    layer.directory(workdir)  # Docker makes a missing working directory; a symlink is left to chdir
    layer.finish()
    return files, mounts


class Console(NamedTuple):
    """``-t``: the container end of the socket its pty master travels through, and the launcher's
    window size."""

    socket: socket.socket
    winsize: bytes | None


def _start_and_supervise(
    cfg: RunConfig,
    handle: UnionHandle,
    root: str,
    steps: Sequence[rootfs.Step],
    hostname: str,
    env: dict[str, str],
    workdir: str,
    user: users.User | None,
    rootless: bool,
    was_foreground: bool,
    cgroup: cgroups.RunCgroup | None = None,
) -> int:
    console: Console | None = None
    ours: socket.socket | None = None
    relay: terminal.Relay | None = None
    waited = {signal.SIGCHLD, *FORWARDED_SIGNALS}
    if cfg.tty or os.isatty(0):
        from launcher import terminal  # only for a pty: termios and threads cost every launch

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        console = Console(theirs, terminal.window_size(0) or terminal.window_size(1))
        waited.add(signal.SIGWINCH)
    # Signals wait in a queue from here on: the supervisor takes them with sigwaitinfo.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    if console is not None:
        relay = terminal.Relay()  # its thread now: none can be made once the PID namespace is unshared
    errr, errw = os.pipe()
    alive_r, alive_w = os.pipe()
    syscalls.unshare(syscalls.CLONE_NEWPID)  # our next child is PID 1 of a new namespace
    pid = os.fork()
    if pid == 0:
        if ours is not None:
            ours.close()
        _container_child(cfg, root, steps, hostname, env, workdir, user, rootless, errw, alive_r, old_mask,
                         console, cgroup)
    os.close(errw)
    os.close(alive_r)
    if console is not None and ours is not None and relay is not None:
        console.socket.close()
        master = terminal.receive_master(ours)
        if master is not None:
            relay.attach(master)
    try:
        failure = b""
        while chunk := os.read(errr, 4096):  # EOF: exec succeeded (or the child died)
            failure += chunk
        os.close(errr)
        timing.stamp("exec")
        code = _supervise(pid, handle, cfg.stop_timeout, relay.resize if relay is not None else None)
    finally:
        if relay is not None:
            relay.finish()
    _restore_terminal(was_foreground)
    if failure:
        raise LaunchError(failure.decode(errors="replace"), code)
    if cfg.keep_mounted:
        _wait_for_release(root, code)
    os.close(alive_w)
    return code
