"""Resource limits for ``unionfs run`` (``--memory``, ``--memory-swap``, ``--pids-limit``, ``--cpus``).

Each run that asks for a limit gets a cgroup of its own, ``unionfs/<run-id>``:

* cgroup v1, per controller (memory, pids, cpu), under the launcher's own cgroup in that
  controller's hierarchy (as ``/proc/self/cgroup`` names it), so that the limits of the
  cgroup the launcher was started in still hold for the container;
* cgroup v2, under the highest cgroup above the launcher's own whose ``cgroup.procs`` the
  user may write: the root for root, the delegated subtree (``user@UID.service``) for
  a user.  Without such a subtree a user's limits are refused, never ignored.

The launcher makes the cgroup and writes the limits before it forks; it opens each
``cgroup.procs`` and the container's PID 1 writes ``0`` to them first thing after the
fork, so every instruction of the command, and every process it starts, runs under the
limits.  The launcher holds a ``flock`` on each run cgroup while it runs and removes it at
the end; a cgroup left by a SIGKILLed launcher (no lock, no process) is removed by the next
launch, as ``launcher.state`` does with per-run directories.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import NamedTuple

from launcher import namespaces, state
from launcher.errors import LaunchError
from unionfs.core import mountinfo

log = logging.getLogger(__name__)

PARENT = "unionfs"
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000  # as docker's --cpus: the quota is cpus times this period
MIN_MEMORY = 6 * 1024 * 1024  # docker refuses less: a process barely starts in it
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?$", re.IGNORECASE)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_REMOVE_TIMEOUT = 2.0  # seconds to wait for the last exiting task to leave the cgroup


class Limits(NamedTuple):
    """What the user asked for; None: no limit."""

    memory: int | None = None  # bytes
    memory_swap: int | None = None  # memory plus swap, bytes; -1 unlimited swap; None: twice memory
    pids: int | None = None
    cpus: float | None = None

    def any(self) -> bool:
        return any(x is not None for x in self)

    def controllers(self) -> list[str]:
        given = {"memory": self.memory, "pids": self.pids, "cpu": self.cpus}
        return [c for c in CONTROLLERS if given[c] is not None]

    def flags(self) -> str:
        names = {"memory": "--memory", "pids": "--pids-limit", "cpu": "--cpus"}
        return ", ".join(names[c] for c in self.controllers())


def parse_size(text: str) -> int:
    """Bytes in *text* as docker reads --memory: ``512m``, ``1g``, ``1.5G``, ``64MiB``, ``1048576``."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (as 512m, 1g or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def make_limits(memory: str | None, memory_swap: str | None, pids: int | None, cpus: float | None) -> Limits:
    """Limits from the flags as docker spells them; ValueError (one sentence) for a bad value."""
    mem = parse_size(memory) if memory is not None else None
    if mem is not None and mem < MIN_MEMORY:
        raise ValueError(f"--memory {memory}: the minimum is 6m")
    swap: int | None = None
    if memory_swap is not None:
        if mem is None:
            raise ValueError("--memory-swap needs --memory (it is the limit of memory plus swap)")
        swap = -1 if memory_swap.strip() == "-1" else parse_size(memory_swap)
        if swap != -1 and swap < mem:
            raise ValueError(f"--memory-swap {memory_swap} is less than --memory {memory} (it counts both)")
    if pids is not None and pids <= 0:
        pids = None  # docker: 0 or -1 means no limit
    if cpus is not None:
        available = os.cpu_count() or 1
        if not 0.01 <= cpus <= available:
            raise ValueError(f"--cpus {cpus}: the range is 0.01 to {available} (the CPUs this host has)")
    return Limits(mem, swap, pids, cpus)


class Hierarchy(NamedTuple):
    """Where one controller lives: its cgroup mount, and the launcher's own cgroup directory in it."""

    version: int  # 1 or 2
    mountpoint: str
    own: str  # the launcher's cgroup: a directory under mountpoint


class Mount(NamedTuple):
    """A cgroup mount: its type, where it is, the cgroup at its top, its super options."""

    fstype: str  # cgroup (v1) or cgroup2
    mountpoint: str
    root: str
    options: frozenset[str]


def parse_own(text: str) -> dict[str, str]:
    """Hierarchy key (a v1 controller list, or "" for v2) -> our cgroup path, from /proc/PID/cgroup."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        out[controllers] = path
    return out


def _cgroup_mounts(found: Iterable[mountinfo.Mount]) -> list[Mount]:
    return [Mount(m.fstype, os.fsdecode(m.point), os.fsdecode(m.root), frozenset(m.super_options.split(",")))
            for m in found if m.fstype in ("cgroup", "cgroup2")]


def parse_mounts(text: str) -> list[Mount]:
    """The cgroup mounts in /proc/PID/mountinfo *text*."""
    return _cgroup_mounts(mountinfo.parse(os.fsencode(text)))


def _inside(mount: Mount, path: str) -> str:
    """The directory of cgroup *path* under *mount*; the mount itself when *path* is not below its root."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return mount.mountpoint
    return os.path.join(mount.mountpoint, path[len(root):].lstrip("/")).rstrip("/") or mount.mountpoint


def place(own: dict[str, str], mounts: list[Mount], v2_available: list[str]) -> dict[str, Hierarchy]:
    """Controller -> its hierarchy: the v1 one it is bound to, else the v2 one where it is available
    (*v2_available*: the v2 root's cgroup.controllers)."""
    found: dict[str, Hierarchy] = {}
    for m in mounts:
        if m.fstype != "cgroup":
            continue
        for controller in CONTROLLERS:
            key = next((k for k in own if controller in k.split(",")), None)
            if controller in m.options and controller not in found and key is not None:
                found[controller] = Hierarchy(1, m.mountpoint, _inside(m, own[key]))
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is not None and "" in own:
        for controller in CONTROLLERS:
            if controller in v2_available and controller not in found:
                found[controller] = Hierarchy(2, v2.mountpoint, _inside(v2, own[""]))
    return found


def hierarchies() -> dict[str, Hierarchy]:
    """Controller -> its hierarchy, for those of CONTROLLERS this host has (v1 where bound there)."""
    with open("/proc/self/cgroup", encoding="utf-8", errors="surrogateescape") as f:
        own = parse_own(f.read())
    mounts = _cgroup_mounts(mountinfo.mounts())
    available: list[str] = []
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is not None:
        try:
            with open(os.path.join(v2.mountpoint, "cgroup.controllers"), encoding="ascii") as f:
                available = f.read().split()
        except OSError as exc:
            log.debug("%s/cgroup.controllers: %s", v2.mountpoint, os.strerror(exc.errno or 0))
    return place(own, mounts, available)


def _delegated_base(h: Hierarchy) -> str | None:
    """The highest cgroup from the launcher's own up to the mount whose cgroup.procs we may write."""
    best = None
    path = h.own
    while True:
        if os.access(os.path.join(path, "cgroup.procs"), os.W_OK):
            best = path
        if path.rstrip("/") == h.mountpoint.rstrip("/") or len(path) <= len(h.mountpoint):
            return best
        path = os.path.dirname(path)


def _write(path: str, value: str) -> None:
    namespaces.write_control(path, value, "cgroup: write")


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def sweep_stale(parent: str) -> None:
    """Remove the run cgroups in *parent* that no live launcher holds (their launcher was killed)."""
    try:
        names = [e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for name in names:
        state.remove_unheld(os.path.join(parent, name))


def sweep_all() -> None:
    """At every start, best effort: remove the cgroups that SIGKILLed launchers left where ours would go."""
    try:
        found = hierarchies()
    except (OSError, ValueError) as exc:
        log.debug("no cgroups to sweep: %s", exc)
        return
    for h in set(found.values()):
        base = h.own if h.version == 1 else _delegated_base(h)
        if base is not None and os.path.isdir(os.path.join(base, PARENT)):
            sweep_stale(os.path.join(base, PARENT))
            _rmdir_quiet(os.path.join(base, PARENT))


def _rmdir_quiet(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:  # another run's cgroup is in it, or it is gone already
        log.debug("kept cgroup %s: %s", path, os.strerror(exc.errno or 0))


class RunCgroup:
    """One run's cgroups (one per v1 controller, or one v2 cgroup), locked while the run lasts.

    ``procs`` are open ``cgroup.procs`` files: the container's PID 1 writes ``0`` to each
    (``join()``) before anything else.  ``remove()`` at the end never raises.
    """

    def __init__(self, limits: Limits, run_id: str) -> None:
        self.paths: list[str] = []
        self.procs: list[int] = []
        self._locks: list[int] = []
        try:
            self._make(limits, run_id)
        except BaseException:
            self.remove()
            raise

    def _make(self, limits: Limits, run_id: str) -> None:
        found = hierarchies()
        wanted = limits.controllers()
        missing = [c for c in wanted if c not in found]
        if missing:
            raise LaunchError(f"{limits.flags()}: this host has no {' or '.join(missing)} cgroup controller "
                              "mounted (see /proc/self/cgroup and /sys/fs/cgroup)")
        groups: dict[Hierarchy, list[str]] = {}
        for c in wanted:
            groups.setdefault(found[c], []).append(c)
        for h, controllers in groups.items():
            base = self._base(h, limits)
            path = self._mkdir(base, run_id, controllers if h.version == 2 else [])
            for c in controllers:
                _limit(h.version, path, c, limits)
            self.procs.append(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
            log.debug("cgroup %s (v%d) for %s", path, h.version, ", ".join(controllers))

    @staticmethod
    def _base(h: Hierarchy, limits: Limits) -> str:
        if h.version == 1 and os.geteuid() != 0:
            raise LaunchError(f"{limits.flags()}: resource limits need root or a delegated cgroup v2 "
                              f"subtree, and this host has cgroup v1 ({h.mountpoint})")
        if not os.path.isdir(h.own):
            raise LaunchError(f"{limits.flags()}: our cgroup is not under {h.mountpoint} (no {h.own})")
        if h.version == 1:
            return h.own
        base = _delegated_base(h)
        if base is None:
            raise LaunchError(f"{limits.flags()}: resource limits need root or a delegated cgroup v2 subtree "
                              f"(no cgroup above {h.own} has a cgroup.procs uid {os.geteuid()} may write)")
        return base

    def _mkdir(self, base: str, run_id: str, enable: list[str]) -> str:
        """Make BASE/unionfs/RUN_ID, locked; on v2 with *enable* on in the subtree_control above it."""
        parent = os.path.join(base, PARENT)
        if enable:
            _enable(base, enable)
        for _attempt in range(5):
            path = os.path.join(parent, run_id)
            try:
                try:
                    os.mkdir(parent, 0o755)
                except FileExistsError:
                    pass
                if enable:
                    _enable(parent, enable)
                sweep_stale(parent)
                os.mkdir(path, 0o755)
            except FileNotFoundError:  # another launcher removed the empty parent meanwhile
                continue
            except OSError as exc:
                raise OSError(exc.errno, "cgroup: mkdir", path) from None
            self.paths.append(path)
            try:
                fd = os.open(path, _DIR_FLAGS)
            except FileNotFoundError:  # another launcher's sweep took it between our mkdir and open
                self.paths.pop()
                continue
            self._locks.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.path.samestat(os.fstat(fd), os.lstat(path)):
                    return path
            except OSError:  # ... or between our open and flock
                pass
        raise LaunchError(f"could not make a cgroup in {parent}")

    def join_in_child(self) -> None:
        """In the container's PID 1, before anything else: move into the run's cgroups."""
        for fd in self.procs:
            try:
                os.write(fd, b"0")
            except OSError as exc:
                raise OSError(exc.errno, "cgroup: join", f"/proc/self/fd/{fd}") from None
            os.close(fd)

    def remove(self) -> None:
        """Remove the run's cgroups (and the unionfs/ above them when it is left empty); never raises."""
        for fd in self.procs:
            os.close(fd)
        self.procs = []
        for path in self.paths:
            deadline = time.monotonic() + _REMOVE_TIMEOUT
            while True:
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.01)  # the last task of the run is still leaving
                        continue
                    if exc.errno != errno.ENOENT:
                        log.warning("could not remove cgroup %s: %s", path, os.strerror(exc.errno or 0))
                break
            _rmdir_quiet(os.path.dirname(path))
        self.paths = []
        for fd in self._locks:
            os.close(fd)
        self._locks = []


def _enable(path: str, controllers: list[str]) -> None:
    """Turn *controllers* on for the children of the v2 cgroup *path*, where they are not yet."""
    available = _read(os.path.join(path, "cgroup.controllers")).split()
    lacking = [c for c in controllers if c not in available]
    if lacking:
        raise LaunchError(f"the cgroup {path} has no {' or '.join(lacking)} controller to give the run "
                          f"(its cgroup.controllers: {' '.join(available) or 'none'})")
    control = os.path.join(path, "cgroup.subtree_control")
    on = _read(control).split()
    todo = [c for c in controllers if c not in on]
    if todo:
        _write(control, " ".join(f"+{c}" for c in todo))


def _limit(version: int, path: str, controller: str, limits: Limits) -> None:
    """Write *limits* for *controller* into the cgroup at *path*."""
    if controller == "pids":
        _write(os.path.join(path, "pids.max"), str(limits.pids))
    elif controller == "cpu":
        assert limits.cpus is not None
        quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
        if version == 1:
            _write(os.path.join(path, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
        else:
            _write(os.path.join(path, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
    elif controller == "memory":
        assert limits.memory is not None
        _memory(version, path, limits.memory, limits.memory_swap)


def _memory(version: int, path: str, memory: int, swap: int | None) -> None:
    """The memory limit, and memory plus swap as docker sets it (twice the memory when not given)."""
    total = swap if swap is not None else 2 * memory
    if version == 1:
        _write(os.path.join(path, "memory.limit_in_bytes"), str(memory))
        memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
    else:
        _write(os.path.join(path, "memory.max"), str(memory))
        memsw = os.path.join(path, "memory.swap.max")
    if not os.path.exists(memsw):
        if swap is not None:
            log.warning("--memory-swap: this kernel does not account swap (no %s); only --memory applies",
                        os.path.basename(memsw))
        return
    if version == 1:
        _write(memsw, str(total))
    else:
        _write(memsw, "max" if total == -1 else str(total - memory))
