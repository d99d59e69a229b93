"""FUSE passthrough (Linux 6.9+, root): open files of the writable branch (any file of a read-only
union) are read and written by the kernel itself, on the real file, without the server.

What a user sees: the daemon's start-up line says whether it is in force; a file open with it keeps
reading while the server is stopped (SIGSTOP), which a file served by the server cannot; sizes and
times that the kernel changed behind the server are what stat shows; every mix of opens the
kernel's rules constrain (one backing file per inode, no passthrough beside cached opens) still
opens; without CAP_SYS_ADMIN in the initial user namespace the server falls back and says so once.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from unionfs.conformance import harness
from unionfs.conformance.harness import start_daemon

pytestmark = pytest.mark.fuse

UNIONFS = str(Path(sys.executable).with_name("unionfs"))
ASKED = "FUSE passthrough asked"


def _kernel_offers() -> bool:
    release = os.uname().release.split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= (6, 9)
    except (ValueError, IndexError):
        return False


need_passthrough = pytest.mark.skipif(os.geteuid() != 0 or not _kernel_offers(),
                                      reason="FUSE passthrough needs root and Linux 6.9+")


@dataclass
class Mounted:
    mnt: Path
    lower: Path
    upper: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def p(self, name: str) -> str:
        return str(self.mnt / name)

    def said(self, text: str, timeout: float = 10.0) -> bool:
        """Whether the daemon's log has *text*, waiting for it (the kernel's INIT comes through
        the session after the mount is seen)."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@pytest.fixture
def mount(tmp_path: Path, need_fuse: None) -> Iterator[Callable[..., Mounted]]:
    """mount(*options): a union of upper (writable) over lower, served in the foreground by
    ``unionfs mount``; unmounted after the test."""
    done: list[Mounted] = []

    def start(*options: str) -> Mounted:
        lower, upper, mnt = (tmp_path / n for n in ("lower", "upper", "mnt"))
        for d in (lower, upper, mnt):
            d.mkdir(exist_ok=True)
        (lower / "lf").write_bytes(b"lower data\n")
        (upper / "uf").write_bytes(b"upper data\n")
        log = tmp_path / "daemon.log"
        opts = ["-o", ",".join(options)] if options else []
        proc = start_daemon([UNIONFS, "mount", "-f", *opts, f"{upper}=rw:{lower}", str(mnt)], mnt, log)
        m = Mounted(mnt, lower, upper, log, proc)
        done.append(m)
        return m

    yield start
    for m in done:
        os.kill(m.proc.pid, signal.SIGCONT)
        harness.unmount(m.mnt, m.proc)


def _read_while_stopped(m: Mounted, fd: int) -> bytes | None:
    """pread of *fd* with the server stopped: the bytes, or None when it waited for the server."""
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(os.pread(fd, 100, 0)), daemon=True)
    os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        t.start()
        t.join(2.0)
        waited = t.is_alive()
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
    t.join(10.0)
    return None if waited else got[0]


@need_passthrough
def test_upper_file_read_without_the_server(mount: Callable[..., Mounted]) -> None:
    m = mount()
    assert m.said(ASKED), m.log.read_text()
    fd = os.open(m.p("uf"), os.O_RDONLY)
    try:
        assert _read_while_stopped(m, fd) == b"upper data\n"
    finally:
        os.close(fd)


@need_passthrough
def test_off_serves_every_read(mount: Callable[..., Mounted]) -> None:
    m = mount("passthrough=off")
    assert m.said("FUSE passthrough off (passthrough=off)"), m.log.read_text()
    fd = os.open(m.p("uf"), os.O_RDONLY)
    try:
        assert _read_while_stopped(m, fd) is None
        assert os.pread(fd, 100, 0) == b"upper data\n"
    finally:
        os.close(fd)


@need_passthrough
def test_lower_file_read_is_served(mount: Callable[..., Mounted]) -> None:
    """A read-only open of a lower file is the server's: a later open for writing copies it up."""
    m = mount()
    fd = os.open(m.p("lf"), os.O_RDONLY)
    try:
        assert _read_while_stopped(m, fd) is None
    finally:
        os.close(fd)


@need_passthrough
def test_sizes_and_times_follow_passthrough_writes(mount: Callable[..., Mounted]) -> None:
    m = mount()
    fd = os.open(m.p("new"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        before = os.stat(m.p("new"))
        os.utime(m.p("new"), ns=(10**18, 10**18))
        for i in range(64):
            os.write(fd, bytes([i]) * 4096)
        st = os.stat(m.p("new"))
        assert st.st_size == 64 * 4096
        assert st.st_mtime_ns != 10**18 and st.st_mtime_ns >= before.st_mtime_ns
        os.ftruncate(fd, 100)
        assert os.stat(m.p("new")).st_size == 100
        os.pwrite(fd, b"end", 1 << 20)
        assert os.fstat(fd).st_size == (1 << 20) + 3
        assert os.stat(m.p("new")).st_size == (1 << 20) + 3
    finally:
        os.close(fd)
    assert os.stat(m.p("new")).st_size == (1 << 20) + 3
    assert (m.upper / "new").stat().st_size == (1 << 20) + 3
    with open(m.p("new"), "rb") as f:
        assert f.read(200) == b"\0" * 200


@need_passthrough
def test_opens_of_one_file_in_every_order(mount: Callable[..., Mounted]) -> None:
    """Read-only before writing, lower before copy-up, passthrough opens beside each other: every
    open succeeds and every fd sees the last write."""
    m = mount()
    ro_lower = os.open(m.p("lf"), os.O_RDONLY)            # served by the server
    rw = os.open(m.p("lf"), os.O_RDWR)                    # copied up; served too (beside ro_lower)
    os.pwrite(rw, b"LOWER", 0)
    assert os.pread(ro_lower, 5, 0) == b"LOWER"           # the union's fds follow a copy-up
    os.close(ro_lower)
    ro = os.open(m.p("lf"), os.O_RDONLY)                  # rw still open: served
    os.close(rw)
    os.close(ro)
    fds = [os.open(m.p("lf"), flags) for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND)]
    try:
        os.pwrite(fds[1], b"upper", 0)
        os.write(fds[2], b"+tail")
        for fd in fds:
            if fd != fds[2]:
                assert os.pread(fd, 100, 0) == b"upper data\n+tail"
        assert _read_while_stopped(m, fds[0]) == b"upper data\n+tail"
    finally:
        for fd in fds:
            os.close(fd)
    for _ in range(3):   # released and opened again, in both modes
        with open(m.p("lf"), "r+b") as f:
            assert f.read() == b"upper data\n+tail"
    assert (m.upper / "lf").read_bytes() == b"upper data\n+tail"


@need_passthrough
def test_mmap_and_o_direct(mount: Callable[..., Mounted]) -> None:
    import mmap

    m = mount()
    with open(m.p("uf"), "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as mm:
            mm[:5] = b"UPPER"
            mm.flush()
    assert (m.upper / "uf").read_bytes() == b"UPPER data\n"
    buf = mmap.mmap(-1, 4096)
    buf.write(b"d" * 4096)
    fd = os.open(m.p("direct"), os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.pwritev(fd, [buf], 0) == 4096
    finally:
        os.close(fd)
    assert Path(m.p("direct")).read_bytes() == b"d" * 4096


@need_passthrough
def test_capability_still_dropped_by_a_write(mount: Callable[..., Mounted]) -> None:
    """A write by another user drops security.capability, as on any filesystem: the shim's own
    answer that a file has none stops once one is set through the mount."""
    setcap = shutil.which("setcap")
    if setcap is None:
        pytest.skip("no setcap")
    m = mount()
    fd = os.open(m.p("uf"), os.O_RDWR)
    try:
        os.write(fd, b"x")        # the shim now answers "no capability" for it
        subprocess.run([setcap, "cap_net_raw+ep", m.p("uf")], check=True)
        assert os.getxattr(m.p("uf"), "security.capability")
        os.chmod(m.p("uf"), 0o666)
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(fd, b"y")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        os.getxattr(m.p("uf"), "security.capability")


@need_passthrough
def test_fallback_in_a_user_namespace(tmp_path: Path, need_fuse: None) -> None:
    """As root of a user namespace the kernel refuses backing files: the server says so once and
    serves the files itself."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    lower, upper, mnt = (tmp_path / n for n in ("lower", "upper", "mnt"))
    for d in (lower, upper, mnt):
        d.mkdir()
    (upper / "uf").write_bytes(b"upper data\n")
    log = tmp_path / "daemon.log"
    script = (f"{UNIONFS} mount --log-file {log} {upper}=rw:{lower} {mnt} && "
              f"cat {mnt}/uf && echo more >> {mnt}/uf && cat {mnt}/uf && echo again >> {mnt}/uf; "
              f"umount {mnt}")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, timeout=60)
    if r.returncode != 0 and b"Operation not permitted" in r.stderr:
        pytest.skip(f"no FUSE mounts in a user namespace here: {r.stderr.decode()}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"upper data\nupper data\nmore\n"
    assert (upper / "uf").read_bytes() == b"upper data\nmore\nagain\n"
    text = log.read_text()
    assert text.count("FUSE passthrough not allowed") == 1, text
