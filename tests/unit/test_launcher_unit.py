"""The launcher's pieces without namespaces or mounts: parsing, step lists, errors, signal policy, the CLI."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher import namespaces, prefork, rootfs, supervisor, syscalls
from launcher.cli import run_command
from launcher.errors import LaunchError
from unionfs.core.branchview import BranchView
from unionfs.core.config import BranchSpec, parse_branches
from unionfs.core.errors import QuietError, describe


def test_parse_branches_top_first_with_and_without_modes(tmp_path: Path) -> None:
    for name in ("u", "a", "b"):
        (tmp_path / name).mkdir()
    got = parse_branches(f"{tmp_path}/u:{tmp_path}/a=ro:{tmp_path}/b")
    assert got == [BranchSpec(f"{tmp_path}/u"), BranchSpec(f"{tmp_path}/a", "ro"), BranchSpec(f"{tmp_path}/b")]


def test_parse_branches_makes_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_branches("x") == [BranchSpec(str(tmp_path / "x"))]


@pytest.mark.parametrize("spec", ["", "a::b", "/nonexistent/dir", "/=rx"])
def test_parse_branches_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(QuietError):
        parse_branches(spec)


def test_container_steps_start_private_then_bind_root_then_proc() -> None:
    steps = rootfs.container_steps(rootless=False)
    assert steps[:3] == [rootfs.MakePrivate(), rootfs.BindRoot(), rootfs.Proc("/proc")]
    names = {s.name for s in steps if isinstance(s, rootfs.BindDevice)}
    assert names == {"null", "zero", "full", "random", "urandom", "tty"}
    devpts = [s for s in steps if isinstance(s, rootfs.DevPts)]
    assert devpts == [rootfs.DevPts("/dev/pts", 5)]
    # the /dev tmpfs comes before anything placed in it
    dev = steps.index(rootfs.Tmpfs("/dev", 0o755, syscalls.MS_NOSUID | syscalls.MS_STRICTATIME, "64k"))
    assert all(steps.index(s) > dev for s in steps if isinstance(s, rootfs.BindDevice | rootfs.Symlink))


def test_rootless_devpts_has_no_tty_gid() -> None:
    assert [s for s in rootfs.container_steps(rootless=True) if isinstance(s, rootfs.DevPts)][0].gid is None


def test_init_layer_has_the_container_files(tmp_path: Path) -> None:
    layer = tmp_path / "init"
    (tmp_path / "image").mkdir()
    with BranchView([str(tmp_path / "image")]) as view:
        init = rootfs.InitLayer(str(layer), view)
        rootfs.write_init_layer(init, "box", b"nameserver 9.9.9.9\n")
        assert init.directory("/proc") and init.directory("/dev")
        init.finish()
    assert (layer / "etc" / "hostname").read_text() == "box\n"
    assert "127.0.1.1\tbox" in (layer / "etc" / "hosts").read_text()
    assert (layer / "etc" / "resolv.conf").read_bytes() == b"nameserver 9.9.9.9\n"
    assert (layer / "proc").is_dir() and (layer / "dev").is_dir()


def test_syscall_errors_name_step_and_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        syscalls.umount2(tmp_path / "not-mounted", step="umount union")
    assert info.value.errno in (errno.EINVAL, errno.ENOENT, errno.EPERM)
    line = describe(info.value)
    assert line.startswith(f"umount union {tmp_path}/not-mounted: ")
    plain = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/x")
    assert describe(plain) == "/x: No such file or directory"


def test_subordinate_range(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("# comment\nsomeone:100000:65536\n0:200000:1000\nroot:300000:5\n")
    assert namespaces.subordinate_range(str(f), 0) == namespaces.IdRange(200000, 1000)
    assert namespaces.subordinate_range(str(f), 4242) is None
    assert namespaces.subordinate_range(str(tmp_path / "missing"), 0) is None


def test_container_env_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    cfg = supervisor.RunConfig(branches="x", command=["true"], env=["A=1", "FROM_HOST", "UNSET_ONE"])
    env = supervisor.container_env(cfg, "box")
    assert env["A"] == "1" and env["FROM_HOST"] == "h" and env["HOSTNAME"] == "box"
    assert "UNSET_ONE" not in env and env["PATH"] == supervisor.DEFAULT_PATH
    with pytest.raises(LaunchError):
        supervisor.container_env(supervisor.RunConfig(branches="x", command=["t"], env=["=x"]), "b")


class FakeInfo:
    def __init__(self, signo: int, code: int) -> None:
        self.si_signo = signo
        self.si_code = code


@pytest.mark.parametrize(
    "caught,ignored,code,expect_sent,expect_emulated",
    [
        (True, False, 0, signal.SIGTERM, None),  # a handler: forward as is
        (False, True, 0, None, None),  # ignored by the command: nothing happens, as for any process
        (False, False, 0, signal.SIGKILL, signal.SIGTERM),  # default action: end it, report 128+15
        (True, False, supervisor.SI_KERNEL, None, None),  # the terminal already delivered it
    ],
)
def test_signal_forwarding_policy(
    monkeypatch: pytest.MonkeyPatch, caught: bool, ignored: bool, code: int, expect_sent: int | None,
    expect_emulated: int | None,
) -> None:
    bit = 1 << (signal.SIGTERM - 1)
    masks = (bit if caught else 0, bit if ignored else 0)
    monkeypatch.setattr(supervisor, "_signal_masks", lambda pid: masks)
    monkeypatch.setattr(os, "getpgid", lambda pid: os.getpgrp())
    sent: list[int] = []
    monkeypatch.setattr(supervisor, "_kill", lambda pid, sig: sent.append(sig))
    emulated = supervisor._forward(12345, FakeInfo(signal.SIGTERM, code))  # type: ignore[arg-type]
    assert sent == ([expect_sent] if expect_sent else [])
    assert emulated == expect_emulated


def test_cli_help_and_usage_errors() -> None:
    runner = CliRunner()
    r = runner.invoke(run_command, ["-h"])
    assert r.exit_code == 0 and "BRANCHES" in r.output and "--tmp-upper" in r.output and "Example" in r.output
    r = runner.invoke(run_command, ["/tmp"])
    assert r.exit_code == 2
    r = runner.invoke(run_command, ["/tmp", "--"])
    assert r.exit_code == 2
    r = runner.invoke(run_command, ["--hostname", "bad name", "/tmp", "--", "true"])
    assert r.exit_code == 2 and "hostname" in r.output.lower()
    r = runner.invoke(run_command, ["--net", "bridge", "/tmp", "--", "true"])
    assert r.exit_code == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root here (CI runs as root)")
def test_chroot_fallback_when_pivot_root_is_refused(tmp_path: Path) -> None:
    """Where pivot_root says EINVAL (a root on initramfs), enter_root warns and chroots instead."""
    (tmp_path / "newroot").mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # in a throwaway mount namespace, so nothing can leak
        code = 1
        try:
            os.close(r)
            syscalls.unshare(syscalls.CLONE_NEWNS)
            namespaces.make_mounts_private()
            root = str(tmp_path / "newroot")
            syscalls.mount("tmpfs", root, "tmpfs", 0, "mode=0755")
            os.mkdir(os.path.join(root, "marker"))

            def refuse(new_root: str, put_old: str) -> None:
                raise OSError(errno.EINVAL, "pivot_root", new_root)

            rootfs.syscalls.pivot_root = refuse  # type: ignore[assignment]
            rootfs.enter_root(root, "/marker")
            os.write(w, f"{sorted(os.listdir('/'))} {os.getcwd()}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out.decode() == "['marker'] /marker"


def test_colons_in_branch_paths_are_escaped(tmp_path: Path) -> None:
    (tmp_path / "a:b").mkdir()
    (tmp_path / "c").mkdir()
    got = parse_branches(f"{tmp_path}/a\\:b=rw:{tmp_path}/c")
    assert got == [BranchSpec(f"{tmp_path}/a:b", "rw"), BranchSpec(f"{tmp_path}/c")]


def test_init_files_are_bound_right_after_the_root() -> None:
    steps = rootfs.container_steps(rootless=True, init_layer="/state/init")
    assert steps[2:5] == [rootfs.BindFile(f"/state/init{p}", p) for p in rootfs.INIT_FILES]
    assert steps[5] == rootfs.Proc("/proc")


def test_a_server_child_that_gets_no_order_is_ended_and_reaped() -> None:
    server = prefork.ServerProcess()
    server.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(server.pid, os.WNOHANG)
