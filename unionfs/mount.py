"""The life of a mount: open the branches, mount, serve until unmounted, clean up in order.

`mount()` returns once the kernel has the mount and a daemon serves it (or serves in the foreground).
`umount()` unmounts and waits for that daemon to exit.  The daemon records its pid in a small file
keyed by the mount point, in /run/unionfs (root) or the user's runtime dir.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .config import MountConfig
from .errors import QuietError

if TYPE_CHECKING:
    from .operations import Operations

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"


def state_dir() -> str:
    if os.geteuid() == 0:
        return "/run/unionfs"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "unionfs")
    return f"/tmp/unionfs-{os.getuid()}"


def pidfile_for(mountpoint: str) -> str:
    digest = hashlib.sha1(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(state_dir(), f"{digest}.pid")


def check_fuse_device() -> None:
    """Fail early, in one line, when this process cannot use /dev/fuse."""
    if not os.path.exists(FUSE_DEVICE):
        raise QuietError(f"{FUSE_DEVICE} does not exist: load the fuse module (modprobe fuse)")
    if os.geteuid() != 0:
        return  # fusermount3 (setuid) opens the device for unprivileged users
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise QuietError(
            f"cannot open {FUSE_DEVICE}: {e.strerror}; fix: chmod 666 {FUSE_DEVICE} "
            "(as Debian's udev rules ship it)") from None
    os.close(fd)


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = {f"fsname={cfg.fsname}", "subtype=unionfs", "default_permissions"}
    if cfg.allow_other or os.geteuid() == 0:
        opts.add("allow_other")
    if not cfg.writable:
        opts.add("ro")
    opts.update(cfg.flags)
    return opts


def _mounts() -> Iterator[tuple[bytes, str, str]]:
    """(mount point, device major:minor, filesystem type) of each line of our mountinfo."""
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            yield _unescape(fields[4]), fields[2].decode(), fields[sep + 1].decode()


def _mount_at(mountpoint: str | bytes) -> tuple[str, str] | None:
    """(device, type) of the topmost mount at *mountpoint* (as given: nothing is resolved here)."""
    target = os.fsencode(mountpoint)
    found = None
    for where, dev, kind in _mounts():
        if where == target:
            found = (dev, kind)
    return found


def mount_type(mountpoint: str) -> str | None:
    found = _mount_at(os.path.realpath(mountpoint))
    return found[1] if found else None


def _unescape(field: bytes) -> bytes:
    """mountinfo escapes space, tab, newline and backslash as three octal digits."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mount(cfg: MountConfig, foreground: bool = False, debug: bool = False,
          log_file: str | None = None) -> int:
    """Mount *cfg*; return an exit status.  In the background, return once the mount is ready."""
    check_fuse_device()
    if log_file is not None:
        try:
            with open(log_file, "a"):
                pass
        except OSError as e:
            raise QuietError(f"log file {log_file!r}: {e.strerror}") from None
    if foreground:
        _setup_logging(debug, log_file)
        return serve(cfg, None, debug)
    if log_file is None:
        # The daemon's own log (warnings, and any unexpected error with its traceback) lives next
        # to its pidfile, so a background mount never loses one.
        candidate = pidfile_for(cfg.mountpoint).removesuffix(".pid") + ".log"
        try:
            os.makedirs(os.path.dirname(candidate), mode=0o700, exist_ok=True)
            with open(candidate, "a"):
                log_file = candidate
        except OSError:
            pass   # e.g. root only in a user namespace: no /run/unionfs to write to
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        code = 1
        ours = None
        try:
            os.setsid()
            _setup_logging(debug, log_file)
            ours = os.stat(log_file) if log_file else None
            code = serve(cfg, w, debug)
        except BaseException as e:  # noqa: B036 - the daemon must report, never raise past fork
            _report(w, f"error: {e}")
        finally:
            # An empty log goes, unless a later mount on the same point has taken the name over.
            with contextlib.suppress(OSError):
                if log_file is not None and ours is not None:
                    now = os.stat(log_file)
                    if now.st_size == 0 and (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
                        os.unlink(log_file)
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    msg = b"".join(chunks).decode(errors="replace")
    if msg == "ready":
        return 0
    os.waitpid(pid, 0)
    raise QuietError(msg.removeprefix("error: ") or "the daemon exited before the mount was ready")


def _report(fd: int | None, msg: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, msg.encode())
        os.close(fd)


def _setup_logging(debug: bool, log_file: str | None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def serve(cfg: MountConfig, ready_fd: int | None, debug: bool = False) -> int:
    """Open the branches, mount, serve until unmounted or signalled; always clean up."""
    import trio

    from .fusebind import pyfuse3, shim
    from .layers import open_stack, raise_nofile_limit
    from .operations import Operations
    from .union import Union

    os.umask(0)
    raise_nofile_limit()
    faults = frozenset(f for f in os.environ.get("UNIONFS_FAULT", "").split(",") if f)
    with contextlib.ExitStack() as stack:
        try:
            layers = open_stack(cfg.branches if cfg.writable else [(p, False) for p, _ in cfg.branches],
                                cfg.workdir, cfg.style == "aufs")
        except OSError as e:
            where = os.fsdecode(e.filename) if e.filename is not None else "?"
            raise QuietError(f"cannot open branches: {e.strerror}: {where}") from None
        stack.callback(layers.close)
        union = Union(layers, cfg.dialect, readonly=not cfg.writable, faults=faults)
        stack.callback(union.close)
        ops = Operations(union, timeout=cfg.timeout, debug=debug)
        ops.use_shim()
        # Everything that touches the mount point path happens before the mount: once mounted,
        # a stat of it from this thread would wait for a reply only this thread can give.
        pidfile = pidfile_for(cfg.mountpoint)
        if os.geteuid() != 0 and {"suid", "dev"} & set(cfg.flags):
            log.warning("-o %s ignored: fusermount3 mounts nosuid,nodev for users other than root",
                        ",".join(f for f in cfg.flags if f in ("suid", "dev")))
        try:
            pyfuse3.init(ops, cfg.mountpoint, fuse_options(cfg))
        except RuntimeError as e:
            raise QuietError(f"cannot mount on {cfg.mountpoint!r}: {e}") from None
        stack.callback(_close_session, pyfuse3)
        if shim is not None and not shim.sessions():
            log.warning("the libfuse shim was bypassed: no fallocate, no cached listings")
        _write_pidfile(pidfile)
        stack.callback(_remove, pidfile)
        if faults:
            log.warning("fault injection active: %s", ",".join(sorted(faults)))
        if ready_fd is not None:
            _report(ready_fd, "ready")
            _detach_stdio()
        trio.run(_main, pyfuse3, ops, cfg.mountpoint)
    return 0


READ_AHEAD_KB = 1024


def _raise_read_ahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB on this mount (FUSE's default is 128 KiB): big sequential
    reads then arrive as 1 MiB requests instead of 128 KiB ones.  Root only; best effort.

    The mount's device comes from mountinfo: a stat of the mount point would wait for this thread.
    """
    try:
        found = _mount_at(mountpoint)
        if found is None or found[1] != "fuse.unionfs":
            return
        dev = found[0]
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except (OSError, ValueError) as e:
        log.debug("read-ahead left at the default: %s", e)


def _close_session(pyfuse3: object) -> None:
    try:
        pyfuse3.close(unmount=True)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - unmount on the way out must not hide the real error
        log.exception("closing the FUSE session")


async def _main(pyfuse3: object, ops: Operations, mountpoint: str) -> None:
    import trio

    initialised = trio.Event()
    ops.on_init = initialised.set

    async def after_init() -> None:
        # The kernel sets the read-ahead from our INIT reply, which goes out right after init().
        await initialised.wait()
        _raise_read_ahead(mountpoint)

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for sig in signals:
                log.info("signal %d: unmounting", sig)
                pyfuse3.terminate()  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        nursery.start_soon(after_init)
        await pyfuse3.main()  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) for h in root.handlers):
        os.dup2(devnull, 2)
    else:
        os.dup2(devnull, 2)
        root.handlers[:] = [logging.NullHandler()]
    os.close(devnull)


def _write_pidfile(path: str) -> None:
    """Best effort: `unionfs umount` uses it to wait for the daemon.  A daemon that is root only in
    a user namespace cannot write /run/unionfs, and serves all the same."""
    try:
        _write_pidfile_at(path)
    except OSError as e:
        log.debug("no pidfile: %s", e)


def _write_pidfile_at(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        with open(path) as f:
            if int(f.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)


def umount(mountpoint: str, timeout: float = 60.0) -> None:
    """Unmount a unionfs mount and wait for its daemon to exit."""
    mp = os.path.realpath(mountpoint)
    kind = mount_type(mp)
    if kind is None:
        raise QuietError(f"{mountpoint!r} is not mounted")
    if kind != "fuse.unionfs":
        raise QuietError(f"{mountpoint!r} is not a unionfs mount (it is {kind})")
    pid = None
    with contextlib.suppress(OSError, ValueError):
        with open(pidfile_for(mp)) as f:
            pid = int(f.read().strip())
    proc = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise QuietError(err[-1] if err else f"fusermount3 -u {mp} failed")
    if pid is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    return
                raise
            if _is_zombie(pid):
                return
            time.sleep(0.01)
        raise QuietError(f"unmounted, but the daemon (pid {pid}) has not exited after {timeout:.0f}s")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True
