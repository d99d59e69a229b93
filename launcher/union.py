"""Mounting the union that becomes the container's root: one function, two backends.

``mount_union(branches, mountpoint, ...)`` returns a handle whose ``close()``
unmounts and waits for the server.  The ``fuse`` backend builds the union's
``MountConfig`` through the core's config (the rules and messages of ``unionfs
mount``) and hands it to a child of the launcher (forked as the launcher starts, see
``launcher.prefork``) that serves it with the server's ``serve()``, in the launcher's
own mount (and user) namespace, with PR_SET_PDEATHSIG so that it dies with the
launcher.  The ``overlay`` backend mounts kernel overlayfs instead; it was the
stand-in while the filesystem core was written and stays as a reference for
benchmarks.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Protocol

from launcher import prefork, syscalls
from launcher.errors import EXIT_USAGE, LaunchError
from unionfs.core.config import BranchSpec, MountConfig, build_config
from unionfs.core.errors import QuietError

log = logging.getLogger(__name__)

BACKENDS = ("fuse", "overlay")
DEFAULT_BACKEND = "fuse"


class UnionHandle(Protocol):
    mountpoint: str

    def poll(self) -> int | None:
        """None while the union is being served; the server's exit status once it has gone."""

    def close(self) -> None:
        """Unmount and wait for the server to exit; idempotent, never raises."""


def _private_pid_dir(
    branches: Sequence[BranchSpec], keep: Sequence[str] = (), pid_dir: str = "/run/unionfs"
) -> None:
    """Give the server a /run/unionfs of its own: a tmpfs in the launcher's private mount namespace.

    ``unionfs mount`` records its pid under /run/unionfs whenever its euid is 0.  On
    the host's directory that file would outlive a SIGKILLed launcher, every
    launcher's would have the same name (the mount point path is the same in each
    private namespace), and inside a user namespace the server could not write it
    at all and would fail before mounting.  A private tmpfs fixes all three.  Where
    /run/unionfs does not exist, /run itself is covered (making the directory would
    leave it behind on the host), unless a branch or a path in *keep* lives there.
    """
    def holds_branch(path: str) -> bool:
        return any(p == path or p.startswith(path + "/") for p in (*(b.path for b in branches), *keep))

    target = pid_dir if os.path.isdir(pid_dir) else os.path.dirname(pid_dir)
    if holds_branch(target):
        return
    # /run/unionfs itself must be 0700 for the server to use it (unionfs.server.statedir); /run stays 0755.
    mode = "mode=0700" if target == pid_dir else "mode=0755"
    syscalls.mount("tmpfs", target, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, mode,
                   step="mount tmpfs for the server's pidfile")


class _ForkedServer:
    """The FUSE server forked from the launcher without exec: the subset of Popen we use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.002)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


class FuseUnion:
    """The unionfs FUSE server as a child of the launcher, serving the union at *mountpoint*.

    The server is the child ``launcher.prefork`` forked when the launcher started (its
    imports done by now), told here what to serve; it answers on a pipe once mounted, so
    nothing polls.  It dies with the launcher (PR_SET_PDEATHSIG), and ``close()``
    unmounts and waits for it to exit.
    """

    proc: _ForkedServer

    def __init__(self, branches: Sequence[BranchSpec], mountpoint: str, *, rootless: bool, logfile: str,
                 keep: Sequence[str] = ()) -> None:
        self.mountpoint = mountpoint
        self.logfile = logfile
        self._closed = False
        # suid as podman mounts a container root (a user namespace honours only the ids it maps)
        options = "allow_other,suid,whiteout=aufs" if rootless else "allow_other,suid"
        try:
            config = build_config(branches, mountpoint, [options])
        except QuietError as exc:
            raise LaunchError(exc.message) from None
        _private_pid_dir(branches, keep)
        try:
            self._serve(config)
        except BaseException as exc:
            self.close()
            if isinstance(exc, LaunchError):
                raise LaunchError(f"{exc}{self._log_tail()}") from None
            raise

    def _serve(self, config: MountConfig) -> None:
        log.debug("FUSE server for %s on %s", config.branches, self.mountpoint)
        server = prefork.take()
        self.proc = _ForkedServer(server.pid)
        server.serve(config, self.logfile)
        try:
            server.wait_ready()
        except QuietError as exc:
            raise LaunchError(f"the union's FUSE server failed: {exc.message}") from None

    def _log_tail(self) -> str:
        try:
            with open(self.logfile, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return (": " + lines[-1]) if lines else ""

    def poll(self) -> int | None:
        return self.proc.poll()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not hasattr(self, "proc"):
            return
        if self.proc.poll() is None:
            for flags in (0, syscalls.MNT_DETACH):
                try:
                    syscalls.umount2(self.mountpoint, flags)
                    break
                except OSError as exc:
                    log.debug("umount %s: %s", self.mountpoint, exc)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("FUSE server %d did not exit after unmount; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        else:
            try:  # a dead server leaves a dead mount behind
                syscalls.umount2(self.mountpoint, syscalls.MNT_DETACH)
            except OSError:
                pass


class OverlayUnion:
    """Kernel overlayfs with the same branch order; the upper's work dir is a sibling temp dir."""

    def __init__(self, branches: Sequence[BranchSpec], mountpoint: str, *, rootless: bool) -> None:
        import tempfile

        self.mountpoint = mountpoint
        upper, lowers = branches[0], branches[1:]
        if not lowers:
            raise LaunchError("the overlay backend needs at least one lower branch", EXIT_USAGE)
        self.workdir = tempfile.mkdtemp(prefix=".unionfs-work-", dir=os.path.dirname(upper.path))
        def esc(path: str) -> str:
            return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")

        lowerdir = ":".join(esc(b.path) for b in lowers)
        data = f"lowerdir={lowerdir},upperdir={esc(upper.path)},workdir={esc(self.workdir)}"
        if rootless:
            data += ",userxattr"
        try:
            syscalls.mount("overlay", mountpoint, "overlay", 0, data, step="mount overlay")
        except BaseException:
            os.rmdir(self.workdir)
            raise
        self._closed = False

    def poll(self) -> int | None:
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            syscalls.umount2(self.mountpoint, syscalls.MNT_DETACH)
        except OSError as exc:
            log.warning("umount %s: %s", self.mountpoint, exc)
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)


def mount_union(
    branches: Sequence[BranchSpec],
    mountpoint: str,
    *,
    rootless: bool,
    logfile: str,
    backend: str = DEFAULT_BACKEND,
    keep: Sequence[str] = (),
) -> UnionHandle:
    """Mount the union of *branches* (top first; the first is writable) at *mountpoint*.

    Returns once the mount is ready.  *keep*: host paths the launcher still needs (volume
    sources), which the server's private pid directory must not cover.  The server (if any) is a child of the
    calling process, in its namespaces, and dies with it.
    """
    if backend == "overlay":
        prefork.discard()
        return OverlayUnion(branches, mountpoint, rootless=rootless)
    if backend == "fuse":
        return FuseUnion(branches, mountpoint, rootless=rootless, logfile=logfile, keep=keep)
    raise LaunchError(f"unknown union backend {backend!r} (choose from {', '.join(BACKENDS)})", EXIT_USAGE)
