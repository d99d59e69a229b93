"""The implementations the oracle can compare: kernel overlayfs, fuse-overlayfs and unionfs.

Each knows how to mount lower layers (top first), an upper and a work dir on a mount point, how to
unmount it again (waiting until everything is written), and which whiteout dialect its lower layers
should be written in. Mounts are found in /proc/self/mountinfo; nothing here touches a mount point
it did not create.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping

from unionfs.core import mountinfo

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 30.0  # for a mount to appear
EXIT_TIMEOUT = 60.0  # for a FUSE server to exit once unmounted (generous: CI machines are busy)


class MountError(RuntimeError):
    pass


def is_mounted(path: str) -> bool:
    return mountinfo.is_mounted(path)


def _mount_dev(path: str) -> tuple[int, int] | None:
    found = mountinfo.mount_at(os.path.realpath(path))
    if found is None:
        return None
    major, minor = found.dev.split(":")
    return int(major), int(minor)


def abort_fuse(mnt: str) -> bool:
    """Abort the FUSE connection mounted at ``mnt`` (ours, hung), so blocked syscalls return.

    Uses the fusectl filesystem when it is mounted; never stats the hung mount itself.
    """
    dev = _mount_dev(mnt)
    if dev is None or dev[0] != 0:
        return False
    ctl = f"/sys/fs/fuse/connections/{dev[1]}/abort"
    if not os.path.exists(ctl):
        log.warning("cannot abort hung FUSE mount %s: fusectl is not mounted", mnt)
        return False
    with open(ctl, "w") as f:
        f.write("1")
    return True


def _run(cmd: list[str], env: Mapping[str, str] | None = None, timeout: float = 60) -> None:
    """Run a mount helper. Its output goes to a file, not a pipe: a daemon that inherits a pipe
    would keep it open and make us wait for EOF forever."""
    with tempfile.TemporaryFile() as out:
        try:
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 env=None if env is None else dict(env), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MountError(f"{' '.join(cmd)}: no answer after {timeout}s") from None
        if res.returncode != 0:
            out.seek(0)
            text = out.read().decode(errors="replace").strip()
            raise MountError(f"{' '.join(cmd)}: exit {res.returncode}: {text[-2000:]}")


def _wait_mounted(mnt: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    try:
        mountinfo.wait_for_mount(mnt, MOUNT_TIMEOUT, exited=None if proc is None else proc.poll)
    except (ChildProcessError, TimeoutError) as e:
        raise MountError(str(e)) from None


class Impl:
    """An implementation under test. ``dialect`` is how whiteouts in its lower layers are written."""

    name = "?"
    dialect = "overlay"
    extra_options = ""

    def mount(self, lowers: list[str], upper: str, work: str, mnt: str) -> None:
        raise NotImplementedError

    def umount(self, mnt: str) -> None:
        raise NotImplementedError

    def __str__(self) -> str:
        return f"{self.name}[{self.extra_options}]" if self.extra_options else self.name


class KernelOverlay(Impl):
    """Kernel overlayfs, with the features unionfs does not emulate switched off explicitly."""

    name = "kernel"
    OPTIONS = "index=off,redirect_dir=off,metacopy=off,xino=off"

    def __init__(self, extra_options: str = "") -> None:
        self.extra_options = extra_options

    def mount(self, lowers: list[str], upper: str, work: str, mnt: str) -> None:
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},{self.OPTIONS}"
        if self.extra_options:  # later options win: "redirect_dir=on" turns the feature back on
            opts += "," + self.extra_options
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt])

    def umount(self, mnt: str) -> None:
        _run(["umount", mnt])


class ForegroundFuse(Impl):
    """A FUSE server run in the foreground as our child: we hold its PID, wait for it to exit
    after unmounting, keep its output in a log file, and can kill it if the mount stops answering.
    A daemon that exits non-zero or prints a traceback is reported as a mount problem."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def command(self, lowers: list[str], upper: str, work: str, mnt: str) -> list[str]:
        raise NotImplementedError

    def mount(self, lowers: list[str], upper: str, work: str, mnt: str) -> None:
        cmd = self.command(lowers, upper, work, mnt)
        logpath = os.path.join(os.path.dirname(mnt), f"{self.name}.{len(self.procs)}.log")
        with open(logpath, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.env)
        self.procs[mnt] = (proc, logpath)
        try:
            _wait_mounted(mnt, proc)
        except BaseException as e:
            try:
                self.umount(mnt)
            except MountError:
                pass
            raise MountError(f"{' '.join(cmd)}: {e}\n{self._log(logpath)}") from None

    @staticmethod
    def _log(path: str) -> str:
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill(self, mnt: str) -> None:
        """The mount hangs: kill our server, which aborts its connection."""
        entry = self.procs.get(mnt)
        if entry is not None and entry[0].poll() is None:
            entry[0].kill()

    def umount(self, mnt: str) -> None:
        proc, logpath = self.procs.pop(mnt, (None, ""))
        if is_mounted(mnt):
            try:
                _run(["fusermount3", "-u", mnt])
            except MountError:
                _run(["fusermount3", "-u", "-z", mnt])
        if proc is None:
            return
        try:
            rc = proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise MountError(f"{self.name} for {mnt} did not exit within {EXIT_TIMEOUT:.0f}s after "
                             f"unmount:\n{self._log(logpath)}") from None
        log_text = self._log(logpath)
        if rc != 0 or "Traceback" in log_text:
            raise MountError(f"{self.name} daemon exited with {rc} after unmount:\n{log_text}")


class FuseOverlayfs(ForegroundFuse):
    """containers/fuse-overlayfs."""

    name = "fuse-overlayfs"

    def command(self, lowers: list[str], upper: str, work: str, mnt: str) -> list[str]:
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        return ["fuse-overlayfs", "-f", "-o", opts, mnt]


class Unionfs(ForegroundFuse):
    """Our unionfs: ``unionfs mount -f -o lowerdir=...,upperdir=...,workdir=...,whiteout=W MNT``."""

    name = "unionfs"

    def __init__(self, whiteout: str = "overlay", extra_options: str = "",
                 env: Mapping[str, str] | None = None, lower_dialect: str | None = None) -> None:
        super().__init__(env)
        self.whiteout = whiteout
        self.dialect = lower_dialect or whiteout
        self.extra_options = extra_options
        self.exe = self._find_exe()

    @staticmethod
    def _find_exe() -> str:
        here = os.path.join(os.path.dirname(sys.executable), "unionfs")
        return here if os.path.exists(here) else (shutil.which("unionfs") or "unionfs")

    def command(self, lowers: list[str], upper: str, work: str, mnt: str) -> list[str]:
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},whiteout={self.whiteout}"
        if self.extra_options:
            opts += "," + self.extra_options
        return [self.exe, "mount", "-f", "-o", opts, mnt]


def make_impl(name: str, whiteout: str = "overlay", env: Mapping[str, str] | None = None,
              lower_dialect: str | None = None, options: str = "") -> Impl:
    """An implementation by name: kernel, fuse-overlayfs or unionfs."""
    if name == "kernel":
        return KernelOverlay(options)
    if name == "fuse-overlayfs":
        return FuseOverlayfs(env)
    if name == "unionfs":
        return Unionfs(whiteout, options, env, lower_dialect)
    raise ValueError(f"unknown implementation {name!r} (kernel, fuse-overlayfs, unionfs)")
