"""Mount and unmount the implementations under test, always fresh and never left behind.

Each implementation gets its own run directory `BASE_DIR/run/<impl>/{upper,work,mnt}`; before every mount
the upper and work directories are recreated from the template, so no workload sees another's writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from spec import BASE_DIR

from unionfs.conformance import harness
from unionfs.core import mountinfo

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
IMPLEMENTATIONS = ("native", "kernel", "fuse-overlayfs", "unionfs")
MOUNT_TIMEOUT = harness.MOUNT_TIMEOUT
UNMOUNT_TIMEOUT = 30.0


class MountError(Exception):
    """The implementation could not be mounted; the message is one line for the report."""


def _one_line(e: Exception) -> MountError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["(no message)"]
    return MountError(f"{lines[0]} {lines[-1]}" if len(lines) > 1 else lines[0])


@dataclass
class Mounted:
    """A mounted (or native) merged view."""

    impl: str
    root: Path  # where the merged view appears
    upper: Path | None  # the upper layer behind it (None for native)
    daemon_pid: int | None = None  # the FUSE server, when known


def mounted_points() -> dict[str, str]:
    """Mount points under BASE_DIR, with their filesystem type."""
    prefix = os.fsencode(BASE_DIR) + b"/"
    return {os.fsdecode(m.point): m.fstype for m in mountinfo.mounts() if m.point.startswith(prefix)}


def is_mounted(path: Path) -> bool:
    return str(path) in mounted_points()


def cleanup_stale_mounts() -> list[str]:
    """Unmount whatever a previous, interrupted run of this benchmark left under BASE_DIR."""
    left = mounted_points()
    for point, fstype in sorted(left.items(), reverse=True):
        force_unmount(Path(point), fstype)
    return sorted(left)


def force_unmount(point: Path, fstype: str | None = None) -> None:
    fstype = fstype or mounted_points().get(str(point), "")
    command = ["fusermount3", "-u", "-z"] if fstype.startswith("fuse") else ["umount", "-l"]
    subprocess.run([*command, str(point)], capture_output=True, timeout=UNMOUNT_TIMEOUT)


def stop_stuck_server(view: Mounted) -> None:
    """Unblock everything waiting on our own FUSE mount: abort its connection (when fusectl is mounted)
    and SIGKILL its server, which we started."""
    if view.impl in ("fuse-overlayfs", "unionfs") and is_mounted(view.root):
        abort_fuse_connection(view.root)
    if view.daemon_pid is not None:
        try:
            os.kill(view.daemon_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def abort_fuse_connection(point: Path) -> None:
    """Abort the FUSE connection behind `point` (only ever one of our own mounts), unblocking any waiter."""
    harness.abort_fuse(point)


def fresh_run_dir(impl: str, upper_template: Path | None) -> tuple[Path, Path, Path]:
    run = BASE_DIR / "run" / impl
    upper, work, mnt = run / "upper", run / "work", run / "mnt"
    if is_mounted(mnt):
        force_unmount(mnt)
    for old in (upper, work):
        if old.exists():
            shutil.rmtree(old)
    mnt.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True)
    if upper_template is None:
        upper.mkdir()
    else:
        # cp -a copies the whiteouts (character devices) as devices; shutil.copytree would read them.
        subprocess.run(["cp", "-a", str(upper_template), str(upper)], check=True)
    return upper, work, mnt


def overlay_options(lowers: list[Path], upper: Path, work: Path) -> str:
    return ",".join(harness.overlay_options(lowers, upper, work))


@contextmanager
def mount(
    impl: str, lowers: list[Path], upper_template: Path | None, native: Path, unionfs_options: str = ""
) -> Iterator[Mounted]:
    """Mount `impl` over `lowers` (top first) with a fresh upper; yield the merged view; always unmount.

    `unionfs_options` are appended to unionfs' -o (for trying settings such as timeout=)."""
    if impl == "native":
        yield Mounted(impl, native, None)
        return
    upper, work, mnt = fresh_run_dir(impl, upper_template)
    options = overlay_options(lowers, upper, work)
    if impl == "unionfs" and unionfs_options:
        options += "," + unionfs_options
    starter = {"kernel": _mount_kernel, "fuse-overlayfs": _mount_fuse_overlayfs, "unionfs": _mount_unionfs}[
        impl
    ]
    process: subprocess.Popen[bytes] | None = None
    ready = False
    try:
        process = starter(options, mnt)
        try:
            harness.wait_mounted(mnt, process)
        except harness.MountError as e:
            raise _one_line(e) from None
        ready = True
        yield Mounted(impl, mnt, upper, _daemon_pid(impl, process, mnt))
    finally:
        _unmount(impl, mnt, process, stuck=not ready)


def _mount_kernel(options: str, mnt: Path) -> None:
    _run_mount_command(["mount", "-t", "overlay", "overlay", "-o", options, str(mnt)])


def _mount_fuse_overlayfs(options: str, mnt: Path) -> subprocess.Popen[bytes]:
    # Foreground (-f) as our own child: we know its pid, and we wait for it after unmounting.
    return subprocess.Popen(
        ["fuse-overlayfs", "-f", "-o", options, str(mnt)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _mount_unionfs(options: str, mnt: Path) -> None:
    _run_mount_command([str(VENV_BIN / "unionfs"), "mount", "-o", options, str(mnt)])


def _run_mount_command(command: list[str]) -> None:
    try:
        harness.run_helper(command, timeout=MOUNT_TIMEOUT)
    except harness.MountError as e:
        raise _one_line(e) from None


def _daemon_pid(impl: str, process: subprocess.Popen[bytes] | None, mnt: Path) -> int | None:
    if process is not None:
        return process.pid
    if impl == "unionfs":
        return find_daemon_pid(mnt)
    return None


def find_daemon_pid(mnt: Path) -> int | None:
    """The pid of the unionfs daemon serving `mnt`: the one its pidfile names (a resident server's
    worker, whose command line is the server's), else the one whose command line names `mnt`."""
    from unionfs.server.statedir import StateDir, pid_name

    state = StateDir.open(create=False)
    if state is not None:
        try:
            record = state.daemon(pid_name(str(mnt)))
        finally:
            state.close()
        if record is not None:
            return record.pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(mnt).encode() in argv and any(b"unionfs" in a for a in argv[:3]):
            return int(entry.name)
    return None


def kill_stuck_daemon(impl: str, mnt: Path, process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the FUSE server of our own mount `mnt` (a server blocked on its own mount never answers)."""
    if process is not None:
        process.kill()
        return
    if impl == "unionfs":
        pid = find_daemon_pid(mnt)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def _unmount(impl: str, mnt: Path, process: subprocess.Popen[bytes] | None, stuck: bool = False) -> None:
    if stuck:
        kill_stuck_daemon(impl, mnt, process)
    if is_mounted(mnt):
        command = {
            "kernel": ["umount", str(mnt)],
            "fuse-overlayfs": ["fusermount3", "-u", str(mnt)],
            "unionfs": [str(VENV_BIN / "unionfs"), "umount", str(mnt)],
        }[impl]
        try:
            result = subprocess.run(command, capture_output=True, timeout=UNMOUNT_TIMEOUT)
            failed = result.returncode != 0
        except subprocess.TimeoutExpired:
            failed = True
        if failed or is_mounted(mnt):
            kill_stuck_daemon(impl, mnt, process)
            force_unmount(mnt)
    if process is not None:
        try:
            process.wait(timeout=UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()  # our own child only
            process.wait()
