"""What a process inside ``unionfs run`` may do, as under ``docker run`` / ``podman run``: setuid
programs elevate (the union is mounted without nosuid, as podman mounts a container's root), and
``unionfs mount -o suid|nosuid|dev|nodev|exec|noexec`` is honoured as kernel overlayfs honours it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import util
from launcher_util import (
    UnprivUser,
    build_busybox_layer,
    dev_fuse_mode,
    run_launcher,
    unprivileged_user,
    world_readable_tempdir,
)

from launcher import namespaces
from unionfs.core import mountinfo

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the launcher tests run as root (CI does)"),
    pytest.mark.usefixtures("need_fuse"),
]

EUID_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
static const char *result(long r) { return r < 0 ? strerror(errno) : "ok"; }
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "probe") == 0) {  /* what Docker's seccomp profile denies */
        printf("keyctl %s\n", result(syscall(SYS_keyctl, 0, -3, 0)));  /* KEYCTL_GET_KEYRING_ID, session */
        printf("unshare-user %s\n", result(unshare(CLONE_NEWUSER)));
        return 0;
    }
    printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    return 0;
}
"""
NOBODY = 65534
DOCKER_CAPBND = "00000000a80425fb"  # CapBnd of a default docker run, as /proc/PID/status shows it


def _compile_euid(dest: Path, workdir: Path) -> None:
    """A static program that prints its real and effective uid (busybox drops a setuid bit itself)."""
    if shutil.which("cc") is None:
        pytest.fail("needs a C compiler (apt-get install gcc libc6-dev)")
    src = workdir / "euid.c"
    src.write_text(EUID_C)
    subprocess.run(["cc", "-static", "-O2", "-o", str(dest), str(src)], check=True, capture_output=True)


@dataclass
class Setup:
    """One way of launching: as root, or rootless with the image owned by the user (its uid 0)."""

    user: UnprivUser | None
    image: Path
    base: Path

    def upper(self) -> Path:
        up = Path(self.base / f"upper{len(list(self.base.iterdir()))}")
        up.mkdir()
        if self.user:
            os.chown(up, self.user.uid, self.user.gid)
        return up

    def run(self, script: str, *options: str) -> subprocess.CompletedProcess[str]:
        return run_launcher(f"{self.upper()}:{self.image}", ["/bin/sh", "-c", script], options, user=self.user)


def _build_image(base: Path, owner: tuple[int, int] | None) -> Path:
    image = base / "image"
    build_busybox_layer(image, base)
    (image / "usr" / "bin").mkdir(parents=True)
    _compile_euid(image / "usr" / "bin" / "euid", base)
    os.chmod(image / "usr" / "bin" / "euid", 0o4755)
    if owner:
        for dirpath, dirnames, filenames in os.walk(image):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, *owner)
        os.chmod(image / "usr" / "bin" / "euid", 0o4755)  # chown clears the setuid bit
    return image


@pytest.fixture(scope="module", params=["root", "rootless"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    if request.param == "root":
        with world_readable_tempdir("unionfs-run-iso-") as base:
            yield Setup(None, _build_image(base, None), base)
        return
    if shutil.which("newuidmap") is None:
        pytest.fail("needs newuidmap (apt-get install uidmap)")
    with unprivileged_user(subids=True) as user, dev_fuse_mode(0o666), \
            world_readable_tempdir("unionfs-run-iso-") as base:
        sub = namespaces.subordinate_range("/etc/subuid", user.uid)
        if sub is None or sub.length < 65536:
            pytest.skip("useradd gave the test user no 65536 subordinate ids")
        yield Setup(user, _build_image(base, (user.uid, user.gid)), base)


# -- setuid -------------------------------------------------------------------------------------------

def test_a_setuid_root_program_elevates_a_non_root_user(setup: Setup) -> None:
    """nobody runs a setuid-root program in the container: its effective uid is 0, as under podman."""
    r = setup.run("stat -c '%a %u' /usr/bin/euid; su -s /bin/sh nobody -c /usr/bin/euid")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"4755 0\nuid={NOBODY} euid=0\n"


# -- unionfs mount -o suid|nosuid|exec|noexec, against kernel overlayfs -------------------------------

@pytest.fixture(scope="module")
def suid_lower() -> Iterator[Path]:
    with world_readable_tempdir("unionfs-mount-flags-") as base:
        lower = base / "lower"
        lower.mkdir()
        _compile_euid(lower / "euid", base)
        os.chmod(lower / "euid", 0o4755)
        yield lower


def _flags_at(mnt: Path) -> set[str]:
    """The per-mount options of *mnt* in /proc/self/mountinfo (rw, nosuid, nodev, noexec, ...)."""
    found = mountinfo.mount_at(os.fsencode(str(mnt)))
    if found is not None:
        return set(found.options.split(","))
    raise AssertionError(f"{mnt} is not mounted")


def _run_as_nobody(program: Path) -> str:
    try:
        r = subprocess.run([str(program)], user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                           text=True, timeout=30)
    except PermissionError as exc:
        return f"exec refused: {exc.strerror}"
    return r.stdout.strip()


@pytest.mark.usefixtures("need_overlay")
@pytest.mark.parametrize("options", ["suid", "nosuid", "suid,noexec", "suid,dev", "suid,nodev", "suid,exec"])
def test_mount_flags_are_honoured_as_by_kernel_overlayfs(options: str, suid_lower: Path) -> None:
    """``unionfs mount -o OPTIONS`` puts each on the mount (mountinfo), and a setuid-root program run by
    nobody elevates, does not, or is refused exec, as on kernel overlayfs mounted with OPTIONS.
    (Without ``suid``, unionfs mounts nosuid,nodev, as libfuse does for every FUSE filesystem.)"""
    seen = {}
    for side in ("unionfs", "kernel"):
        up, work, mnt = (suid_lower.parent / f"{options.replace(',', '-')}-{side}-{n}" for n in ("upper", "work", "mnt"))
        for d in (up, work, mnt):
            d.mkdir()
        if side == "kernel":
            m = util.mount_kernel([suid_lower], up, work, mnt, [options])
        else:
            m = util.mount_impl("aufs", [suid_lower], up, None, mnt, [options])
        try:
            flags = _flags_at(mnt)
            seen[side] = _run_as_nobody(mnt / "euid")
            for flag in options.split(","):
                if flag.startswith("no"):
                    assert flag in flags, f"{side}: {sorted(flags)}"
                else:
                    assert "no" + flag not in flags, f"{side}: {sorted(flags)}"
        finally:
            if side == "kernel":
                util.umount(mnt)
            else:
                util.unmount(m)
    assert seen["unionfs"] == seen["kernel"]
    if "noexec" in options:
        assert seen["unionfs"] == "exec refused: Permission denied"
    else:
        assert seen["unionfs"] == f"uid={NOBODY} euid={0 if 'suid' in options.split(',') else NOBODY}"


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
def test_suid_or_dev_without_root_is_refused_in_one_line(suid_lower: Path, foreground: bool) -> None:
    """As a user, fusermount3 forces nosuid,nodev: ``unionfs mount -o suid`` says so in one line,
    in the foreground and (once the mount is ready) in the background."""
    with unprivileged_user() as user, dev_fuse_mode(0o666), world_readable_tempdir("unionfs-mount-user-") as base:
        mnt, up = base / "mnt", base / "up"
        for d in (mnt, up):
            d.mkdir()
            os.chown(d, user.uid, user.gid)
        from launcher_util import _env, python_for

        cmd = [python_for(user)[0], "-m", "unionfs", "mount", *(["-f"] if foreground else []), "-o", "suid",
               f"{up}:{suid_lower}", str(mnt)]
        proc = subprocess.Popen(cmd, user=user.uid, group=user.gid, extra_groups=[], env=_env(user, None),
                                cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if not foreground:
                proc.wait(timeout=60)
            util.wait_for_mount(mnt, proc if foreground else None)  # type: ignore[arg-type]
            assert "nosuid" in _flags_at(mnt)
        finally:
            util.umount(mnt)
            _out, err = proc.communicate(timeout=30)
        warnings = [line for line in err.splitlines() if "suid" in line]
        assert len(warnings) == 1 and "fusermount3 mounts nosuid,nodev" in warnings[0], err
        if not foreground:
            assert proc.returncode == 0 and len(err.splitlines()) == 1, err


# -- Docker's isolation defaults ------------------------------------------------------------------------

def _status(output: str, key: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith(key + ":"))


def _host_capbnd() -> str:
    with open("/proc/self/status", encoding="ascii") as f:
        return _status(f.read(), "CapBnd")


def test_capabilities_are_dockers_default_set(setup: Setup) -> None:
    r = setup.run("grep -E '^Cap(Bnd|Eff|Prm|Inh|Amb)' /proc/self/status; su -s /bin/sh nobody -c "
                  "'grep CapEff /proc/self/status'")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for key in ("CapBnd", "CapEff", "CapPrm"):
        assert _status(r.stdout, key) == DOCKER_CAPBND, r.stdout
    assert _status(r.stdout, "CapAmb") == "0" * 16
    assert lines[-1].split()[1] == "0" * 16  # a non-root user has none


@pytest.mark.parametrize(("options", "expected"), [
    (("--cap-add", "SYS_ADMIN", "--cap-drop", "cap_net_raw"), (0xa80425fb | 1 << 21) & ~(1 << 13)),
    (("--cap-drop", "ALL", "--cap-add", "CAP_CHOWN"), 1),
    (("--cap-drop", "all"), 0),
])
def test_cap_add_and_cap_drop(setup: Setup, options: tuple[str, ...], expected: int) -> None:
    r = setup.run("grep CapBnd /proc/self/status", *options)
    assert r.returncode == 0, r.stderr
    assert int(_status(r.stdout, "CapBnd"), 16) == expected


def test_an_unknown_capability_is_a_usage_error(setup: Setup) -> None:
    r = setup.run("true", "--cap-add", "SYS_WIZARD")
    assert r.returncode == 2 and "unknown capability 'SYS_WIZARD'" in r.stderr, r.stderr


def test_privileged_keeps_every_capability_and_unmasks(setup: Setup) -> None:
    r = setup.run("grep -E '^(CapBnd|Seccomp):' /proc/self/status; echo x > /proc/sys/kernel/hostname "
                  "&& hostname; grep -c ' /proc/sys ' /proc/self/mountinfo", "--privileged")
    assert r.returncode == 1, r.stderr  # grep -c: no bind over /proc/sys
    # root: the launcher's own set; rootless: a user namespace's root has every capability in it
    every = f"{(1 << (int(Path('/proc/sys/kernel/cap_last_cap').read_text()) + 1)) - 1:016x}"
    assert _status(r.stdout, "CapBnd") == (every if setup.user else _host_capbnd())
    assert _status(r.stdout, "Seccomp") == "0"
    if setup.user:  # the host's root owns /proc/sys; not even a privileged rootless container writes it
        assert r.stdout.splitlines()[2:] == ["0"] and "Permission denied" in r.stderr, r.stderr
    else:
        assert r.stdout.splitlines()[2:] == ["x", "0"]


def test_proc_sys_and_friends_are_read_only(setup: Setup) -> None:
    targets = [p for p in ("/proc/sys/kernel/hostname", "/proc/sysrq-trigger") if os.path.exists(p)]
    r = setup.run(f"for p in {' '.join(targets)}; do echo x > $p || echo failed; done; "
                  "awk '$5 ~ /^\\/proc\\// {print $5, $6}' /proc/self/mountinfo")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Read-only file system") == len(targets), r.stderr
    mounts = dict(line.split() for line in r.stdout.splitlines() if line != "failed")
    expected = [p for p in ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
                if os.path.exists(p)]
    assert all(mounts[p].split(",")[0] == "ro" for p in expected), mounts


def test_masked_paths_read_empty_and_sys_is_read_only(setup: Setup) -> None:
    files = [p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/latency_stats",
                         "/proc/timer_stats", "/proc/sched_debug") if os.path.exists(p)]
    dirs = [p for p in ("/proc/acpi", "/proc/asound", "/proc/scsi", "/sys/firmware") if os.path.isdir(p)]
    assert files and dirs, "this kernel shows none of the masked paths"
    script = ("for f in " + " ".join(files) + "; do echo \"$f $(wc -c < $f)\"; done; for d in "
              + " ".join(dirs) + "; do echo \"$d $(ls -A $d | wc -l)\"; done; "
              "awk '$5 == \"/sys\" {print $6}' /proc/self/mountinfo; touch /sys/x || echo refused")
    r = setup.run(script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:-2] == [f"{p} 0" for p in files + dirs]
    assert lines[-2].split(",")[0] == "ro" and lines[-1] == "refused"


def test_no_new_privileges_stops_setuid(setup: Setup) -> None:
    r = setup.run("grep NoNewPrivs /proc/self/status; su -s /bin/sh nobody -c /usr/bin/euid",
                  "--security-opt", "no-new-privileges")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"NoNewPrivs:\t1\nuid={NOBODY} euid={NOBODY}\n"


def test_seccomp_denies_the_keyring_and_new_user_namespaces(setup: Setup) -> None:
    r = setup.run("grep Seccomp: /proc/self/status; /usr/bin/euid probe")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Seccomp:\t2\nkeyctl Operation not permitted\nunshare-user Operation not permitted\n"
    r = setup.run("/usr/bin/euid probe", "--security-opt", "seccomp=unconfined")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "keyctl ok\nunshare-user ok\n"


# -- a real terminal ------------------------------------------------------------------------------------

class Terminal:
    """The launcher on a pty of the test's, as on a user's terminal: session leader, controlling tty."""

    def __init__(self, setup: Setup, command: list[str], rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        from launcher_util import _env, launcher_argv

        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.attrs = termios.tcgetattr(self.slave)
        self.buf = b""

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        user = setup.user
        self.proc = subprocess.Popen(
            launcher_argv(f"{setup.upper()}:{setup.image}", command, (), user),
            stdin=self.slave, stdout=self.slave, stderr=self.slave, start_new_session=True,
            preexec_fn=controlling_tty, cwd="/", env=_env(user, None),
            user=user.uid if user else None, group=user.gid if user else None,
            extra_groups=[] if user else None)

    def resize(self, rows: int, cols: int) -> None:
        """As a terminal emulator does: TIOCSWINSZ on its side; the kernel sends SIGWINCH."""
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 20) -> None:
        import select
        import time

        deadline = time.monotonic() + timeout
        while pattern not in self.buf and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.buf += os.read(self.master, 4096)
                except OSError:
                    break
        assert pattern in self.buf, f"no {pattern!r} in {self.buf[-800:]!r}"
        self.buf = self.buf[self.buf.index(pattern) + len(pattern):]

    def close(self) -> int:
        import termios

        try:
            code = self.proc.wait(timeout=20)
            assert termios.tcgetattr(self.slave) == self.attrs, "the launcher left its terminal in raw mode"
            return code
        finally:
            if self.proc.poll() is None:
                from launcher_util import kill_tree

                kill_tree(self.proc)  # type: ignore[arg-type]
            os.close(self.master)
            os.close(self.slave)


def _in_foreground(pid: int, timeout: float = 20) -> None:
    """Wait until *pid* runs (not stopped) as the foreground process group of its terminal."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        if fields[0] != "T" and fields[2] == fields[5]:  # state, pgrp == tpgid
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} is not running in the foreground")


def test_a_terminal_of_its_own_with_job_control_ctrl_c_and_resizes(setup: Setup) -> None:
    """On a terminal the command gets a pty of the container's devpts as its controlling tty (it is the
    session leader); the window size follows the launcher's; Ctrl-C stops the foreground job, not the
    shell; Ctrl-Z stops it and fg resumes it; and the launcher's terminal is restored when it exits."""
    import time

    from launcher_util import wait_for_comm

    term = Terminal(setup, ["/bin/sh", "-i"], 30, 100)
    try:
        term.send(b"echo TTY=$(tty) SIZE=$(stty size) SID=$(cut -d' ' -f6 /proc/1/stat)\n")
        term.expect(b"TTY=/dev/pts/0 SIZE=30 100 SID=1")
        term.resize(40, 120)
        wait_for_comm(term.proc.pid, "sh")
        # The launcher relays the new size when its SIGWINCH is handled: under load that can come
        # after the shell has read the next line, so the size is asked until it follows (or 20 s).
        deadline = time.monotonic() + 20
        while True:
            term.send(b"stty size | sed 's/^/NOW /'\n")
            try:
                term.expect(b"NOW 40 120", timeout=1)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        term.send(b"sleep 60\n")
        sleeper = wait_for_comm(term.proc.pid, "sleep")
        _in_foreground(sleeper)
        term.send(b"\x03")
        term.send(b"echo AFTER $?\n")
        term.expect(b"AFTER 130")
        from launcher_util import wait_gone

        assert wait_gone([sleeper]) == []
        term.send(b"sleep 61\n")
        sleeper = wait_for_comm(term.proc.pid, "sleep")
        _in_foreground(sleeper)
        term.send(b"\x1a")
        term.expect(b"Stopped")
        term.send(b"fg\n")  # back in the foreground, where Ctrl-C reaches it again
        term.expect(b"sleep 61")
        _in_foreground(sleeper)
        term.send(b"\x03")
        term.send(b"echo FG $?\n")
        term.expect(b"FG 130")
        term.send(b"exit 3\n")
    finally:
        code = term.close()
    assert code == 3


def test_t_without_a_terminal_still_gives_a_pty(setup: Setup) -> None:
    """``-t`` with stdin and stdout pipes, as ``docker run -t`` in a script: the command's output (its
    stderr too) comes through the pty, all on the one pty."""
    r = run_launcher(f"{setup.upper()}:{setup.image}", ["/bin/sh", "-c", "tty; echo err >&2; echo $TERM"],
                     ["-t"], user=setup.user)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "/dev/pts/0\nerr\nxterm\n"  # (text mode reads the pty's CRLF as LF)
