"""The operation model: what a step is, how it runs, and how steps are drawn at random.

Every operation is a plain function of a :class:`Session` (the mount point plus held file
descriptors) and relative paths. It returns a comparable result or raises ``OSError``; the
executor turns that into an :class:`Outcome` ``(result, errno)``. An :class:`Op` is the name of one
of these functions and its arguments, and ``op.code()`` is the very call, as Python source, that the
repro script makes — so the script runs exactly what the oracle ran.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import random
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from unionfs.core.sysx import AT_FDCWD, RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

from .layers import NAMES, Oct, Rep

log = logging.getLogger(__name__)


MAX_READ = 1 << 16


class Session:
    """Where operations run: a mount point, and file descriptors held across steps."""

    def __init__(self, mnt: str, remount: Callable[[], None] | None = None) -> None:
        self.mnt = mnt
        self.fds: dict[int, int] = {}
        self._remount = remount

    def path(self, rel: str) -> str:
        return os.path.join(self.mnt, rel) if rel else self.mnt

    def close_all(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def remount(self) -> None:
        self.close_all()
        if self._remount is not None:
            self._remount()


def _flags(names: str) -> int:
    """Open flags by name. O_NONBLOCK is always added so that opening a fifo never hangs the oracle
    (it changes nothing for regular files and directories)."""
    value = os.O_NONBLOCK
    for name in filter(None, names.split("|")):
        value |= getattr(os, name)
    return value


# --------------------------------------------------------------------------- operations
# Each returns something comparable with == (or None) and raises OSError on failure.


def open_(s: Session, path: str, flags: str, mode: int, data: bytes) -> Any:
    """open(2) with ``flags``; write ``data`` if given; read back what the fd can read."""
    fd = os.open(s.path(path), _flags(flags), mode)
    try:
        if data:
            os.write(fd, data)
        if "O_WRONLY" not in flags and "O_DIRECTORY" not in flags:
            return os.pread(fd, MAX_READ, 0)
        return None
    finally:
        os.close(fd)


def pwrite(s: Session, path: str, offset: int, data: bytes) -> int:
    fd = os.open(s.path(path), _flags("O_WRONLY"))
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def append(s: Session, path: str, data: bytes) -> int:
    fd = os.open(s.path(path), _flags("O_WRONLY|O_APPEND"))
    try:
        os.write(fd, data)
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


def truncate(s: Session, path: str, length: int) -> None:
    os.truncate(s.path(path), length)


def read(s: Session, path: str) -> bytes:
    fd = os.open(s.path(path), _flags("O_RDONLY"))
    try:
        return os.read(fd, MAX_READ)
    finally:
        os.close(fd)


def unlink(s: Session, path: str) -> None:
    os.unlink(s.path(path))


def mkdir(s: Session, path: str, mode: int) -> None:
    os.mkdir(s.path(path), mode)


def rmdir(s: Session, path: str) -> None:
    os.rmdir(s.path(path))


def rename(s: Session, src: str, dst: str, flags: str = "") -> None:
    """renameat2(2); ``flags`` is '', 'RENAME_NOREPLACE' or 'RENAME_EXCHANGE'."""
    value = {"": 0, "RENAME_NOREPLACE": RENAME_NOREPLACE, "RENAME_EXCHANGE": RENAME_EXCHANGE}[flags]
    try:
        renameat2(AT_FDCWD, os.fsencode(s.path(src)), AT_FDCWD, os.fsencode(s.path(dst)), value)
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno or 0), src) from None


def link(s: Session, src: str, dst: str) -> None:
    os.link(s.path(src), s.path(dst), follow_symlinks=False)


def symlink(s: Session, target: str, path: str) -> None:
    os.symlink(target, s.path(path))


def readlink(s: Session, path: str) -> str:
    return os.readlink(s.path(path))


def chmod(s: Session, path: str, mode: int) -> None:
    os.chmod(s.path(path), mode)


def chown(s: Session, path: str, uid: int, gid: int, follow: bool = True) -> None:
    os.chown(s.path(path), uid, gid, follow_symlinks=follow)


def utimens(s: Session, path: str, ns: tuple[int, int] | None, follow: bool = True) -> None:
    """utimensat(2) with explicit times, or both 'now' when ``ns`` is None."""
    if ns is None:
        os.utime(s.path(path), follow_symlinks=follow)
    else:
        os.utime(s.path(path), ns=ns, follow_symlinks=follow)


def setxattr(s: Session, path: str, name: str, value: bytes, flags: str = "") -> None:
    """setxattr(2); ``flags`` is '', 'XATTR_CREATE' or 'XATTR_REPLACE'."""
    value_flags = {"": 0, "XATTR_CREATE": os.XATTR_CREATE, "XATTR_REPLACE": os.XATTR_REPLACE}[flags]
    os.setxattr(s.path(path), name, value, value_flags, follow_symlinks=False)


def removexattr(s: Session, path: str, name: str) -> None:
    os.removexattr(s.path(path), name, follow_symlinks=False)


def getxattr(s: Session, path: str, name: str) -> bytes:
    return os.getxattr(s.path(path), name, follow_symlinks=False)


def mkfifo(s: Session, path: str, mode: int) -> None:
    os.mkfifo(s.path(path), mode)


def readdir(s: Session, path: str) -> list[str]:
    return sorted(os.listdir(s.path(path)))


def readdir_while(s: Session, path: str, action: str, name: str) -> tuple[list[str], int]:
    """Start listing ``path``, do ``action`` on ``path/name`` mid-way, finish the listing.

    Whether a name added or removed during a readdir shows up is unspecified by POSIX, so the
    result leaves ``name`` out; it is the other names, and the errno of the action, that must agree.
    """
    seen: list[str] = []
    err = 0
    with os.scandir(s.path(path)) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 0:
                err = _quietly(action, s, os.path.join(path, name))
        if not seen:
            err = _quietly(action, s, os.path.join(path, name))
    return sorted(n for n in seen if n != name), err


def _quietly(action: str, s: Session, rel: str) -> int:
    try:
        if action == "unlink":
            unlink(s, rel)
        elif action == "mkdir":
            mkdir(s, rel, 0o755)
        else:
            open_(s, rel, "O_WRONLY|O_CREAT", 0o644, b"new")
    except OSError as e:
        return e.errno or -1
    return 0


def fd_open(s: Session, slot: int, path: str, flags: str) -> None:
    """Open and hold a file descriptor across later steps."""
    if slot in s.fds:
        os.close(s.fds.pop(slot))
    s.fds[slot] = os.open(s.path(path), _flags(flags), 0o644)


def _fd(s: Session, slot: int) -> int:
    if slot not in s.fds:
        raise OSError(errno_mod.EBADF, "slot not open")
    return s.fds[slot]


def fd_pread(s: Session, slot: int, offset: int) -> bytes:
    return os.pread(_fd(s, slot), MAX_READ, offset)


def fd_pwrite(s: Session, slot: int, offset: int, data: bytes) -> int:
    return os.pwrite(_fd(s, slot), data, offset)


def fd_ftruncate(s: Session, slot: int, length: int) -> None:
    os.ftruncate(_fd(s, slot), length)


def fd_fstat(s: Session, slot: int) -> tuple[int, str, int]:
    st = os.fstat(_fd(s, slot))
    return st.st_size, oct(st.st_mode), st.st_nlink


def fd_close(s: Session, slot: int) -> None:
    os.close(s.fds.pop(slot) if slot in s.fds else _fd(s, slot))


def run(s: Session, command: str, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run a shell command with the union as its working directory and ``$UNION`` set to it.

    The result is (exit status, stdout, stderr), with the mount point's path written as ``$UNION``
    so that the two sides compare equal. Not drawn at random: ``unionfs conformance --run``.
    """
    res = subprocess.run(command, shell=True, cwd=s.mnt, env={**os.environ, "UNION": s.mnt},
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    out, err = (x.decode(errors="replace").replace(s.mnt, "$UNION") for x in (res.stdout, res.stderr))
    return res.returncode, out, err


def remount(s: Session) -> None:
    """Close held fds, unmount, mount again on the same layers (the upper must read back the same)."""
    s.remount()


OPERATIONS: Mapping[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (open_, pwrite, append, truncate, read, unlink, mkdir, rmdir, rename, link, symlink,
              readlink, chmod, chown, utimens, setxattr, removexattr, getxattr, mkfifo, readdir,
              readdir_while, fd_open, fd_pread, fd_pwrite, fd_ftruncate, fd_fstat, fd_close, remount, run)
}


@dataclass(frozen=True)
class Op:
    """One step: an operation name and its arguments (after the session)."""

    name: str
    args: tuple[Any, ...] = ()

    def code(self, session: str = "s") -> str:
        return f"{self.name}({', '.join([session] + [repr(a) for a in self.args])})"

    def __str__(self) -> str:
        return self.name + "(" + ", ".join(repr(a) for a in self.args) + ")"


@dataclass(frozen=True)
class Outcome:
    """What a step returned, or the errno it failed with (0 on success)."""

    result: Any
    errno: int

    def __str__(self) -> str:
        if self.errno:
            return f"error {errno_mod.errorcode.get(self.errno, self.errno)}"
        r = self.result
        if isinstance(r, bytes) and len(r) > 40:
            r = r[:40] + b"..."
        return f"ok {r!r}"


def execute(s: Session, op: Op) -> Outcome:
    """Run ``op`` in ``s``; never raises OSError."""
    try:
        return Outcome(OPERATIONS[op.name](s, *op.args), 0)
    except OSError as e:
        return Outcome(None, e.errno or -1)


# --------------------------------------------------------------------------- generation

OPEN_ACCESS = ("O_RDONLY", "O_WRONLY", "O_RDWR")
OPEN_EXTRA = ("O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_NOFOLLOW", "O_DIRECTORY")
DATAS = (b"", b"w", b"hello", Rep(b"0123456789", 500), Rep(b"z", 9000))
OFFSETS = (0, 1, 3, 4096, 10000)
MODES = (Oct(0o644), Oct(0o600), Oct(0o755), Oct(0o000), Oct(0o4755), Oct(0o1777), Oct(0o2750), Oct(0o444))
OWNERS = ((0, 0), (1000, 1000), (65534, 100), (1000, 0))
TIMES = ((1_100_000_000_000_000_000, 1_100_000_123_000_000_000), (1_200_000_000_500_000_000,) * 2)
XATTR_NAMES = ("user.x", "user.y", "user.new")
XATTR_VALUES = (b"", b"1", b"value" * 30)

# weights: how often each operation is drawn
WEIGHTS: dict[str, int] = {
    "open_": 12, "pwrite": 6, "append": 4, "truncate": 4, "read": 2, "unlink": 8, "mkdir": 6,
    "rmdir": 5, "rename": 10, "link": 4, "symlink": 3, "readlink": 1, "chmod": 4, "chown": 3,
    "utimens": 3, "setxattr": 4, "removexattr": 3, "getxattr": 1, "mkfifo": 2, "readdir": 2,
    "readdir_while": 2, "fd_open": 3, "fd_pread": 2, "fd_pwrite": 2, "fd_ftruncate": 1, "fd_fstat": 1,
    "fd_close": 1, "remount": 1,
}


class Chooser:
    """Draws the next step from a seeded RNG, looking at the currently visible tree.

    Most paths are names that exist right now (so operations mostly hit interesting objects);
    the rest are drawn from the shared name pool, or are a new name inside an existing directory.
    """

    def __init__(self, rng: random.Random, allow: set[str] | None = None, dir_renames: bool = False) -> None:
        self.rng = rng
        # --redirect-dir: half the renames move a directory that exists (merged ones among them)
        self.dir_renames = dir_renames
        names = [n for n in WEIGHTS if allow is None or n in allow]
        self.names = names
        self.weights = [WEIGHTS[n] for n in names]

    def _path(self, tree: Mapping[str, str], kind: str | None = None) -> str:
        rng = self.rng
        existing = [p for p, t in tree.items() if p and (kind is None or t == kind)]
        r = rng.random()
        if existing and r < 0.6:
            return rng.choice(sorted(existing))
        dirs = [p for p, t in tree.items() if t == "d"]
        if dirs and r < 0.85:
            parent = rng.choice(sorted(dirs))
            return os.path.join(parent, rng.choice(NAMES)) if parent else rng.choice(NAMES)
        return "/".join(rng.choice(NAMES) for _ in range(rng.choice((1, 1, 2, 3))))

    def next(self, tree: Mapping[str, str]) -> Op:
        """``tree`` maps visible relative paths ('' is the root) to a type letter (f d l p ...)."""
        rng = self.rng
        name = rng.choices(self.names, self.weights)[0]

        def p(kind: str | None = None) -> str:
            return self._path(tree, kind)

        if name == "open_":
            parts = [rng.choice(OPEN_ACCESS)] + [f for f in OPEN_EXTRA if rng.random() < (
                0.05 if f in ("O_DIRECTORY", "O_NOFOLLOW") else 0.3)]
            data = rng.choice(DATAS) if parts[0] != "O_RDONLY" or rng.random() < 0.1 else b""
            return Op(name, (p(), "|".join(parts), rng.choice(MODES), data))
        if name in ("pwrite",):
            return Op(name, (p("f"), rng.choice(OFFSETS), rng.choice(DATAS)))
        if name == "append":
            return Op(name, (p("f"), rng.choice(DATAS)))
        if name == "truncate":
            return Op(name, (p("f"), rng.choice(OFFSETS)))
        if name in ("read", "readlink", "unlink"):
            return Op(name, (p({"read": "f", "readlink": "l", "unlink": None}[name]),))
        if name == "mkdir":
            return Op(name, (p(), rng.choice(MODES[:3])))
        if name in ("rmdir", "readdir"):
            return Op(name, (p("d"),))
        if name == "rename":
            flags = rng.choice(("", "", "", "RENAME_NOREPLACE", "RENAME_EXCHANGE"))
            if self.dir_renames and rng.random() < 0.5:
                return Op(name, (p("d"), p(), flags))
            return Op(name, (p(), p(), flags))
        if name == "link":
            return Op(name, (p("f"), p()))
        if name == "symlink":
            return Op(name, (rng.choice(NAMES + ("a/b", "d/c")), p()))
        if name == "chmod":
            return Op(name, (p(), rng.choice(MODES)))
        if name == "chown":
            return Op(name, (p(), *rng.choice(OWNERS), rng.random() < 0.7))
        if name == "utimens":
            return Op(name, (p(), rng.choice(TIMES + (None,)), rng.random() < 0.7))
        if name == "setxattr":
            flags = rng.choice(("", "", "XATTR_CREATE", "XATTR_REPLACE"))
            return Op(name, (p(), rng.choice(XATTR_NAMES), rng.choice(XATTR_VALUES), flags))
        if name in ("removexattr", "getxattr"):
            return Op(name, (p(), rng.choice(XATTR_NAMES)))
        if name == "mkfifo":
            return Op(name, (p(), rng.choice(MODES[:2])))
        if name == "readdir_while":
            return Op(name, (p("d"), rng.choice(("unlink", "create", "mkdir")), rng.choice(NAMES)))
        if name == "fd_open":
            flags = rng.choice(("O_RDONLY", "O_RDONLY", "O_RDWR", "O_WRONLY|O_APPEND", "O_RDWR|O_CREAT"))
            return Op(name, (rng.randrange(2), p("f"), flags))
        if name == "fd_pread":
            return Op(name, (rng.randrange(2), rng.choice(OFFSETS[:3])))
        if name == "fd_pwrite":
            return Op(name, (rng.randrange(2), rng.choice(OFFSETS), rng.choice(DATAS)))
        if name == "fd_ftruncate":
            return Op(name, (rng.randrange(2), rng.choice(OFFSETS)))
        if name in ("fd_fstat", "fd_close"):
            return Op(name, (rng.randrange(2),))
        if name == "remount":
            return Op(name)
        raise AssertionError(name)
