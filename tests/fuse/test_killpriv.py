"""Set-id bits and file capabilities cleared by writes, truncates and chowns, against kernel overlayfs.

As root with passthrough (Linux 6.9+) the libfuse shim asks for FUSE_HANDLE_KILLPRIV_V2, and the
kernel leaves the clearing to the server: a write, truncate or fallocate by a user without
CAP_FSETID clears the set-user-ID bit and the set-group-ID bit of a group-executable file, a chown
clears them whoever calls it, and root's writes keep them.  The kernel then also sends fewer
requests: no GETATTR before a chown, no security.capability question at every write (counted by
``unionfs stats``).  Without passthrough (or off root) the kernel clears the bits itself; the
results must be the same either way.
"""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import util
from test_fuse_write_users import USER, shared_pair  # noqa: F401 - the fixture
from test_passthrough import need_passthrough
from util import F, Pair, Side, layer_digest
from write_ops import sh

pytestmark = pytest.mark.fuse

UNIONFS = util.program("unionfs")

LAYER = [
    F("u6775", b"abc", mode=0o6775, uid=1000, gid=1000),
    F("u6755", b"abc", mode=0o6755, uid=1000, gid=1000),
    F("u2745", b"abc", mode=0o2745, uid=1000, gid=1000),
    F("u4777", b"abc", mode=0o4777, uid=1000, gid=1000),
    F("r6775", b"abc", mode=0o6775, uid=1000, gid=1000),
    F("u0777", b"abc", mode=0o777, uid=1000, gid=1000),
]

#: What a user without CAP_FSETID does to the files (1000 owns them); sh runs in the mount.
AS_USER = {
    "append": "echo x >> u6775 && echo x >> u6755 && echo x >> u2745",
    "two-writes": "{ printf a; printf b; } >> u4777",
    "truncate": "truncate -s 1 u6775 && truncate -s 1 u2745",
    "fallocate": "fallocate -l 100 u6775",
    # a file with a reader open is written by the server, not passed through
    "append-beside-reader": "exec 3< r6775 && echo x >> r6775",
    "chown-to-self": "chown 1000:1000 u6775",
    # the first write finds no set-id bit: the kernel stops asking until the attributes change
    "setuid-between-writes": "exec 3>> u0777 && echo a >&3 && chmod 4777 u0777 && echo b >&3",
}


def _on_both(pair: Pair, upper: bool) -> None:
    """LAYER in the upper or the lower branch of both sides, mounted for other users too."""
    pair.build([[] if upper else LAYER], upper=LAYER if upper else [], options=["allow_other"],
               kernel_options=[], mount=False)
    for s in pair.sides:
        assert s.upper is not None
        s.upper.chmod(0o755)
        for e in LAYER:     # rendering chmods before it chowns, and the chown clears set-id bits
            os.chmod((s.upper if upper else s.lowers[0]) / os.fsdecode(e.path), e.mode)
    pair.lower_digests = {lp: layer_digest(lp) for lp in pair.lower_digests}
    pair.mount()


@pytest.mark.parametrize("upper", [True, False], ids=["upper", "lower"])
@pytest.mark.parametrize("name", list(AS_USER))
def test_user_change_clears_setid_bits(shared_pair: Pair, name: str, upper: bool) -> None:  # noqa: F811
    _on_both(shared_pair, upper)
    shared_pair.same(sh([*USER, "sh", "-c", AS_USER[name]]), name)
    shared_pair.assert_same_tree()


def _chown(uid: int, gid: int, rel: str) -> Callable[[Side], Any]:
    def op(s: Side) -> Any:
        os.chown(s.p(rel), uid, gid)
        return os.stat(s.p(rel)).st_mode
    return op


AS_ROOT: dict[str, Callable[[Side], Any]] = {
    "chown-nothing": _chown(-1, -1, "u6775"),
    "chown-nothing-2745": _chown(-1, -1, "u2745"),
    "chown-root": _chown(0, 0, "u6775"),
    "append": sh(["sh", "-c", "echo x >> u6775"]),
    "truncate": sh(["truncate", "-s", "1", "u6775"]),
    "setcap-between-writes": sh(["sh", "-c", "exec 3>> u0777 && echo a >&3 && setcap cap_net_raw+ep u0777"
                                 " && echo b >&3"]),
}


@pytest.mark.parametrize("upper", [True, False], ids=["upper", "lower"])
@pytest.mark.parametrize("name", list(AS_ROOT))
def test_root_change_of_setid_file(shared_pair: Pair, name: str, upper: bool) -> None:  # noqa: F811
    _on_both(shared_pair, upper)
    shared_pair.same(AS_ROOT[name], name)
    shared_pair.assert_same_tree()


@need_passthrough
def test_chowns_ask_no_attributes_first(tmp_path: Path, need_fuse: None) -> None:
    """A chown of a regular file needs no GETATTR before it: 50 writes and chowns through an open
    file cost the server 50 SETATTRs and (almost) nothing else."""
    upper, lower, mnt = (tmp_path / n for n in ("upper", "lower", "mnt"))
    for d in (upper, lower, mnt):
        d.mkdir()
    subprocess.run([UNIONFS, "mount", f"{upper}:{lower}", str(mnt)], check=True, timeout=60)
    try:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            before = _requests(mnt)
            for i in range(50):
                os.write(fd, b"x" * 100)
                os.fchown(fd, i % 2, 0)
        finally:
            os.close(fd)
        after = _requests(mnt)
        assert os.stat(mnt / "f").st_size == 5000 and (upper / "f").stat().st_size == 5000
    finally:
        subprocess.run([UNIONFS, "umount", str(mnt)], check=True, timeout=60)
    grew = {name: n - before.get(name, 0) for name, n in after.items()}
    assert grew["setattr"] == 50
    assert grew.get("getattr", 0) < 10, grew


def _requests(mnt: Path) -> dict[str, int]:
    """Requests answered so far, by name (``unionfs stats --json``)."""
    r = subprocess.run([UNIONFS, "stats", "--json", str(mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {k: v["count"] for k, v in json.loads(r.stdout)["requests"].items()}
