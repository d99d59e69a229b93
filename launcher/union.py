"""Mounting the union that becomes the container's root: one function, two backends.

``mount_union(branches, mountpoint, ...)`` returns a handle whose ``close()``
unmounts and waits for the server.  The ``fuse`` backend serves the union from a
child of the launcher (forked as the launcher starts, see ``launcher.prefork``, to
call the core's ``serve()``; or ``unionfs mount -f``), in the launcher's own mount
(and user) namespace, with PR_SET_PDEATHSIG so that it dies with the launcher.
The ``overlay`` backend mounts kernel overlayfs instead; it was the stand-in while
the filesystem core was written and stays as a reference for benchmarks.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from launcher import prefork, syscalls

log = logging.getLogger(__name__)

BACKENDS = ("fuse", "overlay")
DEFAULT_BACKEND = os.environ.get("UNIONFS_RUN_BACKEND", "fuse")
MOUNT_TIMEOUT = 20.0


class LaunchError(Exception):
    """A user-facing failure: one line, and the exit status the launcher should return."""

    def __init__(self, message: str, exitcode: int = 125) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class Branch(NamedTuple):
    path: str
    mode: str | None = None  # "rw", "ro", ... as written by the user; None when not given

    def spec(self, default_mode: str) -> str:
        """``PATH=MODE`` for ``unionfs mount``, with ``\\`` and ``:`` in the path escaped."""
        path = self.path.replace("\\", "\\\\").replace(":", "\\:")
        return f"{path}={self.mode or default_mode}"


MODES = ("rw", "ro", "rr", "ro+wh", "rr+wh")


def _split_escaped(spec: str) -> list[str]:
    """Split on ``:`` where a backslash escapes the next character, as ``unionfs mount`` does."""
    from unionfs.core.config import split_escaped  # light: no trio or pyfuse3 behind it

    return split_escaped(spec, ":")


def parse_branches(spec: str) -> list[Branch]:
    """Parse an AUFS-style branch list, top first: ``UPPER:L2:L1`` or ``A=rw:B=ro``.

    ``\\:`` escapes a colon in a path.  Paths become absolute; each must be an existing directory.
    """
    branches: list[Branch] = []
    for item in _split_escaped(spec):
        if not item:
            raise LaunchError(f"empty branch in {spec!r}", 2)
        path, sep, mode = item.rpartition("=")
        if not sep:
            path, mode = item, ""
        if sep and mode not in MODES:
            path, mode = item, ""
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise LaunchError(f"branch is not a directory: {path}", 2)
        branches.append(Branch(path, mode or None))
    return branches


def branch_spec(branches: Sequence[Branch]) -> str:
    """The ``unionfs mount`` spec for *branches*: the first writable, the rest read-only unless told."""
    return ":".join(b.spec("rw" if i == 0 else "ro") for i, b in enumerate(branches))


class UnionHandle(Protocol):
    mountpoint: str

    def poll(self) -> int | None:
        """None while the union is being served; the server's exit status once it has gone."""

    def close(self) -> None:
        """Unmount and wait for the server to exit; idempotent, never raises."""


def _wait_mounted(mountpoint: str, alive: Poll, timeout: float = MOUNT_TIMEOUT) -> None:
    """Wait until *mountpoint* is a mount point of its own (its st_dev differs from its parent's)."""
    parent_dev = os.stat(os.path.dirname(mountpoint)).st_dev
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            if os.stat(mountpoint).st_dev != parent_dev:
                return
        except OSError:
            pass
        status = alive()
        if status is not None:
            raise LaunchError(f"the union's FUSE server exited with status {status} before mounting")
        if time.monotonic() > deadline:
            raise LaunchError(f"the union did not appear at {mountpoint} within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


class Poll(Protocol):
    def __call__(self) -> int | None: ...


def _server_preexec(parent: int) -> None:
    """In the server child before exec: die with the launcher, and leave the terminal's signals alone."""
    syscalls.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def unionfs_command() -> list[str]:
    """The filesystem core's command: ``UNIONFS_RUN_SERVER`` (split on spaces), or ``python -m unionfs``."""
    override = os.environ.get("UNIONFS_RUN_SERVER")
    if override:
        return override.split()
    return [sys.executable, "-m", "unionfs"]


def _private_pid_dir(
    branches: Sequence[Branch], keep: Sequence[str] = (), pid_dir: str = "/run/unionfs"
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

    By default the server is the child ``launcher.prefork`` forked when the launcher
    started (its imports done by now), told here what to serve; it answers on a pipe
    once mounted, so nothing polls.  With ``UNIONFS_RUN_SERVER`` it is that command,
    run as ``unionfs mount -f``.  Either way it dies with the launcher
    (PR_SET_PDEATHSIG), and ``close()`` unmounts and waits for it to exit.
    """

    proc: subprocess.Popen[bytes] | _ForkedServer

    def __init__(self, branches: Sequence[Branch], mountpoint: str, *, rootless: bool, logfile: str,
                 keep: Sequence[str] = ()) -> None:
        self.mountpoint = mountpoint
        self.logfile = logfile
        self._closed = False
        # suid as podman mounts a container root (a user namespace honours only the ids it maps)
        options = "allow_other,suid,whiteout=aufs" if rootless else "allow_other,suid"
        _private_pid_dir(branches, keep)
        spec = branch_spec(branches)
        try:
            if os.environ.get("UNIONFS_RUN_SERVER"):
                self._exec(spec, options)
            else:
                self._fork(spec, options)
        except BaseException as exc:
            self.close()
            if isinstance(exc, LaunchError):
                raise LaunchError(f"{exc}{self._log_tail()}") from None
            raise

    def _fork(self, spec: str, options: str) -> None:
        log.debug("FUSE server for %s on %s", spec, self.mountpoint)
        server = prefork.take()
        self.proc = _ForkedServer(server.pid)
        server.serve(spec, self.mountpoint, options, self.logfile)
        answer = b""
        while chunk := os.read(server.ready, 4096):  # "ready", "error: ...", or EOF if it died
            answer += chunk
        os.close(server.ready)
        if answer != b"ready":
            message = answer.decode(errors="replace").removeprefix("error: ")
            raise LaunchError(f"the union's FUSE server failed: {message or 'it exited before mounting'}")

    def _exec(self, spec: str, options: str) -> None:
        argv = [*unionfs_command(), "mount", "-f", "-o", options, spec, self.mountpoint]
        log.debug("starting FUSE server: %s", argv)
        parent = os.getpid()
        with open(self.logfile, "ab") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                preexec_fn=lambda: _server_preexec(parent),
            )
        _wait_mounted(self.mountpoint, self.proc.poll)

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

    def __init__(self, branches: Sequence[Branch], mountpoint: str, *, rootless: bool) -> None:
        import tempfile

        self.mountpoint = mountpoint
        upper, lowers = branches[0], branches[1:]
        if not lowers:
            raise LaunchError("the overlay backend needs at least one lower branch", 2)
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
    branches: Sequence[Branch],
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
    raise LaunchError(f"unknown union backend {backend!r} (choose from {', '.join(BACKENDS)})", 2)
