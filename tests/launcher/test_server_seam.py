"""The one seam between the launcher and the server: one branch parser with one set of messages for
``unionfs mount`` and ``unionfs run``, the order a forked server gets (a MountConfig), and its answer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import util

from launcher import prefork
from unionfs.core.config import build_config
from unionfs.core.errors import QuietError
from unionfs.server import protocol

UNIONFS = util.program("unionfs")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")


def test_an_order_crosses_whole(tmp_path: Path) -> None:
    """Every field of the MountConfig survives, and so do paths that are not UTF-8."""
    base = os.fsencode(str(tmp_path))
    for name in (b"up\xff", b"lo:w,er", b"mnt"):
        os.mkdir(base + b"/" + name)
    upper, lower = os.fsdecode(base + b"/up\xff"), os.fsdecode(base + b"/lo:w,er")
    spec = f"{upper}:{lower.replace(':', chr(92) + ':')}"
    cfg = build_config(spec, str(tmp_path / "mnt"), ["whiteout=overlay,timeout=0.5,suid,fsname=x,ro"])
    order = protocol.Order(cfg, os.fsdecode(base + b"/log\xfe"), 10)
    assert protocol.decode_order(protocol.encode_order(order)) == order
    assert cfg.branches == [(upper, False), (lower, False)]   # -o ro: a top left at its default mode is read-only


@pytest.mark.parametrize("answer,expect", [
    (lambda fd: protocol.report_ready(fd), None),
    (lambda fd: protocol.report_error(fd, FileNotFoundError(2, "No such file or directory", "/x\udcff")),
     "/x\udcff: No such file or directory"),
    (lambda fd: protocol.report_error(fd, QuietError("branch '/b' is not a directory")),
     "branch '/b' is not a directory"),
    (lambda fd: os.close(fd), protocol.DIED),
])
def test_the_answer_is_ready_or_one_error(answer, expect) -> None:  # type: ignore[no-untyped-def]
    r, w = os.pipe()
    answer(w)
    if expect is None:
        protocol.wait_ready(r)
    else:
        with pytest.raises(QuietError) as info:
            protocol.wait_ready(r)
        assert info.value.message == expect


@pytest.mark.usefixtures("need_fuse")
def test_a_forked_server_that_cannot_mount_answers_why(tmp_path: Path) -> None:
    """The early-forked server, given a config whose mount point has gone since it was checked,
    answers with the server's own one-line reason and exits."""
    for name in ("A", "B", "M"):
        (tmp_path / name).mkdir()
    cfg = build_config(f"{tmp_path}/A:{tmp_path}/B", str(tmp_path / "M"), [])
    (tmp_path / "M").rmdir()
    server = prefork.ServerProcess()
    server.serve(cfg, str(tmp_path / "server.log"))
    with pytest.raises(QuietError) as info:
        server.wait_ready()
    assert info.value.message.startswith(f"cannot mount on {str(tmp_path / 'M')!r}: "), info.value.message
    assert "\n" not in info.value.message
    _, status = os.waitpid(server.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


@pytest.mark.parametrize("command", ["mount", "run"])
def test_one_branch_parser_for_mount_and_run(tmp_path: Path, command: str, need_fuse: None) -> None:
    """``A=rx`` is an unknown branch mode for both (it was "not a directory" for run)."""
    for name in ("A", "B", "M"):
        (tmp_path / name).mkdir()
    spec = f"{tmp_path}/A=rx:{tmp_path}/B"
    args = [spec, str(tmp_path / "M")] if command == "mount" else [spec, "--", "/bin/true"]
    r = _run([UNIONFS, command, *args])
    assert r.stderr == f"unionfs{' run' if command == 'run' else ''}: unknown branch mode 'rx' in " \
                       f"'{tmp_path}/A=rx' (use rw, ro or rr)\n"
    assert r.returncode == (2 if command == "run" else 1)
    assert not util.is_mounted(tmp_path / "M")


@pytest.mark.skipif(os.geteuid() != 0, reason="unionfs run as root")
@pytest.mark.usefixtures("need_fuse")
def test_run_checks_branches_as_mount_does(tmp_path: Path) -> None:
    """A branch given twice is refused before anything is mounted, in mount's words, exit 2."""
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    r = _run([sys.executable, "-m", "launcher", f"{tmp_path}/A:{tmp_path}/B:{tmp_path}/A", "--", "/bin/true"])
    assert r.returncode == 2
    assert r.stderr == f"unionfs run: branch '{tmp_path}/A' is given twice (same directory as " \
                       f"'{tmp_path}/A')\n"
