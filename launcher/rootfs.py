"""The container's root filesystem: setup steps as data, applied in order, then pivot_root.

``container_steps()`` turns the run options into a list of small immutable
named tuples (make private, bind, proc, tmpfs, devpts, symlink, ...) and
``apply()`` runs them one after another inside the container's new mount
namespace.  Every path in a step is a path *inside* the container; ``apply()``
joins it to the new root.  ``enter_root()`` then swaps the root: pivot_root and
a detached unmount of the old root, or chroot (with a warning) where pivot_root
cannot work, such as a root on initramfs.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from launcher import syscalls

log = logging.getLogger(__name__)

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SYMLINKS = (
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
    ("pts/ptmx", "/dev/ptmx"),
)


def _inside(root: str, path: str) -> str:
    """*path* (absolute, inside the container) under *root*."""
    return os.path.join(root, path.lstrip("/")) if path != "/" else root


class MakePrivate(NamedTuple):
    """MS_REC | MS_PRIVATE on / of the current mount namespace; must come first."""

    def apply(self, root: str) -> None:
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, step="make / private")


class BindRoot(NamedTuple):
    """Bind the new root onto itself, so that it is a mount point of its own for pivot_root."""

    def apply(self, root: str) -> None:
        syscalls.mount(root, root, None, syscalls.MS_BIND | syscalls.MS_REC, step="bind new root")


class Mkdir(NamedTuple):
    dest: str
    mode: int = 0o755

    def apply(self, root: str) -> None:
        path = _inside(root, self.dest)
        try:
            os.mkdir(path, self.mode)
        except FileExistsError:
            pass
        except OSError as exc:
            raise OSError(exc.errno, "mkdir", path) from None


class Proc(NamedTuple):
    """A fresh procfs for the new PID namespace."""

    dest: str = "/proc"

    def apply(self, root: str) -> None:
        flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
        syscalls.mount("proc", _inside(root, self.dest), "proc", flags, step="mount proc")


class Tmpfs(NamedTuple):
    dest: str
    mode: int = 0o755
    flags: int = syscalls.MS_NOSUID | syscalls.MS_NODEV
    size: str | None = None

    def apply(self, root: str) -> None:
        data = f"mode={self.mode:o}" + (f",size={self.size}" if self.size else "")
        syscalls.mount("tmpfs", _inside(root, self.dest), "tmpfs", self.flags, data, step="mount tmpfs")


class BindDevice(NamedTuple):
    """Bind one host device node (e.g. /dev/null) onto an empty file of the same name."""

    name: str

    def apply(self, root: str) -> None:
        dest = _inside(root, "/dev/" + self.name)
        try:
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        except OSError as exc:
            raise OSError(exc.errno, "create device mount point", dest) from None
        syscalls.mount("/dev/" + self.name, dest, None, syscalls.MS_BIND, step="bind device")


class DevPts(NamedTuple):
    """A new devpts instance, so the container's ptys are its own."""

    dest: str = "/dev/pts"
    gid: int | None = 5  # the tty group; None where gid 5 is not mapped (rootless)

    def apply(self, root: str) -> None:
        data = "newinstance,ptmxmode=0666,mode=620" + (f",gid={self.gid}" if self.gid is not None else "")
        flags = syscalls.MS_NOSUID | syscalls.MS_NOEXEC
        syscalls.mount("devpts", _inside(root, self.dest), "devpts", flags, data, step="mount devpts")


class BindFile(NamedTuple):
    """Bind a file from outside the new root (the init layer) over its own view in the union.

    As Docker does for /etc/hosts and friends: the container may edit them, and the
    edits go to the launcher's copy, never up into the container layer.
    """

    source: str
    dest: str

    def apply(self, root: str) -> None:
        syscalls.mount(self.source, _inside(root, self.dest), None, syscalls.MS_BIND, step="bind init file")


class Symlink(NamedTuple):
    target: str
    dest: str

    def apply(self, root: str) -> None:
        path = _inside(root, self.dest)
        try:
            os.symlink(self.target, path)
        except OSError as exc:
            raise OSError(exc.errno, "symlink", path) from None


Step = MakePrivate | BindRoot | Mkdir | Proc | Tmpfs | BindDevice | DevPts | BindFile | Symlink

INIT_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


def container_steps(*, rootless: bool, init_layer: str | None = None) -> list[Step]:
    """The setup of a container root, in order: private propagation, the root bind, the init
    layer's files bound over themselves, /proc, /dev."""
    steps: list[Step] = [MakePrivate(), BindRoot()]
    if init_layer is not None:
        steps.extend(BindFile(_inside(init_layer, path), path) for path in INIT_FILES)
    steps.append(Proc())
    steps.append(Tmpfs("/dev", 0o755, syscalls.MS_NOSUID | syscalls.MS_STRICTATIME, size="64k"))
    steps.extend(BindDevice(name) for name in DEV_NODES)
    steps.append(Mkdir("/dev/pts"))
    steps.append(DevPts(gid=None if rootless else 5))
    steps.append(Mkdir("/dev/shm", 0o1777))
    steps.append(Tmpfs("/dev/shm", 0o1777))
    steps.extend(Symlink(target, dest) for target, dest in DEV_SYMLINKS)
    return steps


def apply(steps: Iterable[Step], root: str) -> None:
    """Apply *steps* in order under *root*; the first failure raises OSError naming its step and path."""
    for step in steps:
        log.debug("setup %s under %s", step, root)
        step.apply(root)


def enter_root(root: str, workdir: str = "/") -> None:
    """Make *root* the root of this mount namespace and change to *workdir* inside it.

    pivot_root(".", ".") stacks the old root under the new one; a detached
    unmount of "." then drops it, so no host path stays reachable.  Where
    pivot_root is refused with EINVAL (a root on initramfs) we fall back to
    moving the mount over / and chroot, with a warning: that is weaker, since
    the old root stays mounted underneath.
    """
    try:
        os.chdir(root)
    except OSError as exc:
        raise OSError(exc.errno, "chdir to new root", root) from None
    try:
        syscalls.pivot_root(".", ".")
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        log.warning("pivot_root %s refused (%s); falling back to chroot", root, os.strerror(exc.errno))
        try:
            syscalls.mount(".", "/", None, syscalls.MS_MOVE, step="move new root")
        except OSError:
            pass
        os.chroot(".")
    else:
        syscalls.umount2(".", syscalls.MNT_DETACH, step="detach old root")
    try:
        os.chdir(workdir)
    except OSError as exc:
        raise OSError(exc.errno, "chdir to working directory", workdir) from None


def write_init_layer(layer: str, hostname: str, resolv_conf: bytes, mountpoints: Sequence[str]) -> None:
    """Fill *layer* with the per-container files Docker keeps in its init layer.

    /etc/hostname, /etc/hosts and /etc/resolv.conf are this container's; the
    empty directories in *mountpoints* (proc, dev, ...) exist so that the
    container's mounts have somewhere to go even when the image lacks them,
    without a copy-up into the container layer.
    """
    etc = os.path.join(layer, "etc")
    os.makedirs(etc, 0o755, exist_ok=True)
    os.chmod(layer, 0o755)
    for mp in mountpoints:
        os.makedirs(_inside(layer, mp), 0o755, exist_ok=True)
    hosts = (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{hostname}\n"
    )
    files = {"hostname": (hostname + "\n").encode(), "hosts": hosts.encode(), "resolv.conf": resolv_conf}
    for name, data in files.items():
        path = os.path.join(etc, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
