"""The implementations the oracle can compare: kernel overlayfs, fuse-overlayfs and unionfs.

Each knows how to mount lower layers (top first), an upper and a work dir on a mount point, how to
unmount it again (waiting until everything is written), and which whiteout dialect its lower layers
should be written in. Mounts are found in /proc/self/mountinfo; nothing here touches a mount point
it did not create.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping

from . import harness
from .harness import MountError, abort_fuse, is_mounted

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = harness.MOUNT_TIMEOUT
EXIT_TIMEOUT = harness.EXIT_TIMEOUT

__all__ = ["MountError", "abort_fuse", "is_mounted", "make_impl"]


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
        # later options win: "redirect_dir=on" turns the feature back on
        harness.mount_overlay(lowers, upper, work, mnt, [self.OPTIONS, self.extra_options])

    def umount(self, mnt: str) -> None:
        harness.run_helper(["umount", mnt])


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
        proc = harness.start_daemon(cmd, mnt, logpath, self.env)
        self.procs[mnt] = (proc, logpath)

    def kill(self, mnt: str) -> None:
        """The mount hangs: kill our server, which aborts its connection."""
        entry = self.procs.get(mnt)
        if entry is not None and entry[0].poll() is None:
            entry[0].kill()

    def umount(self, mnt: str) -> None:
        proc, logpath = self.procs.pop(mnt, (None, ""))
        rc = harness.unmount(mnt, proc)
        if proc is None:
            return
        log_text = harness.read_log(logpath)[-3000:]
        if rc != 0 or "Traceback" in log_text:
            raise MountError(f"{self.name} daemon exited with {rc} after unmount:\n{log_text}")


class FuseOverlayfs(ForegroundFuse):
    """containers/fuse-overlayfs."""

    name = "fuse-overlayfs"

    def command(self, lowers: list[str], upper: str, work: str, mnt: str) -> list[str]:
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        return ["fuse-overlayfs", "-f", "-o", opts, mnt]


class Unionfs(ForegroundFuse):
    """Our unionfs: ``unionfs mount -f -o lowerdir=...,upperdir=...,workdir=...,whiteout=W MNT``;
    with *fault*, the same through `unionfs.conformance.faults`, with those bugs planted."""

    name = "unionfs"

    def __init__(self, whiteout: str = "overlay", extra_options: str = "",
                 env: Mapping[str, str] | None = None, lower_dialect: str | None = None,
                 fault: str = "") -> None:
        super().__init__(env)
        self.whiteout = whiteout
        self.dialect = lower_dialect or whiteout
        self.extra_options = extra_options
        self.fault = fault
        # Imported here, not at the top: `python -m unionfs.conformance.faults` must find that
        # module not yet imported by this package.
        from .faults import parse

        parse(fault)   # an unknown fault is refused before anything is mounted

    def command(self, lowers: list[str], upper: str, work: str, mnt: str) -> list[str]:
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},whiteout={self.whiteout}"
        if self.extra_options:
            opts += "," + self.extra_options
        from .faults import command

        return command(self.fault, ["mount", "-f", "-o", opts, mnt])


def make_impl(name: str, whiteout: str = "overlay", env: Mapping[str, str] | None = None,
              lower_dialect: str | None = None, options: str = "", fault: str | None = None) -> Impl:
    """An implementation by name: kernel, fuse-overlayfs or unionfs (*fault*: planted bugs, see
    `unionfs.conformance.faults`)."""
    if fault and name != "unionfs":
        raise ValueError(f"faults are planted in unionfs only, not in {name}")
    if name == "kernel":
        return KernelOverlay(options)
    if name == "fuse-overlayfs":
        return FuseOverlayfs(env)
    if name == "unionfs":
        return Unionfs(whiteout, options, env, lower_dialect, fault or "")
    raise ValueError(f"unknown implementation {name!r} (kernel, fuse-overlayfs, unionfs)")
