"""Namespaces: the launcher's private mount (and user) namespace, uid/gid maps, loopback.

The process tree of ``unionfs run`` is::

    launcher          private mount namespace (+ user namespace when rootless)
    ├── FUSE server   same namespaces as the launcher; dies with it (PR_SET_PDEATHSIG)
    └── command       PID 1 of new PID, mount, UTS, IPC (and network) namespaces

The launcher's mount namespace is private: the union is mounted there, never in
the host's, so when the launcher, the server and the command are gone the
kernel frees the namespace and every mount in it, even after SIGKILL.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import socket
import struct
from typing import NamedTuple

from launcher import syscalls

log = logging.getLogger(__name__)


class IdRange(NamedTuple):
    """A subordinate id range from /etc/subuid or /etc/subgid."""

    start: int
    length: int


def subordinate_range(path: str, uid: int) -> IdRange | None:
    """The first range in *path* (``/etc/subuid`` format) for *uid*, by name or number."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0].startswith("#"):
            continue
        if parts[0] in (str(uid), name):
            try:
                rng = IdRange(int(parts[1]), int(parts[2]))
            except ValueError:
                continue
            if rng.length > 0:
                return rng
    return None


def make_mounts_private(step: str = "make / private") -> None:
    """Stop mount events propagating to and from the host: MS_REC | MS_PRIVATE on /.

    Must come first in a new mount namespace: pivot_root refuses a shared root,
    and without it our mounts would show up on the host.
    """
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, step=step)


def write_control(path: str, text: str, step: str = "write") -> None:
    """Write *text* to the kernel control file *path* (an id map, a cgroup file) in one write; an
    OSError names the step, the text and the path."""
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(text)
    except OSError as exc:
        raise OSError(exc.errno, f"{step} {text.strip()!r} to", path) from None


class _IdMapHelper:
    """A process forked before the launcher unshares its user namespace.

    newuidmap/newgidmap are setuid programs that must run outside the new user
    namespace; this helper waits until told, then maps the launcher's ids.
    """

    def __init__(self, uid: int, gid: int, subuid: IdRange, subgid: IdRange) -> None:
        import shutil

        self.target = os.getpid()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # helper
            try:
                os.close(wfd)
                os.read(rfd, 1)
                rc = os.spawnv(
                    os.P_WAIT,
                    shutil.which("newuidmap") or "newuidmap",
                    ["newuidmap", str(self.target), "0", str(uid), "1", "1", str(subuid.start),
                     str(subuid.length)],
                )
                if rc == 0:
                    rc = os.spawnv(
                        os.P_WAIT,
                        shutil.which("newgidmap") or "newgidmap",
                        ["newgidmap", str(self.target), "0", str(gid), "1", "1", str(subgid.start),
                         str(subgid.length)],
                    )
            except BaseException:
                os._exit(99)
            os._exit(rc)
        os.close(rfd)
        self.pid = pid
        self.wfd = wfd

    def run(self) -> bool:
        os.write(self.wfd, b"x")
        os.close(self.wfd)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    def cancel(self) -> None:
        os.close(self.wfd)
        os.waitpid(self.pid, 0)


def enter_launcher_namespaces(rootless: bool) -> None:
    """Move the launcher into its own private mount namespace (and user namespace when rootless).

    Call while the process is still single-threaded.  In rootless mode the
    calling user becomes root of the new user namespace: one uid by default, or
    the user's /etc/subuid and /etc/subgid ranges above it when newuidmap and
    newgidmap exist.
    """
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # unshare(CLONE_NEWUSER | CLONE_NEWNS) fails with EINVAL then; say why
        raise OSError(errno.EINVAL, f"unshare needs a single-threaded launcher, not {threads} threads in",
                      "/proc/self/task")
    if not rootless:
        syscalls.unshare(syscalls.CLONE_NEWNS)
        make_mounts_private()
        return
    import shutil

    uid, gid = os.getuid(), os.getgid()
    helper: _IdMapHelper | None = None
    subuid = subordinate_range("/etc/subuid", uid)
    subgid = subordinate_range("/etc/subgid", uid)
    if subuid and subgid and shutil.which("newuidmap") and shutil.which("newgidmap"):
        helper = _IdMapHelper(uid, gid, subuid, subgid)
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
    except OSError as exc:
        if helper:
            helper.cancel()
        if exc.errno in (errno.EPERM, errno.ENOSPC, errno.EUSERS):
            raise OSError(
                exc.errno,
                "unshare(user namespace): unprivileged user namespaces are disabled here "
                "(sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces)",
                None,
            ) from None
        raise
    if helper is None or not helper.run():
        if helper is not None:
            log.warning("newuidmap/newgidmap failed; mapping only uid %d and gid %d", uid, gid)
        write_control("/proc/self/setgroups", "deny")
        write_control("/proc/self/uid_map", f"0 {uid} 1\n")
        write_control("/proc/self/gid_map", f"0 {gid} 1\n")
    else:
        log.debug("mapped uid %d + %s and gid %d + %s", uid, subuid, gid, subgid)
    make_mounts_private()


def enter_subordinate_namespace() -> bool:
    """Rootless with /etc/subuid and /etc/subgid ranges and newuidmap: become root of a user (and
    mount) namespace that maps them, as rootless podman does for its store; whether it did.  For root,
    or a user without ranges, nothing happens."""
    import shutil

    uid = os.getuid()
    if uid == 0 or not (shutil.which("newuidmap") and shutil.which("newgidmap")):
        return False
    if subordinate_range("/etc/subuid", uid) is None or subordinate_range("/etc/subgid", uid) is None:
        return False
    enter_launcher_namespaces(rootless=True)
    return True


def bring_loopback_up() -> None:
    """Set IFF_UP on ``lo`` in the current network namespace (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        try:
            flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
        except OSError as exc:
            raise OSError(exc.errno, "bring up loopback", "lo") from None
