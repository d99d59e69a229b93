"""A daemon's quick exit where close_range(2) fails (Linux before 5.9, a seccomp filter that does not
know it): `unionfs umount` returns as soon as elsewhere, rather than after the daemon has closed
every possible fd number one by one (2**31 of them, minutes) and timing out after 60 s."""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
from pathlib import Path

import pytest
import util
from test_fastclient_umount import PY_UNIONFS, alone, exited, let_go, wait_exited
from test_resident import ENV, area, root_server, run, state_key

pytestmark = pytest.mark.usefixtures("need_fuse")
__all__ = ["alone", "area", "root_server"]   # fixtures used here

# Installs a seccomp filter that fails close_range(2) (436 on x86-64 and arm64) with ENOSYS, then
# runs the command: the daemon it forks inherits the filter.
WITHOUT_CLOSE_RANGE = r"""
import ctypes, os, struct, sys
def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([insn(0x20, 0, 0, 0), insn(0x15, 0, 1, 436),
                 insn(0x06, 0, 0, 0x00050000 | 38), insn(0x06, 0, 0, 0x7fff0000)])
buf = ctypes.create_string_buffer(prog)
fprog = struct.pack("HxxxxxxQ", 4, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:
    sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="close_range's number")
def test_umount_of_a_daemon_without_close_range(root_server: Path, area: Path, alone: Path) -> None:
    env = dict(ENV, UNIONFS_SERVER="off")
    r = run([sys.executable, "-c", WITHOUT_CLOSE_RANGE, PY_UNIONFS, "mount", f"{area}/A:{area}/B", str(area / "M")],
            env=env)
    assert r.returncode == 0, r.stderr
    daemon = int(Path(f"/run/unionfs/{state_key(area / 'M')}.pid").read_text().split()[0])
    try:
        assert (area / "M" / "b").read_text() == "from B\n"
        started = time.monotonic()
        r = run([str(alone), "umount", str(area / "M")])   # a TimeoutExpired at 60 s, when it waits that long
        waited = time.monotonic() - started
        assert (r.returncode, r.stderr) == (0, ""), f"after {waited:.1f} s"
        assert waited < 10, f"umount took {waited:.1f} s"
        assert not util.is_mounted(area / "M") and let_go(daemon)
        assert wait_exited(daemon)
    finally:
        if not exited(daemon):
            os.kill(daemon, signal.SIGKILL)
