"""Helpers for the hardening tests: a unionfs daemon we own (foreground child, so we hold its
PID and may SIGKILL it), a canary outside the branches, and layer hashes.

Names are bytes wherever they reach the filesystem.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import util

from unionfs.conformance import harness

UNIONFS = util.program("unionfs")
OVERLAY = util.program("unionfs-overlay")


FORK = multiprocessing.get_context("fork")


def figure(name: str, **values: Any) -> None:
    """One line of figures for the README; collected by scripts/hardening_report.py."""
    print("FIGURE " + name + " " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def data_for(name: bytes | str, size: int) -> bytes:
    """Deterministic content for a file, from its name."""
    seed = hashlib.sha256(os.fsencode(name)).digest()
    out = bytearray()
    block = seed
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:size])



@dataclass
class Daemon:
    """A unionfs mount served by a foreground child process we started."""

    mnt: Path
    cmd: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    log_start: int = 0

    def start(self) -> Daemon:
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        self.proc = harness.start_daemon(self.cmd, self.mnt, self.log, env={**os.environ, **self.env})
        return self

    def log_text(self) -> str:
        """What this run of the daemon logged (the log file may hold earlier runs)."""
        return harness.read_log(self.log, self.log_start)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, detach: bool = True) -> None:
        """SIGKILL our daemon, then (with *detach*) detach its dead mount (lazy unmount). Without it,
        call `detach()` later: until then calls on the mount fail with ENOTCONN."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None
        if detach:
            self._detach()

    def detach(self) -> None:
        self._detach()

    def _detach(self) -> None:
        for _ in range(3):
            if not util.is_mounted(self.mnt):
                return
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
            if util.is_mounted(self.mnt):
                subprocess.run(["umount", "-l", str(self.mnt)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
        assert not util.is_mounted(self.mnt), f"could not detach {self.mnt}"

    def stop(self, check: bool = True) -> int | None:
        """Unmount (bounded) and wait for the daemon; with *check*, it must exit 0 (what it logged is
        checked after the test by the log checker)."""
        proc, self.proc = self.proc, None
        if proc is None:
            if util.is_mounted(self.mnt):
                self._detach()
            return None
        try:
            rc = util.umount(self.mnt, proc)
        except RuntimeError:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._detach()
            raise
        if check:
            text = self.log_text()
            assert rc == 0, f"daemon exited {rc}:\n{text[-3000:]}"   # its log: see conftest's checker
        return rc


def overlay_daemon(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path, log: Path,
                   options: Sequence[str] = (), env: dict[str, str] | None = None) -> Daemon:
    o = ["lowerdir=" + ":".join(str(p) for p in lowers)]
    if upper is not None:
        o += [f"upperdir={upper}", f"workdir={work}"]
    cmd = [UNIONFS, "mount", "-f", "--log-file", str(log), "-o", ",".join(o + list(options)), str(mnt)]
    return Daemon(mnt, cmd, log, env=env or {})


def aufs_daemon(branches: Sequence[Path], mnt: Path, log: Path, options: Sequence[str] = ()) -> Daemon:
    cmd = [UNIONFS, "mount", "-f", "--log-file", str(log)]
    if options:
        cmd += ["-o", ",".join(options)]
    cmd += [":".join(str(b) for b in branches), str(mnt)]
    return Daemon(mnt, cmd, log)


class Layers:
    """lower dirs l0..lN (top first), upper u, work w, mount point m under *base*."""

    def __init__(self, base: Path, nlowers: int = 1) -> None:
        self.base = base
        self.lowers = [base / f"l{i}" for i in range(nlowers)]
        self.upper = base / "u"
        self.work = base / "w"
        self.mnt = base / "m"
        for d in [*self.lowers, self.upper, self.work, self.mnt]:
            d.mkdir(parents=True, exist_ok=True)
        self.log = base / "daemon.log"

    def daemon(self, options: Sequence[str] = (), env: dict[str, str] | None = None, style: str = "overlay") -> Daemon:
        """overlay style (-o lowerdir=...), or AUFS style (u:l0:...; the work dir is hidden in u)."""
        if style == "aufs":
            d = aufs_daemon([self.upper, *self.lowers], self.mnt, self.log, options)
            d.env = env or {}
            return d
        return overlay_daemon(self.lowers, self.upper, self.work, self.mnt, self.log, options, env)

    def workdir(self, style: str = "overlay") -> Path:
        return self.upper / ".wh..wh.unionfs.work" if style == "aufs" else self.work / "unionfs-work"

    def lower_digests(self) -> list[str]:
        return [util.layer_digest(p) for p in self.lowers]

    def m(self, rel: str | bytes = b"") -> bytes:
        r = os.fsencode(rel)
        return os.path.join(os.fsencode(self.mnt), r) if r else os.fsencode(self.mnt)


def kernel_view(lowers: Sequence[Path], upper: Path, base: Path) -> dict[bytes, dict[str, Any]]:
    """The tree kernel overlayfs shows on these layers (mounted briefly, with its own work dir)."""
    kwork = base / "kwork"
    kmnt = base / "kmnt"
    kwork.mkdir(exist_ok=True)
    kmnt.mkdir(exist_ok=True)
    util.mount_kernel(lowers, upper, kwork, kmnt)
    try:
        return util.snapshot(kmnt)
    finally:
        util.umount(kmnt)


# --------------------------------------------------------------------------------------------------
# Canary: a directory outside every branch that hostile layers point at


class Canary:
    """Files outside the branches; `check()` asserts nothing there was read-modified, created or
    changed (content, mtime, ctime, the set of names, and the directory's own mtime)."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "canary").write_bytes(b"do not touch\n" * 100)
        (self.dir / "sub").mkdir(exist_ok=True)
        (self.dir / "sub" / "inner").write_bytes(b"inner canary\n")
        os.chmod(self.dir / "canary", 0o644)
        self.before = self._state()

    def _state(self) -> dict[str, tuple[Any, ...]]:
        res: dict[str, tuple[Any, ...]] = {}
        for root, dirs, files in os.walk(self.dir):
            for n in dirs + files + [""]:
                p = os.path.join(root, n) if n else root
                st = os.lstat(p)
                h = ""
                if stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        h = hashlib.sha256(f.read()).hexdigest()
                xa = tuple(sorted(os.listxattr(p, follow_symlinks=False)))
                res[os.path.relpath(p, self.dir)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                     st.st_mtime_ns, st.st_ctime_ns, h, xa)
        return res

    def check(self) -> None:
        now = self._state()
        assert now == self.before, f"the canary outside the branches changed:\nbefore {self.before}\nnow {now}"


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)
