"""Helpers for the integration tests: mounting, unmounting, layer building, tree snapshots.

Everything here works on ``bytes`` names so that names with newlines or non-UTF-8 bytes survive.
The kernel's overlayfs is the oracle: `Pair` builds the same layers twice, mounts kernel overlayfs on
one copy and the implementation under test on the other, and compares what each shows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unionfs.core import mountinfo, sysx

# --------------------------------------------------------------------------------------------------
# Programs

BIN_DIR = Path(sys.executable).parent


def program(name: str) -> str:
    """Path of one of our console scripts, next to the interpreter running the tests."""
    cand = BIN_DIR / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    return found if found else str(cand)


#: Which implementation the differential tests drive: ``unionfs`` (default), ``unionfs-overlay`` (the
#: fuse-overlayfs command line of unionfs; AUFS-style layouts are mapped to overlay options), or
#: ``fuse-overlayfs`` (to validate the harness itself against another FUSE overlay).
IMPL = os.environ.get("UNIONFS_TEST_IMPL", "unionfs")

MOUNT_TIMEOUT = 30.0  # bounded wait for a mount to appear / a daemon to exit

# --------------------------------------------------------------------------------------------------
# Mount table


def mounts() -> list[tuple[bytes, str, str]]:
    """(mountpoint, fstype, source) for every mount in this mount namespace, in mount order."""
    return [(m.point, m.fstype, m.source) for m in mountinfo.mounts()]


def abort_fuse_under(prefix: os.PathLike[str] | str) -> list[bytes]:
    """Abort (via fusectl) every FUSE connection mounted at or below ``prefix``, so that a hung
    daemon cannot hang the test run: blocked system calls then fail with ENOTCONN. Reads only
    /proc/self/mountinfo, which never blocks on a FUSE mount."""
    pre = os.fsencode(os.path.abspath(os.fspath(prefix)))
    aborted = []
    for m in mountinfo.mounts():
        if m.fstype.startswith("fuse") and (m.point == pre or m.point.startswith(pre + b"/")):
            try:
                with open(f"/sys/fs/fuse/connections/{m.dev.split(':')[1]}/abort", "w") as a:
                    a.write("1")
                aborted.append(m.point)
            except OSError:
                pass
    return aborted


def mount_fstype(path: os.PathLike[str] | str | bytes) -> str | None:
    """fstype of the topmost mount exactly at ``path``, or None when nothing is mounted there."""
    p = os.fsencode(os.path.abspath(os.fsdecode(path)))
    found = None
    for mp, fstype, _src in mounts():
        if mp == p:
            found = fstype
    return found


def is_mounted(path: os.PathLike[str] | str | bytes) -> bool:
    return mount_fstype(path) is not None


def wait_for_mount(path: os.PathLike[str] | str, proc: subprocess.Popen[bytes] | None = None,
                   timeout: float = MOUNT_TIMEOUT, fstype_prefix: str = "fuse") -> None:
    """Wait (bounded) until a filesystem whose type starts with ``fstype_prefix`` is mounted at
    ``path``. Raises if ``proc`` exits first or the time runs out."""
    mountinfo.wait_for_mount(path, timeout, exited=None if proc is None else proc.poll, fstype=fstype_prefix)


def umount(path: os.PathLike[str] | str, proc: subprocess.Popen[bytes] | None = None,
           timeout: float = MOUNT_TIMEOUT) -> int | None:
    """Unmount ``path`` and never leave it mounted: a normal unmount first, a lazy one as the last
    resort. When ``proc`` (the daemon we started) is given, wait for it to exit (killing it only
    after the bounded wait). Returns the daemon's exit status, or None."""
    path = os.fspath(path)
    for lazy in (False, True):
        t = mount_fstype(path)
        if t is None:
            break
        if t.startswith("fuse"):
            cmd = ["fusermount3", "-u", "-z", path] if lazy else ["fusermount3", "-u", path]
        else:
            cmd = ["umount", "-l", path] if lazy else ["umount", path]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if is_mounted(path):
        raise RuntimeError(f"could not unmount {path}")
    if proc is None:
        return None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"daemon for {path} did not exit {timeout}s after unmount") from None


def find_daemons(marker: str) -> list[int]:
    """PIDs of processes whose command line contains ``marker`` (a unique temporary path that only
    our own test used), excluding ourselves."""
    res = []
    me = os.getpid()
    needle = os.fsencode(marker)
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if needle in f.read():
                    res.append(int(d))
        except OSError:
            pass
    return res


def wait_daemons_gone(marker: str, timeout: float = MOUNT_TIMEOUT) -> list[int]:
    """Wait (bounded) until no process mentions ``marker``; return those still there."""
    deadline = time.monotonic() + timeout
    while (pids := find_daemons(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids


def kill_daemons(marker: str) -> list[int]:
    """Kill daemons that our test started (identified by the unique ``marker`` path)."""
    pids = find_daemons(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# --------------------------------------------------------------------------------------------------
# Errno capture


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn``; return its value or ``("errno", NAME)`` for an OSError, so results compare."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno or 0, str(e.errno)))


def err(name: str) -> tuple[str, str]:
    return ("errno", name)


# --------------------------------------------------------------------------------------------------
# renameat2

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = sysx.RENAME_NOREPLACE, sysx.RENAME_EXCHANGE, sysx.RENAME_WHITEOUT


def renameat2(old: os.PathLike[str] | str | bytes, new: os.PathLike[str] | str | bytes, flags: int) -> None:
    """renameat2(2) on two paths (`unionfs.core.sysx.renameat2`); OSError(errno, reason, old, None, new)."""
    o, n = os.fsencode(old), os.fsencode(new)
    try:
        sysx.renameat2(sysx.AT_FDCWD, o, sysx.AT_FDCWD, n, flags)
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno or 0), os.fsdecode(o), None, os.fsdecode(n)) from None


# --------------------------------------------------------------------------------------------------
# Snapshots

PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
WH_PREFIX = b".wh."
WH_OPQ = b".wh..wh..opq"

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def file_sha256(path: bytes | str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def xattrs(path: bytes, strip_private: bool = False) -> dict[bytes, bytes]:
    """All xattrs of ``path`` (not following a symlink). With ``strip_private``, overlay-private
    ones are dropped."""
    res: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return res
        raise
    for name in names:
        bname = os.fsencode(name)
        if strip_private and bname.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        try:
            res[bname] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            res[bname] = f"<errno {errno.errorcode.get(e.errno or 0)}>".encode()
    return res


def describe(path: bytes, st: os.stat_result, *, times: bool, dir_meta: bool,
             strip_private: bool, ino: bool = False) -> dict[str, Any]:
    """What a user sees of one object, as a dict that makes pytest diffs readable."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
    d: dict[str, Any] = {
        "type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
    }
    if kind != "dir" or dir_meta:
        d["size"] = st.st_size
        d["nlink"] = st.st_nlink
    if kind == "file":
        d["sha256"] = file_sha256(path)
    elif kind == "symlink":
        d["target"] = os.readlink(path)
    elif kind in ("chardev", "blockdev"):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if times and (kind != "dir" or dir_meta):
        d["mtime_ns"] = st.st_mtime_ns
    if ino:
        d["ino"] = st.st_ino
        d["ctime_ns"] = st.st_ctime_ns
    xa = xattrs(path, strip_private=strip_private)
    if xa:
        d["xattrs"] = xa
    return d


def walk(root: bytes) -> Iterable[tuple[bytes, bytes, os.stat_result]]:
    """(relative path, absolute path, lstat) for ``root`` and everything below it, never following
    a symlink, in sorted order."""
    stack = [b""]
    while stack:
        rel = stack.pop()
        absp = os.path.join(root, rel) if rel else root
        st = os.lstat(absp)
        yield rel, absp, st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(absp), reverse=True)
            for n in names:
                stack.append(os.path.join(rel, n) if rel else n)


def snapshot(root: os.PathLike[str] | str | bytes, *, times: bool = False, dir_meta: bool = False,
             strip_private: bool = False) -> dict[bytes, dict[str, Any]]:
    """The visible tree under ``root``: type, mode, uid, gid, size, sha256, link target, nlink, rdev,
    xattrs (all of them: a leaked private xattr must show up as a difference), keyed by relative
    path as bytes. Directory st_size and st_nlink are left out unless ``dir_meta`` (a documented
    difference); mtimes only with ``times``."""
    r = os.fsencode(root)
    return {rel: describe(absp, st, times=times, dir_meta=dir_meta, strip_private=strip_private)
            for rel, absp, st in walk(r)}


def layer_state(root: os.PathLike[str] | str | bytes) -> dict[bytes, dict[str, Any]]:
    """Everything about a branch that must not change when it is used read-only: content,
    metadata, xattrs (private ones too), inode numbers, mtime and ctime (not atime)."""
    r = os.fsencode(root)
    res = {}
    for rel, absp, st in walk(r):
        d = describe(absp, st, times=True, dir_meta=True, strip_private=False, ino=True)
        res[rel] = d
    return res


def layer_digest(root: os.PathLike[str] | str | bytes) -> str:
    h = hashlib.sha256()
    for rel, d in sorted(layer_state(root).items()):
        h.update(repr((rel, sorted(d.items()))).encode())
    return h.hexdigest()


def normalise_upper(root: os.PathLike[str] | str | bytes, *, times: bool = False
                    ) -> dict[bytes, dict[str, Any]]:
    """A writable branch after unmount, whiteouts in one dialect: a 0/0 char device or a `.wh.NAME`
    file becomes ``{"type": "whiteout"}`` at NAME; a directory with any opaque xattr (value ``y``)
    or a `.wh..wh..opq` file gets ``"opaque": True``; private xattrs are dropped. AUFS's private
    directories at the branch root (`.wh..wh.*`) are dropped."""
    r = os.fsencode(root)
    res: dict[bytes, dict[str, Any]] = {}
    for rel, absp, st in walk(r):
        parent, name = os.path.split(rel)
        first = rel.split(b"/")[0]
        if first.startswith(b".wh..wh.") and rel != WH_OPQ:
            continue  # AUFS keeps private dirs (.wh..wh.aufs, .wh..wh.plnk, ...) at a branch root
        if name == WH_OPQ and stat.S_ISREG(st.st_mode):
            res.setdefault(parent, {})["opaque"] = True
            continue
        if name.startswith(WH_PREFIX) and stat.S_ISREG(st.st_mode):
            res[os.path.join(parent, name[len(WH_PREFIX):])] = {"type": "whiteout"}
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            res[rel] = {"type": "whiteout"}
            continue
        d = describe(absp, st, times=times, dir_meta=False, strip_private=True)
        if d["type"] == "dir":
            for xname in OPAQUE_XATTRS:
                try:
                    if os.getxattr(absp, xname, follow_symlinks=False) == b"y":
                        d["opaque"] = True
                except OSError:
                    pass
        prev = res.get(rel, {})
        d.update(prev)
        res[rel] = d
    return res


# --------------------------------------------------------------------------------------------------
# Layer specs: the same layers, rendered in any whiteout dialect


@dataclass
class F:
    path: str | bytes
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int | None = None


@dataclass
class D:
    path: str | bytes
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    opaque: bool = False
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int | None = None


@dataclass
class L:
    path: str | bytes
    target: str | bytes
    uid: int = 0
    gid: int = 0


@dataclass
class W:
    """A whiteout for ``path``."""

    path: str | bytes


@dataclass
class N:
    """A special file: kind is fifo, chr, blk or sock."""

    path: str | bytes
    kind: str
    major: int = 0
    minor: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass
class H:
    """A hard link ``path`` to ``target`` (an earlier entry of the same layer)."""

    path: str | bytes
    target: str | bytes


Entry = F | D | L | W | N | H
FIXED_MTIME = 1_600_000_000  # every built object gets this mtime unless the spec says otherwise

DIALECTS = ("overlay", "aufs", "user", "fuseoverlayfs")


def _mkparents(root: bytes, rel: bytes) -> None:
    parent = os.path.dirname(rel)
    if parent:
        os.makedirs(os.path.join(root, parent), mode=0o755, exist_ok=True)


def render_layer(root: os.PathLike[str] | str | bytes, entries: Sequence[Entry], dialect: str) -> None:
    """Create ``entries`` under ``root`` (which may exist). Whiteouts and opaque dirs are written
    in ``dialect``: overlay (0/0 char dev, trusted.overlay.opaque=y), aufs (.wh.NAME, .wh..wh..opq),
    user (0/0 char dev, user.overlay.opaque=y), fuseoverlayfs (0/0 char dev,
    user.fuseoverlayfs.opaque=y). All times are fixed so two renderings are identical."""
    assert dialect in DIALECTS, dialect
    r = os.fsencode(root)
    os.makedirs(r, exist_ok=True)
    explicit_mtime: dict[bytes, int] = {}
    for e in entries:
        rel = os.fsencode(e.path)
        p = os.path.join(r, rel)
        _mkparents(r, rel)
        if isinstance(e, F):
            with open(p, "wb") as f:
                f.write(e.data)
            os.chmod(p, e.mode)
            os.chown(p, e.uid, e.gid)
            for k, v in e.xattrs.items():
                os.setxattr(p, k, v)
            if e.mtime is not None:
                explicit_mtime[rel] = e.mtime
        elif isinstance(e, D):
            os.makedirs(p, exist_ok=True)
            os.chmod(p, e.mode)
            os.chown(p, e.uid, e.gid)
            for k, v in e.xattrs.items():
                os.setxattr(p, k, v)
            if e.opaque:
                if dialect == "aufs":
                    with open(os.path.join(p, WH_OPQ), "wb"):
                        pass
                else:
                    xname = {"overlay": "trusted.overlay.opaque", "user": "user.overlay.opaque",
                             "fuseoverlayfs": "user.fuseoverlayfs.opaque"}[dialect]
                    os.setxattr(p, xname, b"y")
            if e.mtime is not None:
                explicit_mtime[rel] = e.mtime
        elif isinstance(e, L):
            os.symlink(os.fsencode(e.target), p)
            os.chown(p, e.uid, e.gid, follow_symlinks=False)
        elif isinstance(e, W):
            if dialect == "aufs":
                d, n = os.path.split(p)
                wp = os.path.join(d, WH_PREFIX + n)
                with open(wp, "wb"):
                    pass
                os.chmod(wp, 0o444)
            else:
                os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        elif isinstance(e, N):
            if e.kind == "sock":
                import socket
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.bind(p)
                finally:
                    s.close()
                os.chmod(p, e.mode)
            else:
                kind = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}[e.kind]
                os.mknod(p, e.mode | kind, os.makedev(e.major, e.minor))
                os.chmod(p, e.mode)
            os.chown(p, e.uid, e.gid)
        elif isinstance(e, H):
            os.link(os.path.join(r, os.fsencode(e.target)), p)
        else:  # pragma: no cover
            raise TypeError(e)
    fix_times(r, explicit_mtime)


def fix_times(root: bytes, explicit: dict[bytes, int] | None = None) -> None:
    """Give everything below ``root`` a fixed atime/mtime (deepest first, so directories keep it)."""
    explicit = explicit or {}
    items = list(walk(root))
    for rel, absp, _st in reversed(items):
        t = explicit.get(rel, FIXED_MTIME)
        os.utime(absp, ns=(t * 10**9, t * 10**9), follow_symlinks=False)


# --------------------------------------------------------------------------------------------------
# Mounting


@dataclass
class Mounted:
    mnt: Path
    proc: subprocess.Popen[bytes] | None
    stderr_path: Path | None
    kernel: bool

    def stderr(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_text(errors="replace")
        return ""


KERNEL_OPTS = "redirect_dir=off,index=off,metacopy=off"


def mount_kernel(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                 extra: Sequence[str] = ()) -> Mounted:
    opts = ["lowerdir=" + ":".join(str(p) for p in lowers)]
    if upper is not None:
        assert work is not None
        opts += [f"upperdir={upper}", f"workdir={work}"]
    opts += [KERNEL_OPTS, *extra]
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kernel overlay mount failed: {r.stderr.strip()}")
    return Mounted(mnt, None, None, kernel=True)


def unionfs_cmd(style: str, lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                options: Sequence[str] = (), foreground: bool = True) -> list[str]:
    """The unionfs command line for a union of ``upper`` (may be None) over ``lowers``."""
    cmd = [program("unionfs"), "mount"]
    if foreground:
        cmd.append("-f")
    opts = list(options)
    if style == "overlay":
        o = ["lowerdir=" + ":".join(str(p) for p in lowers)]
        if upper is not None:
            o += [f"upperdir={upper}", f"workdir={work}"]
        cmd += ["-o", ",".join(o + opts), str(mnt)]
    elif style in ("aufs", "aufs-modes"):
        if style == "aufs":
            branches = ([str(upper)] if upper is not None else []) + [str(p) for p in lowers]
            if upper is None:
                opts = ["ro", *opts]
        else:
            branches = ([f"{upper}=rw"] if upper is not None else []) + [f"{p}=ro" for p in lowers]
        if opts:
            cmd += ["-o", ",".join(opts)]
        cmd += [":".join(branches), str(mnt)]
    else:
        raise ValueError(style)
    return cmd


def mount_impl(style: str, lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
               options: Sequence[str] = (), logdir: Path | None = None) -> Mounted:
    """Mount the implementation under test in the foreground (so we hold its PID) and wait until
    the mount is ready."""
    logdir = logdir or mnt.parent
    errp = logdir / f"{mnt.name}.stderr"
    if IMPL in ("fuse-overlayfs", "unionfs-overlay"):
        o = ["lowerdir=" + ":".join(str(p) for p in lowers)]
        if upper is not None:
            if work is None:
                work = mnt.parent / (mnt.name + ".work")
                work.mkdir(exist_ok=True)
            o += [f"upperdir={upper}", f"workdir={work}"]
        o += [x for x in options if not x.startswith("whiteout=") and not x.startswith("timeout=")]
        prog = "fuse-overlayfs" if IMPL == "fuse-overlayfs" else program("unionfs-overlay")
        cmd = [prog, "-f", "-o", ",".join(o), str(mnt)]
    else:
        cmd = unionfs_cmd(style, lowers, upper, work, mnt, options)
    with open(errp, "wb") as ef:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=ef, stderr=ef)
    m = Mounted(mnt, proc, errp, kernel=False)
    try:
        wait_for_mount(mnt, proc)
    except Exception as e:
        umount(mnt, proc if proc.poll() is None else None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise RuntimeError(f"{' '.join(cmd)}: {e}\nstderr:\n{m.stderr()}") from None
    return m


def unmount(m: Mounted) -> None:
    rc = umount(m.mnt, m.proc)
    if m.proc is not None:
        err_text = m.stderr()
        assert "Traceback" not in err_text, f"daemon printed a traceback:\n{err_text}"
        assert rc == 0, f"daemon exited with {rc} after unmount:\n{err_text}"


# --------------------------------------------------------------------------------------------------
# The differential pair


class Side:
    """One copy of the layers and its mount."""

    def __init__(self, base: Path, name: str):
        self.base = base / name
        self.base.mkdir()
        self.lowers: list[Path] = []
        self.upper: Path | None = None
        self.work: Path | None = None
        self.mnt = self.base / "mnt"
        self.mnt.mkdir()
        self.mounted: Mounted | None = None

    def p(self, rel: str | bytes = b"") -> bytes:
        """Absolute path (bytes) of ``rel`` on this side's mount."""
        r = os.fsencode(rel)
        return os.path.join(os.fsencode(self.mnt), r) if r else os.fsencode(self.mnt)


class Pair:
    """The same layers built twice: ``k`` is mounted with kernel overlayfs, ``u`` with the
    implementation under test. Lower branches of both are digested at build time and checked at
    teardown."""

    def __init__(self, base: Path):
        self.base = base
        self.k = Side(base, "k")
        self.u = Side(base, "u")
        self.lower_digests: dict[Path, str] = {}
        self.style = "overlay"
        self.cleanup: list[Path] = []  # extra mounts (e.g. a small tmpfs) to unmount at the end

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.k, self.u)

    def build(self, lowers: Sequence[Sequence[Entry]], upper: Sequence[Entry] | None = (),
              *, dialect: str = "overlay", style: str = "overlay",
              options: Sequence[str] = (), kernel_options: Sequence[str] = (), mount: bool = True) -> Pair:
        """Render ``lowers`` (top first) and ``upper`` (None: a read-only union) on both sides —
        kernel side always in the overlay dialect, the other in ``dialect`` — and mount them.
        ``style`` is overlay (-o lowerdir=...), aufs (A:B:C) or aufs-modes (A=rw:B=ro)."""
        self.style = style
        self.options = list(options)
        self.kernel_options = list(kernel_options)
        for side, dia in ((self.k, "overlay"), (self.u, dialect)):
            for i, entries in enumerate(lowers):
                lp = side.base / f"l{i}"
                render_layer(lp, entries, dia)
                side.lowers.append(lp)
            if upper is not None:
                side.upper = side.base / "upper"
                render_layer(side.upper, upper, dia)
                if style == "overlay" or side is self.k or IMPL != "unionfs":
                    side.work = side.base / "work"
                    side.work.mkdir()
            for lp in side.lowers:
                self.lower_digests[lp] = layer_digest(lp)
        if mount:
            self.mount()
        return self

    def mount(self, options: Sequence[str] | None = None) -> None:
        opts = self.options if options is None else list(options)
        k, u = self.k, self.u
        if k.mounted is None:
            k.mounted = mount_kernel(k.lowers, k.upper, k.work, k.mnt, self.kernel_options)
        if u.mounted is None:
            u.mounted = mount_impl(self.style, u.lowers, u.upper, u.work, u.mnt, opts, logdir=self.u.base)

    def unmount(self, final: bool = False) -> None:
        """Unmount both sides; with ``final`` also the extra mounts in ``cleanup``."""
        errors = []
        for side in self.sides:
            if side.mounted is not None:
                m, side.mounted = side.mounted, None
                try:
                    unmount(m)
                except (AssertionError, RuntimeError) as e:
                    errors.append(str(e))
        while final and self.cleanup:
            umount(self.cleanup.pop())
        if errors:
            raise AssertionError("\n".join(errors))

    # -- running the same thing on both sides

    def both(self, fn: Callable[[Side], Any]) -> tuple[Any, Any]:
        """``fn(side)`` on each side, OSErrors turned into ("errno", NAME)."""
        return call(fn, self.k), call(fn, self.u)

    @contextlib.contextmanager
    def opened(self, *names: str, flags: int = os.O_RDONLY) -> Iterator[Callable[[Side, str], int]]:
        """Each of *names* opened on both sides for the length of the block, then closed: yields
        ``fd(side, name)``."""
        fds: dict[tuple[Path, str], int] = {}
        try:
            for side in self.sides:
                for name in names:
                    fds[side.base, name] = os.open(side.p(name), flags)
            yield lambda side, name: fds[side.base, name]
        finally:
            for fd in fds.values():
                os.close(fd)

    def same(self, fn: Callable[[Side], Any], what: str = "") -> Any:
        """Run ``fn`` on both sides and assert the results (values or errnos) are equal."""
        k, u = self.both(fn)
        if u != k:
            label = what or getattr(fn, "__name__", "op")
            raise AssertionError(f"{label}: {IMPL} gave {_short(u)}, kernel gave {_short(k)}{_diff(k, u)}")
        return k

    def visible(self, side: Side, rel: str | bytes = b"", **kw: Any) -> dict[bytes, dict[str, Any]]:
        return snapshot(side.p(rel), **kw)

    def assert_same_tree(self, rel: str | bytes = b"", **kw: Any) -> dict[bytes, dict[str, Any]]:
        kt = self.visible(self.k, rel, **kw)
        ut = self.visible(self.u, rel, **kw)
        assert_trees_equal(kt, ut)
        return kt

    def assert_same_upper(self, times: bool = False) -> dict[bytes, dict[str, Any]]:
        """Unmount both and compare the writable branches, whiteouts normalised."""
        self.unmount()
        assert self.k.upper is not None and self.u.upper is not None
        kt = normalise_upper(self.k.upper, times=times)
        ut = normalise_upper(self.u.upper, times=times)
        assert_trees_equal(kt, ut, what="upper layer")
        return kt

    def check_lowers(self) -> None:
        changed = [str(p) for p, dg in self.lower_digests.items() if layer_digest(p) != dg]
        assert not changed, f"lower branches changed: {changed}"


def _short(v: Any, limit: int = 300) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} chars)"


def _diff(k: Any, u: Any) -> str:
    """A line diff when both results are (or contain) long byte strings."""
    import difflib

    def text(v: Any) -> bytes | None:
        if isinstance(v, bytes):
            return v
        if isinstance(v, tuple):
            parts = [x for x in v if isinstance(x, bytes)]
            return b"\n".join(parts) if parts else None
        return None
    a, b = text(k), text(u)
    if a is None or b is None or (len(a) < 300 and len(b) < 300):
        return ""
    sep = b"\0" if b"\0" in a else b"\n"
    lines = list(difflib.unified_diff([repr(x)[2:-1] for x in a.split(sep)],
                                      [repr(x)[2:-1] for x in b.split(sep)],
                                      "kernel", IMPL, lineterm="", n=1))
    return "\n" + "\n".join(lines[:60])


def assert_trees_equal(kernel: dict[bytes, Any], impl: dict[bytes, Any], what: str = "visible tree") -> None:
    """Compare two snapshots and fail with a short, readable list of differences."""
    diffs = []
    for rel in sorted(set(kernel) | set(impl)):
        a, b = kernel.get(rel), impl.get(rel)
        if a != b:
            diffs.append(f"  {rel!r}:\n    kernel:  {a}\n    {IMPL}: {b}")
    if diffs:
        shown = "\n".join(diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise AssertionError(f"{what} differs ({len(diffs)} paths):\n{shown}{more}")


def run_tool(args: Sequence[str], cwd: os.PathLike[str] | str | bytes | None = None) -> tuple[int, bytes, bytes]:
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, env={**os.environ, "LC_ALL": "C", "TZ": "UTC"})
    return r.returncode, r.stdout, r.stderr
