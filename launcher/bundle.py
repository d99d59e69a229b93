"""``unionfs run --runtime``: an OCI runtime bundle for the union, and runc (or crun) to start it.

The launcher mounts the union as always, in its private mount namespace, then writes
``config.json`` (runtime-spec 1.0) into the per-run directory and runs ``RUNTIME run
--bundle DIR ID`` from that same namespace: the runtime makes the container's mount
namespace as a child of ours, so it sees the union.  ``config()`` builds the
configuration from what the built-in set-up would do (``rootfs.container_steps``,
``security.Policy``), so that both paths give the command the same view:

- process: args, env, cwd, user with its supplementary groups, terminal, capabilities
  (the policy's set, less what the launcher itself lacks, as bounding, effective and
  permitted for root; a ``--user`` other than root keeps the bounding set only, as under
  the built-in path), RLIMIT_NOFILE as
  the launcher's own (a runtime's default of 1048576 fails above our hard limit),
  noNewPrivileges;
- root: the union, read-only with ``--read-only``; the hostname;
- mounts: /proc, a /dev tmpfs with devpts, shm and mqueue, /sys (read-only unless
  privileged), the init layer's /etc/hostname, /etc/hosts and /etc/resolv.conf bound
  over themselves, then ``-v`` binds and tmpfs mounts, parents first;
- linux: pid, mount, ipc and uts namespaces (network for ``--net none``), Docker's masked
  and read-only paths, and the built-in seccomp deny list written as an OCI profile.

``run()`` starts the runtime with our stdio, forwards signals to it (runc passes them on
to the container's PID 1), SIGKILLs the container with ``RUNTIME kill`` when SIGTERM's
``--stop-timeout`` runs out, and always ends with ``RUNTIME delete --force``: the launcher
does, or, when it was SIGKILLed, a small watchdog process does (``RUNTIME kill`` first).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from launcher import rootfs, security, syscalls
from launcher.cgroups import CPU_PERIOD_US, Limits
from launcher.errors import EXIT_LAUNCH_FAILED, EXIT_USAGE, LaunchError
from launcher.stopping import FORWARDED_SIGNALS, StopClock
from launcher.users import User
from unionfs.core.branchview import components

log = logging.getLogger(__name__)

OCI_VERSION = "1.0.2"
KNOWN_RUNTIMES = ("runc", "crun")
MOUNT_OPTIONS = (
    (syscalls.MS_RDONLY, "ro"), (syscalls.MS_NOSUID, "nosuid"), (syscalls.MS_NODEV, "nodev"),
    (syscalls.MS_NOEXEC, "noexec"), (syscalls.MS_STRICTATIME, "strictatime"),
)
"""Mount flags as the runtime spec's mount options spell them."""


def find_runtime(name: str) -> str:
    """The executable for ``--runtime NAME``: ``runc`` or ``crun`` from PATH, or an absolute path.

    Raises LaunchError (one line, exit 125) when it is missing or not executable.
    """
    if name in KNOWN_RUNTIMES:
        path = shutil.which(name)
        if path is None:
            raise LaunchError(f"--runtime {name}: not found on PATH (apt-get install {name})")
        return path
    if not os.path.isabs(name):
        raise LaunchError(f"--runtime {name}: give runc, crun or an absolute path to an OCI runtime",
                          EXIT_USAGE)
    if not os.path.isfile(name) or not os.access(name, os.X_OK):
        raise LaunchError(f"--runtime {name}: not an executable file")
    return name


def _options(flags: int, data: str = "") -> list[str]:
    return [opt for bit, opt in MOUNT_OPTIONS if flags & bit] + [d for d in data.split(",") if d]


def mounts(
    *,
    init_layer: str,
    init_files: Sequence[str],
    volumes: Sequence[rootfs.Volume],
    tmpfs: Sequence[rootfs.TmpfsMount],
    privileged: bool,
    rootless: bool = False,
    net: str = "host",
) -> list[dict[str, Any]]:
    """The ``mounts`` of config.json, in the built-in set-up's order (``rootfs.container_steps``).

    *rootless* (the runtime runs as root of the launcher's user namespace): devpts without
    gid=5, which may not be mapped, and with ``--net host`` a bind of the host's /sys, since
    the kernel refuses a sysfs to a user namespace that does not own the network namespace.
    """
    sys_options = ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"])
    devpts = ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    if not rootless:
        devpts.append("gid=5")
    sys_mount = {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options}
    if rootless and net != "none":
        sys_mount.update(type="bind", source="/sys", options=["rbind", *sys_options])
    result: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=64k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": devpts},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        sys_mount,
    ]
    result += [{"destination": path, "type": "bind", "source": os.path.join(init_layer, path.lstrip("/")),
                "options": ["bind"]} for path in init_files]
    extra: list[rootfs.Volume | rootfs.TmpfsMount] = [*volumes, *tmpfs]
    for m in sorted(extra, key=lambda m: len(components(m.dest))):
        if isinstance(m, rootfs.Volume):
            result.append({"destination": m.dest, "type": "bind", "source": m.source,
                           "options": ["rbind", "ro" if m.readonly else "rw"]})
        else:
            result.append({"destination": m.dest, "type": "tmpfs", "source": "tmpfs",
                           "options": _options(m.flags, m.data)})
    return result


def seccomp_profile(*, allow_sys_admin: bool) -> dict[str, Any]:
    """``security.seccomp_program``'s deny list as an OCI seccomp profile (x86_64 system call names).

    Everything is allowed but the listed calls, which fail EPERM; without CAP_SYS_ADMIN also
    mounting, unshare, setns and a clone with any CLONE_NEW* flag, and clone3 fails ENOSYS so
    that libc falls back to clone.
    """
    denied = sorted({*security.X86_64_DENIED, *(() if allow_sys_admin else security.X86_64_SYS_ADMIN)})
    rules: list[dict[str, Any]] = [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}]
    if not allow_sys_admin:
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
        flag = 1
        while flag <= security.CLONE_NEW_FLAGS:  # one rule a flag: the spec's conditions are ANDed
            if flag & security.CLONE_NEW_FLAGS:
                rules.append({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
                              "args": [{"index": 0, "value": flag, "valueTwo": flag,
                                        "op": "SCMP_CMP_MASKED_EQ"}]})
            flag <<= 1
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": rules}


def _own_bounding_set() -> int:
    """The launcher's own capability bounding set (CapBnd); all bits when /proc cannot say."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapBnd:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return (1 << len(security.CAP_NAMES)) - 1


def config(
    *,
    root: str,
    args: Sequence[str],
    env: dict[str, str],
    cwd: str,
    hostname: str,
    user: User | None,
    policy: security.Policy,
    terminal: bool,
    read_only: bool,
    net: str,
    mount_list: list[dict[str, Any]],
    limits: Limits | None = None,
) -> dict[str, Any]:
    """The config.json of a bundle whose root is the union at *root*."""
    own = _own_bounding_set()  # a runtime refuses what it cannot grant; the built-in path drops the rest
    caps = [f"CAP_{security.CAP_NAMES[c]}" for c in sorted(policy.caps) if own >> c & 1]
    held = caps if user is None or user.uid == 0 else []  # a --user other than root holds none
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    process: dict[str, Any] = {
        "terminal": terminal,
        "user": {"uid": user.uid if user else 0, "gid": user.gid if user else 0},
        "args": list(args),
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": held, "permitted": held},
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}],
        "noNewPrivileges": policy.no_new_privs,
    }
    if user is not None:
        process["user"]["additionalGids"] = list(user.groups)
    namespaces = [{"type": t} for t in ("pid", "mount", "ipc", "uts")]
    if net == "none":
        namespaces.append({"type": "network"})
    linux: dict[str, Any] = {"namespaces": namespaces}
    if limits is not None and limits.any():
        linux["resources"] = resources(limits)
    if not policy.privileged:
        linux["maskedPaths"] = list(rootfs.MASKED_PATHS)
        linux["readonlyPaths"] = list(rootfs.READ_ONLY_PATHS)
    if policy.seccomp:
        if os.uname().machine == "x86_64":
            linux["seccomp"] = seccomp_profile(allow_sys_admin=security.CAP["SYS_ADMIN"] in policy.caps)
        else:
            log.warning("no seccomp profile for %s: the container runs without one", os.uname().machine)
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": root, "readonly": read_only},
        "hostname": hostname,
        "mounts": mount_list,
        "linux": linux,
    }


def resources(limits: Limits) -> dict[str, Any]:
    """``linux.resources`` for --memory, --memory-swap, --pids-limit and --cpus, as the built-in
    set-up writes them into its own cgroup (the runtime makes the cgroup and applies them)."""
    out: dict[str, Any] = {}
    if limits.memory is not None:
        swap = limits.memory_swap if limits.memory_swap is not None else 2 * limits.memory
        out["memory"] = {"limit": limits.memory, "swap": swap}
    if limits.pids is not None:
        out["pids"] = {"limit": limits.pids}
    if limits.cpus is not None:
        out["cpu"] = {"quota": round(limits.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
    return out


def write(bundle: str, cfg: dict[str, Any]) -> None:
    """Write *cfg* as *bundle*/config.json (the directory is made, mode 0700)."""
    os.makedirs(bundle, 0o700, exist_ok=True)
    fd = os.open(os.path.join(bundle, "config.json"),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=1)


def _spawn(argv: Sequence[str], old_mask: set[int | signal.Signals]) -> int:
    """Fork and exec *argv* with our stdio, the signal mask we had, and SIGKILL if we die."""
    pid = os.fork()
    if pid == 0:
        try:
            syscalls.set_pdeathsig(signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.execv(argv[0], list(argv))
        except BaseException as exc:  # noqa: B036 - nothing may escape a forked child
            os.write(2, f"unionfs run: {argv[0]}: {exc}\n".encode(errors="replace"))
        finally:
            os._exit(EXIT_LAUNCH_FAILED)
    return pid


def _watchdog(base: Sequence[str], container_id: str, keep: Sequence[int]) -> tuple[int, int]:
    """A process that kills and deletes the container if the launcher dies before it has (SIGKILL).

    The runtime dies with the launcher (its parent-death signal), but the container's
    processes would live on with the union gone from under them.  The watchdog waits on a
    pipe whose write end only the launcher holds: a byte means "done, just exit"; EOF
    without one means the launcher is gone.  It keeps the fds *keep* (the launch's locks) open
    until it is done, and no other.  Returns (its pid, the write end).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            kept = sorted({r, *keep})
            for low, high in zip([2, *kept], [*kept, os.sysconf("SC_OPEN_MAX")], strict=True):
                os.closerange(low + 1, high)  # nothing else: the union's fds are not ours to hold
            if os.read(r, 1) == b"":
                for verb in (["kill", container_id, "KILL"], ["delete", "--force", container_id]):
                    os.waitpid(os.posix_spawn(base[0], [*base, *verb], {}), 0)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w


def _runtime(argv: Sequence[str]) -> None:
    """Run a runtime subcommand (kill, delete) to completion; its output is logged, not shown."""
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    log.debug("%s: status %d %s", " ".join(argv), r.returncode, r.stderr.strip())


def run(runtime: str, bundle: str, container_id: str, stop_timeout: float, locks: Sequence[int] = ()) -> int:
    """``RUNTIME run --bundle BUNDLE ID`` in the foreground; its status (the command's).

    The runtime's state lives in *bundle*/state.  Signals reach the runtime, which passes
    them on to the container's PID 1; after SIGTERM, a container still running when
    *stop_timeout* seconds have passed gets SIGKILL (status 137), as ``docker stop`` does.
    The container is deleted in any case; a watchdog process holds the fds *locks* until it is.
    """
    base = [runtime, "--root", os.path.join(bundle, "state")]
    waited = {signal.SIGCHLD, *FORWARDED_SIGNALS}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    watchdog, done = _watchdog(base, container_id, locks)
    try:
        pid = _spawn([*base, "run", "--bundle", bundle, container_id], old_mask)
        clock = StopClock(stop_timeout)
        while True:
            info = clock.wait(waited)
            if info is None:
                log.debug("the container still runs %.1fs after SIGTERM: SIGKILL", stop_timeout)
                _runtime([*base, "kill", container_id, "KILL"])  # only the runtime's exit is left
                continue
            if info.si_signo != signal.SIGCHLD:
                if info.si_signo == signal.SIGTERM:
                    clock.start()
                try:
                    os.kill(pid, info.si_signo)
                except ProcessLookupError:
                    pass
                continue
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code
    finally:
        _runtime([*base, "delete", "--force", container_id])
        os.write(done, b"x")
        os.close(done)
        os.waitpid(watchdog, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
