"""``unionfs run --runtime runc``: the same container as the built-in set-up gives, started by runc from
an OCI bundle whose root is the union.  Each check runs a busybox command both ways and compares what
the command sees; runc is Debian's, run by root and (in the launcher's user namespace) by a rootless
user."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from launcher_util import (
    UnprivUser,
    build_busybox_layer,
    dev_fuse_mode,
    mounts_mentioning,
    run_launcher,
    start_launcher,
    tree_snapshot,
    unprivileged_user,
    wait_gone,
    world_readable_tempdir,
)

from launcher import state

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="--runtime runs as root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc (apt-get install runc)"),
    pytest.mark.usefixtures("need_fuse"),
]

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\ntty:x:5:\nstaff:x:50:nobody\nnogroup:x:65534:\n"
RUNC = ("--runtime", "runc")


class Box:
    """A busybox image and fresh container layers for it."""

    def __init__(self, base: Path, user: UnprivUser | None = None) -> None:
        self.base = base
        self.user = user
        self.image = base / "image"
        build_busybox_layer(self.image, base)
        (self.image / "etc" / "passwd").write_text(PASSWD)
        (self.image / "etc" / "group").write_text(GROUP)
        (self.image / "etc" / "motd").write_text("image motd\n")
        (self.image / "etc" / "old").write_text("old\n")
        (self.image / "tmp").mkdir(mode=0o1777)
        os.chmod(self.image / "tmp", 0o1777)
        self.uppers = 0
        self.own(self.image)
        for path in self.image.rglob("*"):
            self.own(path)

    def own(self, path: Path) -> None:
        """Rootless: *path* belongs to the user (uid 0 in the container)."""
        if self.user:
            os.lchown(path, self.user.uid, self.user.gid)

    def upper(self) -> Path:
        self.uppers += 1
        up = self.base / f"upper{self.uppers}"
        up.mkdir()
        self.own(up)
        return up

    def run(self, script: str, *options: str, upper: Path | None = None,
            stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        up = upper or self.upper()
        return run_launcher(f"{up}:{self.image}", ["/bin/sh", "-c", script], options, stdin=stdin,
                            user=self.user)


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with world_readable_tempdir("unionfs-run-runtime-") as base:
        yield Box(base)


@pytest.fixture(scope="module")
def rootless_box() -> Iterator[Box]:
    if shutil.which("newuidmap") is None:
        pytest.skip("needs newuidmap (apt-get install uidmap)")
    with unprivileged_user(subids=True) as user, dev_fuse_mode(0o666), \
            world_readable_tempdir("unionfs-run-runtime-rootless-") as base:
        yield Box(base, user)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    before = mounts_mentioning(".unionfs-run-", "unionfs-run-runtime-")
    yield
    assert mounts_mentioning(".unionfs-run-", "unionfs-run-runtime-") == before, "a mount was left behind"


def test_the_union_is_the_root_and_the_exit_status_comes_back(box: Box) -> None:
    image = tree_snapshot(box.image)
    upper = box.upper()
    r = box.run("echo new > /new; echo changed > /etc/motd; rm /etc/old; cat /etc/motd; exit 3", *RUNC,
                upper=upper)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "changed\n"
    assert (upper / "new").read_text() == "new\n"
    assert (upper / "etc" / "motd").read_text() == "changed\n"
    assert tree_snapshot(box.image) == image
    r = box.run("cat /new; ls /etc/old 2>/dev/null || echo gone", *RUNC, upper=upper)  # the next one sees it
    assert (r.returncode, r.stdout) == (0, "new\ngone\n"), r.stderr


SCRIPT = ('echo "FOO=$FOO HOME=$HOME PATH=$PATH"; pwd; id; hostname; cat /etc/hostname; '
          "grep -E '^Cap(Bnd|Prm|Eff)' /proc/self/status; ulimit -n; ulimit -Hn; "
          "ls /data; echo w > /data/w 2>/dev/null && echo data-rw; touch /x 2>/dev/null && echo root-rw; "
          "echo t > /tmp/t && stat -f -c %T /tmp; stat -c %a /tmp; "
          "cat /proc/kcore >/dev/null 2>&1 || echo kcore-masked; "
          "echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo proc-sys-ro; "
          "unshare -m true 2>/dev/null || echo unshare-denied; swapoff /nonexistent 2>&1; ip link | grep -c '^[0-9]'; "
          "ls /dev | grep -v mqueue | tr '\\n' ' '")


@pytest.mark.parametrize("options", [
    (),
    ("-e", "FOO=bar", "-w", "/work/dir", "-u", "nobody", "--hostname", "box1", "VOL:ro", "--read-only"),
    ("-u", "nobody:staff", "-e", "HOME=/home", "VOL", "--net", "none"),
    ("--cap-drop", "ALL", "--cap-add", "CHOWN", "--security-opt", "no-new-privileges", "--hostname", "b"),
    ("--cap-add", "SYS_ADMIN", "VOL"),
    ("--privileged",),
    ("--cap-add", "ALL"),
    ("--cap-add", "ALL", "--security-opt", "seccomp=unconfined"),
], ids=["defaults", "user-workdir-env-readonly", "group-net-none", "cap-drop-all", "cap-add", "privileged",
        "seccomp", "seccomp-unconfined"])
def test_the_command_sees_what_the_built_in_set_up_gives(box: Box, options: tuple[str, ...]) -> None:
    """-e, -w, -u, -v, --hostname, --read-only, --net and the capability options: the same output,
    capability sets, masked paths and the seccomp filter's answers included, with runc as without it
    (``swapoff`` says EPERM under the filter even with every capability, ENOENT without it)."""
    _same_both_ways(box, options)


@pytest.mark.parametrize("options", [
    (),
    ("-e", "FOO=bar", "-w", "/work/dir", "-u", "nobody:staff", "VOL:ro", "--read-only"),
    ("VOL", "--net", "none", "--cap-drop", "NET_RAW"),
], ids=["defaults", "user-workdir-env-readonly", "net-none-cap-drop"])
def test_rootless_runc_in_the_launchers_user_namespace(rootless_box: Box, options: tuple[str, ...]) -> None:
    """Rootless, runc runs as root of the launcher's user namespace (where the union is mounted) and
    gives the command what the built-in set-up gives."""
    _same_both_ways(rootless_box, options)


def _same_both_ways(box: Box, options: tuple[str, ...]) -> None:
    vol = box.base / "vol"
    vol.mkdir(exist_ok=True)
    (vol / "in-volume").write_text("v\n")
    box.own(vol)
    opts: list[str] = []
    for o in options:
        opts += ["-v", f"{vol}:/data" + o.removeprefix("VOL")] if o.startswith("VOL") else [o]
    if not any(o.startswith("VOL") for o in options):
        opts += ["--tmpfs", "/data"]
    if "--hostname" not in opts:
        opts += ["--hostname", "h"]
    builtin = box.run(SCRIPT, *opts)
    (vol / "w").unlink(missing_ok=True)
    runc = box.run(SCRIPT, *RUNC, *opts)
    (vol / "w").unlink(missing_ok=True)
    assert builtin.returncode == 0, builtin.stderr
    assert runc.stdout.splitlines() == builtin.stdout.splitlines(), runc.stderr
    assert runc.returncode == builtin.returncode
    assert "CapBnd" in runc.stdout


def test_volumes_and_tmpfs_reach_the_host_and_not_the_container_layer(box: Box) -> None:
    vol = box.base / "vol2"
    vol.mkdir()
    upper = box.upper()
    r = box.run("echo into > /data/new; echo s > /scratch/s; stat -f -c %T /scratch; cat /etc/hostname",
                *RUNC, "-v", f"{vol}:/data", "--tmpfs", "/scratch", "--hostname", "c1", upper=upper)
    assert (r.returncode, r.stdout) == (0, "tmpfs\nc1\n"), r.stderr
    assert (vol / "new").read_text() == "into\n"
    assert list(upper.iterdir()) == []  # mount points and init files live in the init layer


def test_stdin_is_passed_through(box: Box, tmp_path: Path) -> None:
    (tmp_path / "in").write_text("piped\n")
    with open(tmp_path / "in", "rb") as f:
        r = box.run("tr a-z A-Z", *RUNC, stdin=f.fileno())
    assert (r.returncode, r.stdout) == (0, "PIPED\n"), r.stderr


def _descendants(pid: int) -> list[int]:
    """Every descendant of *pid*, children of any of its threads included (runc's are in Go's threads)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def _wait_for_comm(launcher: int, comm: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _descendants(launcher):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    return
            except OSError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"no {comm} under {launcher}")


@contextlib.contextmanager
def _ready(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The command has printed "ready"; on the way out, nothing the launcher started is left (runc's
    children hang off its Go threads, where ``launcher_util.kill_tree`` does not look)."""
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        _wait_for_comm(proc.pid, "sleep")
        yield proc
    finally:
        pids = [proc.pid, *_descendants(proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_gone(pids)


def test_sigterm_reaches_pid_1_and_the_stop_timeout_kills_it(box: Box) -> None:
    proc = start_launcher(f"{box.upper()}:{box.image}",
                          ["/bin/sh", "-c", 'trap "exit 7" TERM; echo ready; while :; do sleep 0.05; done'], RUNC)
    with _ready(proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 7
    script = 'trap "echo term" TERM; echo ready; while :; do sleep 0.05; done'
    proc = start_launcher(f"{box.upper()}:{box.image}", ["/bin/sh", "-c", script],
                          [*RUNC, "--stop-timeout", "1"])
    with _ready(proc):
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None and proc.stdout.readline() == "term\n"
        assert proc.wait(timeout=10) == 128 + signal.SIGKILL
        assert time.monotonic() - start >= 1.0


def test_a_killed_launcher_takes_the_container_with_it(box: Box) -> None:
    """SIGKILL to the launcher: runc dies with it, and the container's processes are killed too, even
    when the next launch at once sweeps per-run directories whose launcher is gone (removing the
    directory would unmount the runtime's state under the watchdog)."""
    proc = start_launcher(f"{box.upper()}:{box.image}",
                          ["/bin/sh", "-c", "echo ready; while :; do sleep 0.05; done"], RUNC)
    with _ready(proc):
        pids = _descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        state.sweep_stale(os.getuid(), "/tmp")  # what any launch does first
        assert wait_gone(pids, timeout=20) == []


@pytest.mark.parametrize(("runtime", "path", "message"), [
    ("runc", "EMPTY", "--runtime runc: not found on PATH"),
    ("/nonexistent/runc", None, "--runtime /nonexistent/runc: not an executable file"),
    ("ru nc", None, "--runtime ru nc: give runc, crun or an absolute path"),
])
def test_a_runtime_that_is_not_there_is_one_line(box: Box, tmp_path: Path, runtime: str, path: str | None,
                                                 message: str) -> None:
    env = {"PATH": str(tmp_path)} if path == "EMPTY" else None
    upper = box.upper()
    r = run_launcher(f"{upper}:{box.image}", ["/bin/true"], ("--runtime", runtime), env=env)
    assert r.returncode in (2, 125)
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert list(upper.iterdir()) == []
