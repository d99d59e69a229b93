"""Mounting implementations side by side over the same branches, and never leaving one behind.

The one place that mounts kernel overlayfs, starts a FUSE server (unionfs, unionfs-overlay,
fuse-overlayfs) as our own foreground child with its output in a log file, waits (bounded) for the
mount, unmounts it (normally, then lazily as the last resort), waits for the server to exit, aborts a
hung FUSE connection, and reads a server's log for warnings and tracebacks.  The conformance oracle
(`impls`), the benchmark (perf/mounts.py) and the tests (tests/util.py) all go through it.

Nothing here touches a mount point it was not given; mounts are found in /proc/self/mountinfo,
which never blocks on a hung FUSE mount.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence

from unionfs.core import mountinfo

MOUNT_TIMEOUT = 30.0  # for a mount to appear
EXIT_TIMEOUT = 60.0  # for a FUSE server to exit once unmounted (generous: CI machines are busy)

#: How a skip because the machine lacks FUSE or kernel overlayfs starts (the tests' CI check looks
#: for these words).
NEEDS_FUSE = "needs FUSE"
NEEDS_OVERLAY = "needs overlayfs"

#: The log file of every server `start_daemon` started, in order: the tests read them after each
#: test for unexpected warnings and tracebacks.
started_logs: list[str] = []

PathLike = str | bytes | os.PathLike[str]


class MountError(RuntimeError):
    """A mount or unmount failed; the message names the command and ends with its output."""


def _path(p: PathLike) -> str:
    return os.fsdecode(os.fspath(p))


def overlay_options(lowers: Sequence[PathLike], upper: PathLike | None = None,
                    work: PathLike | None = None) -> list[str]:
    """``lowerdir=A:B`` (top first), and ``upperdir=U``, ``workdir=W`` when there is an upper."""
    opts = ["lowerdir=" + ":".join(_path(p) for p in lowers)]
    if upper is not None:
        opts.append(f"upperdir={_path(upper)}")
        if work is not None:
            opts.append(f"workdir={_path(work)}")
    return opts


def run_helper(cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = MOUNT_TIMEOUT
               ) -> None:
    """Run a mount or unmount program; raise `MountError` with its output when it fails.

    Its output goes to a file, not a pipe: a server it forks inherits it, and reading a pipe to the
    end would wait for that server to exit rather than for the command."""
    with tempfile.TemporaryFile() as out:
        try:
            res = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 env=None if env is None else dict(env), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MountError(f"{' '.join(cmd)}: no answer after {timeout:.0f}s") from None
        except OSError as e:
            raise MountError(f"{' '.join(cmd)}: {e}") from None
        if res.returncode != 0:
            out.seek(0)
            text = out.read().decode(errors="replace").strip()
            raise MountError(f"{' '.join(cmd)}: exit {res.returncode}: {text[-2000:]}")


def mount_overlay(lowers: Sequence[PathLike], upper: PathLike | None, work: PathLike | None, mnt: PathLike,
                  options: Sequence[str] = ()) -> None:
    """Mount kernel overlayfs; later *options* win over earlier ones."""
    opts = overlay_options(lowers, upper, work) + [o for o in options if o]
    run_helper(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), _path(mnt)])


def is_mounted(mnt: PathLike) -> bool:
    """Whether something is mounted at *mnt* (its real path)."""
    return mountinfo.is_mounted(os.fsencode(os.fspath(mnt)))


def mount_type(mnt: PathLike) -> str | None:
    """The type of the topmost mount exactly at *mnt* (made absolute, symlinks not resolved)."""
    found = mountinfo.mount_at(os.path.abspath(os.fsencode(os.fspath(mnt))))
    return None if found is None else found.fstype


def wait_mounted(mnt: PathLike, proc: subprocess.Popen[bytes] | None = None, timeout: float = MOUNT_TIMEOUT,
                 fstype_prefix: str = "") -> None:
    """Wait (bounded) until a filesystem whose type starts with *fstype_prefix* is mounted at
    *mnt*; raise `MountError` if *proc* exits first or the time runs out."""
    try:
        mountinfo.wait_for_mount(mnt, timeout, exited=None if proc is None else proc.poll,
                                 fstype=fstype_prefix)
    except ChildProcessError:
        assert proc is not None
        raise MountError(f"daemon exited with {proc.returncode} before {_path(mnt)} was mounted") from None
    except TimeoutError:
        raise MountError(f"{_path(mnt)}: not mounted after {timeout:.0f}s") from None


def read_log(path: PathLike, start: int = 0) -> str:
    """What a server wrote to its log from byte *start* on ("" when there is no log)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def start_daemon(cmd: Sequence[str], mnt: PathLike, log: PathLike, env: Mapping[str, str] | None = None,
                 timeout: float = MOUNT_TIMEOUT) -> subprocess.Popen[bytes]:
    """Start a FUSE server in the foreground as our child, its output appended to *log*, and wait
    until it has mounted *mnt*.  If it does not, nothing is left mounted or running and
    `MountError` says why, with the end of its log."""
    start = os.path.getsize(log) if os.path.exists(log) else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=None if env is None else dict(env))
    started_logs.append(_path(log))
    try:
        wait_mounted(mnt, proc, timeout, fstype_prefix="fuse")
    except BaseException as e:
        proc.kill()
        with contextlib.suppress(MountError):
            unmount(mnt, proc)
        raise MountError(f"{' '.join(cmd)}: {e}\n{read_log(log, start)[-3000:]}") from None
    return proc


def unmount(mnt: PathLike, proc: subprocess.Popen[bytes] | None = None, timeout: float = EXIT_TIMEOUT
            ) -> int | None:
    """Unmount *mnt* and never leave it mounted: a normal unmount first, a lazy one as the last
    resort.  With *proc* (the server we started for it), wait for it to exit, killing it only after
    the bounded wait (then `MountError`).  Returns the server's exit status, or None."""
    path = _path(mnt)
    for lazy in (False, True):
        t = mount_type(path)
        if t is None:
            break
        if t.startswith("fuse") and shutil.which("fusermount3"):
            cmd = ["fusermount3", "-u", "-z", path] if lazy else ["fusermount3", "-u", path]
        else:
            cmd = ["umount", "-l", path] if lazy else ["umount", path]
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
    if mount_type(path) is not None:
        raise MountError(f"could not unmount {path}")
    if proc is None:
        return None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise MountError(f"the server of {path} did not exit {timeout:.0f}s after the unmount") from None


def abort_fuse(mnt: PathLike) -> bool:
    """Abort the FUSE connection mounted at *mnt* (ours, hung) through fusectl, so that the system
    calls blocked on it fail with ENOTCONN.  False when nothing is mounted there or fusectl is not."""
    return bool(abort_fuse_under(mnt, below=False))


def abort_fuse_under(prefix: PathLike, below: bool = True) -> list[bytes]:
    """Abort every FUSE connection mounted at *prefix* (and, with *below*, under it); return the
    mount points aborted."""
    pre = os.path.abspath(os.fsencode(os.fspath(prefix)))
    aborted = []
    for m in mountinfo.mounts():
        if m.fstype.startswith("fuse") and (m.point == pre or (below and m.point.startswith(pre + b"/"))):
            try:
                with open(f"/sys/fs/fuse/connections/{m.dev.split(':')[1]}/abort", "w") as a:
                    a.write("1")
                aborted.append(m.point)
            except OSError:
                pass
    return aborted


def fuse_problem() -> str | None:
    """None when this machine can serve FUSE mounts, else why not (starting with NEEDS_FUSE)."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"{NEEDS_FUSE}: cannot open /dev/fuse: {e.strerror}"
    if shutil.which("fusermount3") is None:
        return f"{NEEDS_FUSE}: fusermount3 not on PATH (apt-get install fuse3)"
    return None


def overlay_problem() -> str | None:
    """None when kernel overlayfs can be mounted here (tried for real), else why not (starting with
    NEEDS_OVERLAY)."""
    with tempfile.TemporaryDirectory(prefix="ovl-probe-", dir="/var/tmp") as d:
        for n in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(d, n))
        try:
            mount_overlay([f"{d}/l"], f"{d}/u", f"{d}/w", f"{d}/m")
        except MountError as e:
            return f"{NEEDS_OVERLAY}: {e}"
        unmount(f"{d}/m")
    return None


#: A line of the daemon's log format ("DATE TIME LOGGER LEVEL message") at WARNING or above.
_LOUD = re.compile(r"^\S+ \S+ \S+ (WARNING|ERROR|CRITICAL) ")


def log_problems(text: str, allowed: Sequence[str] = ()) -> list[str]:
    """The lines of a server's log that a clean run does not write: warnings, errors and tracebacks
    (a traceback counts as its last line, the exception), except those matching (`re.search`) one of
    the *allowed* patterns."""
    found = []
    lines = text.splitlines()
    in_tb = False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_tb = True
            continue
        if in_tb:
            if line.startswith((" ", "\t")) or not line.strip():
                continue
            in_tb = False
            if line.startswith(("During handling", "The above exception")):
                continue
            found.append(f"traceback: {line}")
            continue
        if _LOUD.match(line) or "Traceback" in line:
            found.append(line)
    return [f for f in found if not any(re.search(p, f) for p in allowed)]
