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
import stat
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from launcher import syscalls
from unionfs.core.branchview import BranchView, components

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


class Sysfs(NamedTuple):
    """/sys: a sysfs, read-only unless *writable*; where the kernel refuses one (a user namespace
    that does not own the network namespace, i.e. rootless with --net host), a bind of the host's."""

    dest: str = "/sys"
    writable: bool = False

    def apply(self, root: str) -> None:
        path = _inside(root, self.dest)
        ro = 0 if self.writable else syscalls.MS_RDONLY
        flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
        try:
            syscalls.mount("sysfs", path, "sysfs", flags | ro, step="mount sysfs")
        except PermissionError:
            syscalls.mount("/sys", path, None, syscalls.MS_BIND | syscalls.MS_REC, step="bind /sys")
            if ro:
                ReadOnly(self.dest).apply(root)


class MaskPath(NamedTuple):
    """Hide *dest* as Docker does: /dev/null bound over a file, an empty read-only tmpfs over a
    directory; nothing where the kernel has no such entry."""

    dest: str

    def apply(self, root: str) -> None:
        path = _inside(root, self.dest)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OSError(exc.errno, "mask", path) from None
        if stat.S_ISDIR(st.st_mode):
            flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
            syscalls.mount("tmpfs", path, "tmpfs", flags, "mode=755", step="mask directory")
        else:
            syscalls.mount("/dev/null", path, None, syscalls.MS_BIND, step="mask file")


class ReadOnlyPath(NamedTuple):
    """Bind *dest* onto itself and make that read-only (/proc/sys and friends), if it exists."""

    dest: str

    def apply(self, root: str) -> None:
        path = _inside(root, self.dest)
        if not os.path.lexists(path):
            return
        syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC, step="bind read-only path")
        ReadOnly(self.dest).apply(root)


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


def _locked_flags(path: str) -> int:
    """The mount flags of the mount at *path* that a remount must keep (in a user namespace the
    kernel refuses to drop them)."""
    flags = os.statvfs(path).f_flag
    pairs = ((os.ST_NOSUID, syscalls.MS_NOSUID), (os.ST_NODEV, syscalls.MS_NODEV),
             (os.ST_NOEXEC, syscalls.MS_NOEXEC), (os.ST_NOATIME, syscalls.MS_NOATIME),
             (os.ST_NODIRATIME, syscalls.MS_NODIRATIME), (os.ST_RELATIME, syscalls.MS_RELATIME))
    return sum(ms for st, ms in pairs if flags & st)


class ReadOnly(NamedTuple):
    """Remount the bind mount at *dest* read-only (``--read-only`` for /, ``:ro`` for a volume)."""

    dest: str = "/"

    def apply(self, root: str) -> None:
        path = _inside(root, self.dest)
        flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | _locked_flags(path)
        syscalls.mount(None, path, None, flags, step="remount read-only")


class BindVolume(NamedTuple):
    """``-v HOST:CTR``: bind (recursively) a host file or directory onto its mount point in the union."""

    source: str
    dest: str

    def apply(self, root: str) -> None:
        syscalls.mount(self.source, _inside(root, self.dest), None, syscalls.MS_BIND | syscalls.MS_REC,
                       step="bind volume")


class Volume(NamedTuple):
    """A ``-v`` bind: host path, container path, read-only or not."""

    source: str
    dest: str
    readonly: bool = False


class TmpfsMount(NamedTuple):
    """A ``--tmpfs`` mount with the flags and data (mode=, size=, ...) the user gave."""

    dest: str
    flags: int
    data: str

    def apply(self, root: str) -> None:
        syscalls.mount("tmpfs", _inside(root, self.dest), "tmpfs", self.flags, self.data, step="mount tmpfs")


Step = (MakePrivate | BindRoot | ReadOnly | Mkdir | Proc | Tmpfs | BindDevice | DevPts | BindFile | BindVolume
        | TmpfsMount | Symlink | Sysfs | MaskPath | ReadOnlyPath)

MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
"""What Docker hides in /proc and /sys, and what it leaves readable only (not with --privileged)."""

INIT_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
READ_ONLY_TMPFS = (("/tmp", 0o1777), ("/var/tmp", 0o1777), ("/run", 0o755))
"""Where ``--read-only`` mounts a tmpfs, as podman's ``--read-only-tmpfs`` does by default."""


def container_steps(
    *,
    rootless: bool,
    init_layer: str | None = None,
    init_files: Sequence[str] = INIT_FILES,
    read_only: bool = False,
    volumes: Sequence[Volume] = (),
    tmpfs: Sequence[TmpfsMount] = (),
    privileged: bool = False,
) -> list[Step]:
    """The setup of a container root, in order: private propagation, the root bind (read-only with
    *read_only*), the init layer's files bound over themselves, /proc and /sys with Docker's masked
    and read-only paths (none when *privileged*, and /sys writable), /dev, then the volumes and
    tmpfs mounts, parents before children."""
    steps: list[Step] = [MakePrivate(), BindRoot()]
    if read_only:
        steps.append(ReadOnly("/"))
    if init_layer is not None:
        steps.extend(BindFile(_inside(init_layer, path), path) for path in init_files)
    steps.append(Proc())
    steps.append(Sysfs(writable=privileged))
    if not privileged:
        steps.extend(MaskPath(p) for p in MASKED_PATHS)
        steps.extend(ReadOnlyPath(p) for p in READ_ONLY_PATHS)
    steps.append(Tmpfs("/dev", 0o755, syscalls.MS_NOSUID | syscalls.MS_STRICTATIME, size="64k"))
    steps.extend(BindDevice(name) for name in DEV_NODES)
    steps.append(Mkdir("/dev/pts"))
    steps.append(DevPts(gid=None if rootless else 5))
    steps.append(Mkdir("/dev/shm", 0o1777))
    steps.append(Tmpfs("/dev/shm", 0o1777))
    steps.extend(Symlink(target, dest) for target, dest in DEV_SYMLINKS)
    mounts: list[Volume | TmpfsMount] = [*volumes, *tmpfs]
    for m in sorted(mounts, key=lambda m: len(components(m.dest))):
        if isinstance(m, Volume):
            steps.append(BindVolume(m.source, m.dest))
            if m.readonly:
                steps.append(ReadOnly(m.dest))
        else:
            steps.append(m)
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


class InitLayer:
    """The per-run branch between the container layer and the image: only what the image lacks.

    It holds /etc/hostname, /etc/hosts and /etc/resolv.conf, and the mount points
    (directories or empty files) the container needs and the image does not have.
    Every directory it must hold on the way to those carries the metadata (mode,
    owner, times) of the image's directory of that name: the union shows a
    directory's metadata from the topmost branch that has it, and a copy-up takes
    it from there too, so a bare directory here would shadow the image's ``/etc``
    or ``/tmp`` and be copied up into the container layer with the wrong mode.  A
    name the image has as a symlink (``/var/run``, say) stays a symlink: nothing
    is put under it.  *view* is the union of the branches around the init layer.
    """

    def __init__(self, path: str, view: BranchView) -> None:
        self.path = path
        self.view = view
        self._times: dict[str, os.stat_result] = {}
        os.makedirs(path, 0o755, exist_ok=True)
        root = view.lstat("/")
        if root is not None:
            self._copy_metadata(path, root)
            self._times[path] = root

    def directory(self, dest: str, mode: int = 0o755) -> bool:
        """Make *dest* a directory in the union; False (nothing made) where the image has a non-directory
        at *dest* or on the way to it."""
        return self._make(dest, mode, is_dir=True)

    def mount_file(self, dest: str) -> bool:
        """Make *dest* exist as a file in the union (an empty one here if the image lacks it), as a
        mount point for a file; False where the image has a directory there or a non-directory on the way."""
        return self._make(dest, 0o644, is_dir=False)

    def write_file(self, dest: str, data: bytes) -> bool:
        """Put the file *dest* here with *data*; False where its parent cannot be made a directory."""
        parent, _, _ = dest.rpartition("/")
        if not self._make(parent or "/", 0o755, is_dir=True, here=True):
            return False
        path = self._inside(dest)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        return True

    def finish(self) -> None:
        """Give the directories copied from the image the image's times, deepest first (creating their
        children changed them)."""
        for path in sorted(self._times, key=len, reverse=True):
            st = self._times[path]
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _inside(self, dest: str) -> str:
        return _inside(self.path, "/" + "/".join(components(dest)))

    def _make(self, dest: str, mode: int, *, is_dir: bool, here: bool = False) -> bool:
        """Make *dest* exist in the union, in this layer only where the image lacks it (or, with
        *here*, in this layer in any case)."""
        names = components(dest)
        found = self.view.walk(dest)
        if len(found) == len(names) and names and stat.S_ISDIR(found[-1].st_mode) != is_dir:
            return False
        if len(found) == len(names) and not here:
            return True
        if any(not stat.S_ISDIR(st.st_mode) for st in found):
            return False
        path = self.path
        for i, name in enumerate(names):
            path = os.path.join(path, name)
            last = i == len(names) - 1
            if i < len(found):
                if not os.path.isdir(path):
                    os.mkdir(path, 0o700)
                    self._copy_metadata(path, found[i])
                    self._times[path] = found[i]
            elif last and not is_dir:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode))
                os.chmod(path, mode)
            elif not os.path.isdir(path):
                os.mkdir(path, 0o700)
                os.chmod(path, mode if last else 0o755)
        return True

    @staticmethod
    def _copy_metadata(path: str, st: os.stat_result) -> None:
        try:
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
        except OSError as exc:  # rootless: an owner the user namespace cannot map
            log.debug("init layer %s: keeping our owner, not %d:%d (%s)", path, st.st_uid, st.st_gid,
                      os.strerror(exc.errno or 0))
        os.chmod(path, stat.S_IMODE(st.st_mode), follow_symlinks=False)


def write_init_layer(layer: InitLayer, hostname: str, resolv_conf: bytes) -> list[str]:
    """Write the per-container files Docker keeps in its init layer; the ones written (all three,
    unless the image's /etc is not a directory)."""
    hosts = (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{hostname}\n"
    )
    files = {"/etc/hostname": (hostname + "\n").encode(), "/etc/hosts": hosts.encode(),
             "/etc/resolv.conf": resolv_conf}
    written = [path for path, data in files.items() if layer.write_file(path, data)]
    if len(written) < len(files):
        missing = ", ".join(sorted(set(files) - set(written)))
        log.warning("the image's /etc is not a directory: no %s", missing)
    return written
