"""``unionfs run`` end to end, as root: a busybox image, the union as root, namespaces, signals, clean-up."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from launcher_util import (
    Image,
    _env,
    children_of,
    descendants_of,
    end_with_sigterm,
    kill_tree,
    launcher_argv,
    mounts_mentioning,
    once_ready,
    run_launcher,
    start_launcher,
    wait_for_comm,
    wait_gone,
    world_readable_tempdir,
)

from unionfs.server.statedir import PidRecord

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the launcher tests run as root (CI does)"),
    pytest.mark.usefixtures("need_fuse"),
]


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    with world_readable_tempdir("unionfs-run-image-") as base:
        img = Image(base)
        yield img
        assert img.take_snapshot() == img.snapshot, "an image layer changed"


@pytest.fixture
def upper() -> Iterator[Path]:
    with world_readable_tempdir("unionfs-run-upper-") as base:
        up = base / "upper"
        up.mkdir()
        before = mounts_mentioning(str(base), ".unionfs-run-")
        yield up
        assert mounts_mentioning(str(base), ".unionfs-run-") == before, "a mount was left behind"


def sh(image: Image, upper: Path, script: str, *options: str) -> subprocess.CompletedProcess[str]:
    return run_launcher(image.branches(upper), ["/bin/sh", "-c", script], options)


def test_command_is_pid_1_with_its_own_hostname(image: Image, upper: Path) -> None:
    r = sh(image, upper, 'echo "pid=$$"; hostname; cat /etc/hostname', "--hostname", "box1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pid=1", "box1", "box1"]


def test_host_files_are_invisible(image: Image, upper: Path) -> None:
    r = sh(image, upper, "ls /; test -e /work || test -e /usr/bin/python3; echo $?")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()[:-1]) == ["app", "bin", "dev", "etc", "proc", "root", "sys", "tmp"]
    assert r.stdout.split()[-1] == "1"


def test_proc_shows_only_the_container(image: Image, upper: Path) -> None:
    r = sh(image, upper, "sleep 0.01; for p in /proc/[0-9]*; do cat $p/comm; done")
    assert r.returncode == 0, r.stderr
    # sh (PID 1) and the cat of the moment; nothing of the host
    assert set(r.stdout.split()) <= {"sh", "cat"}, r.stdout


def test_layers_are_merged_top_first(image: Image, upper: Path) -> None:
    r = sh(image, upper, "cat /etc/motd /app/greeting")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "l2 motd\nhello from l2\n"


def test_writes_land_in_upper_only(image: Image, upper: Path) -> None:
    script = "echo new > /newfile && echo changed > /etc/motd && rm /app/greeting && mkdir -p /var/x;echo ok"
    r = sh(image, upper, script)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
    assert (upper / "newfile").read_text() == "new\n"
    assert (upper / "etc" / "motd").read_text() == "changed\n"
    assert (upper / "var" / "x").is_dir()
    assert not (upper / "app" / "greeting").is_file()  # whited out, not a copy
    # image layers unchanged: checked again by the fixture at module end
    assert (image.l2 / "app" / "greeting").read_text() == "hello from l2\n"
    r = sh(image, upper, "cat /newfile; test -e /app/greeting; echo $?")
    assert r.stdout == "new\n1\n"


def test_init_layer_is_visible_but_not_in_upper(image: Image, upper: Path) -> None:
    r = sh(image, upper, "cat /etc/hostname; grep -c box2 /etc/hosts; test -f /etc/resolv.conf && echo rc",
           "--hostname", "box2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["box2", "1", "rc"]
    for name in ("hostname", "hosts", "resolv.conf"):
        assert not (upper / "etc" / name).exists()
    # edits stay out of UPPER too, as with Docker's bind-mounted /etc/hosts
    r = sh(image, upper, "echo '10.0.0.1 db' >> /etc/hosts && grep -c db /etc/hosts", "--hostname", "box2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1\n"
    assert not (upper / "etc" / "hosts").exists()
    assert not (upper / "proc").exists() and not (upper / "dev").exists()


def test_dev_is_minimal(image: Image, upper: Path) -> None:
    r = sh(image, upper, "ls /dev; echo x > /dev/null; head -c 4 /dev/zero | wc -c; ls -d /dev/pts /dev/shm")
    assert r.returncode == 0, r.stderr
    names = set(r.stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "fd", "ptmx", "stdin"} <= names
    assert "vda" not in names and "4" in names


def test_exit_status_passes_through(image: Image, upper: Path) -> None:
    assert sh(image, upper, "exit 7").returncode == 7
    assert sh(image, upper, "true").returncode == 0


def test_command_not_found_is_127_and_one_line(image: Image, upper: Path) -> None:
    r = run_launcher(image.branches(upper), ["/no/such/cmd"])
    assert r.returncode == 127
    assert r.stderr.strip().count("\n") == 0 and "/no/such/cmd" in r.stderr
    assert "Traceback" not in r.stderr


def test_user_errors_are_one_line(image: Image, upper: Path, tmp_path: Path) -> None:
    r = run_launcher(f"{upper}:{tmp_path}/missing", ["/bin/true"])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = run_launcher(image.branches(upper), ["/bin/true"], ["--workdir", "relative"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_launcher(image.branches(upper), ["/bin/true"], ["--workdir", "/etc/motd"])  # a file
    assert r.returncode == 125 and "/etc/motd" in r.stderr and "Traceback" not in r.stderr


def test_env_and_workdir(image: Image, upper: Path) -> None:
    r = run_launcher(
        image.branches(upper),
        ["/bin/sh", "-c", 'pwd; echo "$FOO $BAR $PATH"; test -z "$SECRET_HOST_VAR" && echo clean'],
        ["-e", "FOO=1", "--env", "BAR", "-w", "/app"],
        env={"BAR": "from-host", "SECRET_HOST_VAR": "x"},
    )
    assert r.returncode == 0, r.stderr
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert r.stdout.splitlines() == ["/app", f"1 from-host {path}", "clean"]


def test_net_none_has_only_loopback_up(image: Image, upper: Path) -> None:
    r = sh(image, upper, "tail -n +3 /proc/net/dev | cut -d: -f1; ip -o link show lo", "--net", "none")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [x.strip() for x in lines[:-1]] == ["lo"]
    assert "UP" in lines[-1]


def test_tmp_upper_leaves_no_trace(image: Image, upper: Path) -> None:
    r = run_launcher(f"{image.l2}:{image.l1}", ["/bin/sh", "-c", "echo x > /tmpfile && cat /tmpfile"],
                     ["--tmp-upper"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x\n"
    assert image.take_snapshot() == image.snapshot


def test_sigterm_ends_a_plain_pid_1_after_the_stop_timeout(image: Image, upper: Path) -> None:
    """sleep as PID 1 has no handler, so the kernel drops SIGTERM, as under Docker: the launcher
    SIGKILLs it once --stop-timeout has passed, and exits 128 + SIGKILL."""
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; exec sleep 30"],
                          ["--stop-timeout", "0.5"])
    with once_ready(proc):
        wait_for_comm(proc.pid, "sleep")
        start = time.monotonic()
        end_with_sigterm(proc, 128 + signal.SIGKILL)
        assert time.monotonic() - start >= 0.5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_reach_a_command_that_handles_them(image: Image, upper: Path, sig: signal.Signals) -> None:
    script = f'trap "echo got; exit 42" {sig.name[3:]}; echo ready; while :; do sleep 0.02; done'
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", script])
    with once_ready(proc):
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 42
        assert proc.stdout.read() == "got\n"


def test_killed_command_gives_128_plus_n(image: Image, upper: Path) -> None:
    # the command kills itself from inside: PID 1 cannot, so a child does it for a process it runs
    r = sh(image, upper, "sh -c 'kill -KILL $$'; echo $?")
    assert r.stdout.strip() == "137"
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; exec sleep 30"])
    with once_ready(proc):
        pid1 = wait_for_comm(proc.pid, "sleep")
        os.kill(pid1, signal.SIGKILL)
        assert proc.wait(timeout=10) == 128 + signal.SIGKILL


def test_orphans_are_reaped(image: Image, upper: Path) -> None:
    r = sh(image, upper, "(sleep 0.05 &); sleep 0.3; ps -o stat= | grep -c Z; true")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"


def test_sigkill_of_the_launcher_leaves_nothing(image: Image, upper: Path) -> None:
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; sleep 30"])
    with once_ready(proc):
        started = descendants_of(proc.pid)
        assert started, "the launcher has no children"
        mnt_ns = os.readlink(f"/proc/{proc.pid}/ns/mnt")
        # the server's pidfile is private too: nothing on the host names it (a pidfile a gone daemon
        # left may name a pid reused since: only a record of the process that wrote it counts)
        host_pids = set()
        for f in Path("/run/unionfs").glob("*.pid"):
            with contextlib.suppress(OSError):  # other daemons come and go
                record = PidRecord.parse(f.read_bytes())
                if record is not None and record.state() == "running":
                    host_pids.add(record.pid)
        assert not host_pids & set(started)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_gone(started) == [], "a process outlived the launcher"
        holders = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if os.readlink(p / "ns" / "mnt") == mnt_ns:
                        holders.append(p.name)
                except OSError:
                    pass
        assert holders == [], "the launcher's mount namespace is still held"


def test_the_host_never_sees_the_union(image: Image, upper: Path) -> None:
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; sleep 30"],
                          ["--stop-timeout", "0"])
    with once_ready(proc):
        assert mounts_mentioning(".unionfs-run-", str(upper)) == []
        end_with_sigterm(proc, 128 + signal.SIGKILL)


def test_keep_mounted_keeps_the_union_until_sigterm(image: Image, upper: Path) -> None:
    script = "echo kept > /kept; exit 3"
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", script], ["--keep-mounted"])
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "stays mounted at /proc/" in line, line
        path = line.split("stays mounted at ")[1].split()[0]
        assert Path(path, "kept").read_text() == "kept\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 3
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def test_interactive_shell_on_a_terminal(image: Image, upper: Path) -> None:
    """An interactive sh as PID 1 on a pty: Ctrl-C stops its foreground job, not the container."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: the launcher, on the pty
        try:
            os.chdir("/")
            argv = launcher_argv(image.branches(upper), ["/bin/sh", "-i"], ["--hostname", "ttybox"])
            os.execve(argv[0], argv, _env(None, {"TERM": "dumb", "PS1": "$ "}))
        finally:
            os._exit(127)
    out = b""
    reaped = False

    def expect(token: bytes, timeout: float = 10) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while token not in out:
            left = deadline - time.monotonic()
            assert left > 0, f"waiting for {token!r}, got {out!r}"
            if select.select([fd], [], [], left)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break

    try:
        expect(b"# ")
        os.write(fd, b"test -t 0 && echo TTY-$$-$(hostname)\n")
        expect(b"TTY-1-ttybox")
        os.write(fd, b"sleep 20\n")
        time.sleep(0.3)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal signals the foreground job only
        os.write(fd, b"echo ALIVE-$((6*7))\n")
        expect(b"ALIVE-42")
        os.write(fd, b"exit 4\n")
        _, status = os.waitpid(pid, 0)
        reaped = True
        assert os.waitstatus_to_exitcode(status) == 4, out
    finally:
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_init_reaps_orphans_and_passes_status_and_signals(image: Image, upper: Path) -> None:
    # sleep as the command's parent never waits; its orphan goes to PID 1, which --init reaps
    script = "(sleep 0.05 &); sleep 0.3; echo pid=$$; ps -o stat= | grep -c Z; exit 6"
    r = sh(image, upper, script, "--init")
    assert r.returncode == 6, r.stderr
    assert r.stdout.split() == ["pid=2", "0"]
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; exec sleep 30"], ["--init"])
    with once_ready(proc):
        wait_for_comm(proc.pid, "sleep")
        end_with_sigterm(proc)


def test_a_server_that_cannot_mount_is_one_line(image: Image, upper: Path) -> None:
    """/dev/fuse that is not the FUSE device (here /dev/null bound over it): the server's own error,
    in one line, exit 125 as docker's failed launches."""
    launcher = shlex.join(launcher_argv(image.branches(upper), ["/bin/true"]))
    script = f"mount --bind /dev/null /dev/fuse && exec {launcher}"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL,
                       env=_env(None, None))
    assert r.returncode == 125, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("unionfs run: the union's FUSE server failed: cannot mount on "), r.stderr


@pytest.mark.usefixtures("need_overlay")
def test_kernel_overlay_backend_for_comparison(image: Image, upper: Path) -> None:
    """The hidden --backend overlay (perf's reference row) gives the same container."""
    r = sh(image, upper, "echo $$ > /o; cat /o /etc/motd", "--backend", "overlay")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1\nl2 motd\n"
    assert (upper / "o").read_text() == "1\n"
    assert not [p for p in upper.parent.iterdir() if p.name.startswith(".unionfs-work-")]


@pytest.mark.usefixtures("need_overlay")
def test_no_server_child_stays_when_the_backend_needs_none(image: Image, upper: Path) -> None:
    """The server child forked at start-up (launcher.prefork) is ended when kernel overlayfs serves."""
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; sleep 30"],
                          ["--backend", "overlay", "--stop-timeout", "0"])
    with once_ready(proc):
        own = os.readlink(f"/proc/{proc.pid}/ns/pid")
        assert [p for p in children_of(proc.pid) if os.readlink(f"/proc/{p}/ns/pid") == own] == []
        end_with_sigterm(proc, 128 + signal.SIGKILL)


def test_a_failed_launch_leaves_no_server_child(image: Image, upper: Path) -> None:
    """A launcher that stops before mounting (here: a missing branch) takes its server child along."""
    missing = upper.parent / f"missing-{os.getpid()}-{time.monotonic_ns()}"
    r = run_launcher(f"{upper}:{missing}", ["/bin/true"])
    assert r.returncode == 2 and f"branch {str(missing)!r} does not exist" in r.stderr, r.stderr
    marker = str(missing).encode()
    left = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                left.append(int(entry))
    assert wait_gone(left, timeout=5) == []


def test_a_server_that_dies_stops_the_command_with_one_line(image: Image, upper: Path) -> None:
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; sleep 30"])
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "ready\n"
        children = children_of(proc.pid)
        # the server shares the launcher's PID namespace; the command is PID 1 of its own
        own = os.readlink(f"/proc/{proc.pid}/ns/pid")
        (server,) = [p for p in children if os.readlink(f"/proc/{p}/ns/pid") == own]
        os.kill(server, signal.SIGKILL)
        assert proc.wait(timeout=10) == 125
        err = proc.stderr.read()  # the command may have said something about the dead mount first
        ours = [line for line in err.splitlines() if line.startswith("unionfs run:")]
        assert len(ours) == 1 and "FUSE server was killed by signal 9" in ours[0], err
        assert "Traceback" not in err
        assert wait_gone(children) == []
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def test_an_upper_with_a_colon_in_its_path(image: Image, upper: Path) -> None:
    odd = upper.parent / "up:per"
    odd.mkdir()
    r = run_launcher(f"{str(odd).replace(':', chr(92) + ':')}:{image.l1}", ["/bin/sh", "-c", "echo x > /f"])
    assert r.returncode == 0, r.stderr
    assert (odd / "f").read_text() == "x\n"
