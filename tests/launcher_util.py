"""Helpers for the launcher tests: a busybox root filesystem, running ``unionfs run``, leak checks."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from unionfs.core import mountinfo

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _busybox_binary(workdir: Path) -> Path:
    """busybox from Debian's busybox-static: the installed package's file, else ``apt-get download``."""
    try:
        listing = subprocess.run(["dpkg", "-L", "busybox-static"], capture_output=True, text=True)
        files = listing.stdout.split()
    except FileNotFoundError:
        files = []
    for f in files:
        if f.endswith("/bin/busybox") and os.path.isfile(f):
            return Path(f)
    deb_dir = workdir / "deb"
    deb_dir.mkdir()
    subprocess.run(["apt-get", "download", "busybox-static"], cwd=deb_dir, check=True, capture_output=True)
    (deb,) = deb_dir.glob("busybox-static_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(deb_dir / "x")], check=True)
    return deb_dir / "x" / "bin" / "busybox"


def build_busybox_layer(dest: Path, workdir: Path) -> None:
    """A minimal image layer: /bin/busybox, a symlink per applet, /etc/passwd and /etc/group."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(_busybox_binary(workdir), dest / "bin" / "busybox")
    os.chmod(dest / "bin" / "busybox", 0o755)
    applets = subprocess.run([str(dest / "bin" / "busybox"), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", dest / "bin" / applet)
    (dest / "etc").mkdir()
    passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    (dest / "etc" / "passwd").write_text(passwd)
    (dest / "etc" / "group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    (dest / "root").mkdir(mode=0o700)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Path -> (mode, size, content or link target) for everything under *root*."""
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content: bytes | str | None = None
            if os.path.islink(p):
                content = os.readlink(p)
            elif os.path.isfile(p):
                content = Path(p).read_bytes()
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, content)
    return out


def mounts_mentioning(*needles: str) -> list[mountinfo.Mount]:
    """Our own mounts whose mount point, root or source mentions any of *needles* (other engineers
    mount too)."""
    wanted = [os.fsencode(n) for n in needles]
    return [m for m in mountinfo.mounts()
            if any(n in m.point or n in m.root or n in os.fsencode(m.source) for n in wanted)]


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def descendants_of(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def wait_gone(pids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """The pids still alive (and not zombies) after waiting up to *timeout* seconds."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    return alive


def wait_for_comm(launcher: int, comm: str, timeout: float = 10) -> int:
    """The pid of the launcher's descendant named *comm*, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants_of(launcher):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    return pid
            except OSError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"no {comm} under {launcher}")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass
class UnprivUser:
    name: str
    uid: int
    gid: int


_user_serial = 0


@contextlib.contextmanager
def unprivileged_user(subids: bool = False) -> Iterator[UnprivUser]:
    """A user made for the test, deleted afterwards: a system user without a subuid range, or,
    with *subids*, a regular one that useradd gives /etc/subuid and /etc/subgid ranges."""
    global _user_serial
    _user_serial += 1
    name = f"ufs{'sub' if subids else 'run'}{os.getpid() % 100000}x{_user_serial}"
    with contextlib.suppress(KeyError):    # left by a run that was killed: the name is ours
        remove_user(name, pwd.getpwnam(name).pw_uid)
    kind = [] if subids else ["--system"]
    subprocess.run(["useradd", *kind, "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    pw = pwd.getpwnam(name)
    try:
        yield UnprivUser(name, pw.pw_uid, pw.pw_gid)
    finally:
        remove_user(name, pw.pw_uid)


def _processes_of(uid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    out.append(int(entry.name))
    return out


def remove_user(name: str, uid: int) -> None:
    """userdel *name* once its processes are gone. A resident server the test started for the user
    outlives the test by its idle time, and userdel refuses a user with processes (exit 8); the user
    then stays and the next test's useradd of the same name fails (exit 9)."""
    for step in range(40):
        left = _processes_of(uid)
        if not left:
            break
        if step in (10, 25):
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM if step == 10 else signal.SIGKILL)
        time.sleep(0.05)
    if subprocess.run(["userdel", name], capture_output=True).returncode != 0:
        subprocess.run(["userdel", "--force", name], capture_output=True)


@contextlib.contextmanager
def dev_fuse_mode(mode: int) -> Iterator[None]:
    """Set /dev/fuse to *mode* for the block (as Debian's udev ships it: 0666), then restore it."""
    old = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", mode)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", old)


@contextlib.contextmanager
def world_readable_tempdir(prefix: str) -> Iterator[Path]:
    """A temp dir under /tmp that an unprivileged user can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_user_python: dict[int, tuple[str, str]] = {}
_IMPORTS = "import launcher.cli, launcher.supervisor, unionfs.core.config, unionfs.server.daemon, unionfs.server.operations, pyfuse3, trio"


def _can_import(user: UnprivUser, python: str, pythonpath: str) -> bool:
    try:
        r = subprocess.run([python, "-c", _IMPORTS], user=user.uid, group=user.gid, extra_groups=[],
                           capture_output=True, cwd="/", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath})
    except PermissionError:
        return False
    return r.returncode == 0


def _staged_packages() -> str:
    """A world-readable copy of this repo's packages and the site-packages they import, for
    checkouts an unprivileged user cannot read (removed at exit)."""
    import atexit
    import importlib

    for name in _IMPORTS.removeprefix("import ").split(", "):
        importlib.import_module(name)
    stage = Path(tempfile.mkdtemp(prefix="unionfs-run-py-", dir="/tmp"))
    atexit.register(shutil.rmtree, stage, True)
    # longest first: the venv's site-packages may lie inside the checkout
    roots = sorted([str(REPO), *(p for p in sys.path if p.endswith("site-packages"))], key=len, reverse=True)
    tops: set[Path] = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        root = next((r for r in roots if f and f.startswith(r + "/")), None)
        if f and root:
            top = Path(f).relative_to(root).parts[0]
            if not top.startswith((".", "tests", "__editable__")):
                tops.add(Path(root) / top)
    for top in tops:
        if top.is_dir():
            shutil.copytree(top, stage / top.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(top, stage / top.name)
    for dirpath, _dirnames, filenames in os.walk(stage):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o755 if name.endswith(".so") else 0o644)
    return str(stage)


def python_for(user: UnprivUser | None) -> tuple[str, str]:
    """(interpreter, PYTHONPATH) with which *user* can run the launcher and the FUSE server.

    The venv's interpreter may live where an unprivileged user cannot reach it (a pyenv build
    under /root, say): then the system's python3 of the same version runs the venv's packages
    through PYTHONPATH; and where the checkout itself is unreadable to the user, from a
    world-readable copy of them.
    """
    if user is None:
        return PYTHON, str(REPO)
    if user.uid not in _user_python:
        site = ":".join(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
        ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
        system = shutil.which(ver, path="/usr/local/bin:/usr/bin:/bin")
        candidates = [(PYTHON, str(REPO))]
        if system:
            candidates.append((system, f"{REPO}:{site}"))
        for python, path in candidates:
            if _can_import(user, python, path):
                _user_python[user.uid] = (python, path)
                break
        else:
            if system is None:
                raise RuntimeError(f"no {ver} that uid {user.uid} can run")
            _user_python[user.uid] = (system, _staged_packages())
    return _user_python[user.uid]


def launcher_argv(
    branches: str, command: Sequence[str], options: Sequence[str] = (), user: UnprivUser | None = None
) -> list[str]:
    return [python_for(user)[0], "-m", "launcher", *options, branches, "--", *command]


def run_launcher(
    branches: str,
    command: Sequence[str],
    options: Sequence[str] = (),
    *,
    user: UnprivUser | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    """Run ``unionfs run`` (as ``python -m launcher``) to completion; output captured as text."""
    return subprocess.run(
        launcher_argv(branches, command, options, user),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        stdin=stdin,
        env=_env(user, env),
        user=user.uid if user else None,
        group=user.gid if user else None,
        extra_groups=[] if user else None,
    )


def start_launcher(
    branches: str,
    command: Sequence[str],
    options: Sequence[str] = (),
    *,
    user: UnprivUser | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``unionfs run`` in the background, stdout piped (to wait for a line the command prints)."""
    return subprocess.Popen(
        launcher_argv(branches, command, options, user),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd="/",
        env=_env(user, env),
        user=user.uid if user else None,
        group=user.gid if user else None,
        extra_groups=[] if user else None,
    )


def _env(user: UnprivUser | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env["PYTHONPATH"] = python_for(user)[1]
    env.pop("TMPDIR", None)
    if user:
        env["HOME"] = "/"
        env["USER"] = env["LOGNAME"] = user.name
    env.update(extra or {})
    return env


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """Test clean-up: SIGKILL the launcher and whatever it started, if still running."""
    pids = descendants_of(proc.pid)
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_gone(pids)


@contextlib.contextmanager
def once_ready(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The launched command has printed "ready"; on the way out, nothing the launcher started is left."""
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def end_with_sigterm(proc: subprocess.Popen[str], code: int = 128 + signal.SIGTERM) -> None:
    """SIGTERM to the launcher ends the command, and the launcher exits with *code*: 128 + SIGTERM
    when PID 1 handles SIGTERM (or is --init), 128 + SIGKILL when --stop-timeout ran out first."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == code


class Image:
    """Two image layers (busybox; an app layer on top) and a snapshot to prove they never change."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.l1 = base / "l1"
        self.l2 = base / "l2"
        build_busybox_layer(self.l1, base)
        (self.l2 / "app").mkdir(parents=True)
        (self.l2 / "app" / "greeting").write_text("hello from l2\n")
        (self.l2 / "etc").mkdir()
        (self.l2 / "etc" / "motd").write_text("l2 motd\n")
        (self.l1 / "etc" / "motd").write_text("l1 motd\n")
        self.snapshot = self.take_snapshot()

    def take_snapshot(self) -> dict[str, object]:
        return {"l1": tree_snapshot(self.l1), "l2": tree_snapshot(self.l2)}

    def branches(self, upper: Path) -> str:
        return f"{upper}:{self.l2}:{self.l1}"


@contextlib.contextmanager
def two_users() -> Iterator[tuple[UnprivUser, UnprivUser]]:
    """(a user, another one) made for the test, with /dev/fuse usable by them (0666, put back after);
    the test is skipped when not root."""
    if os.geteuid() != 0:
        import pytest

        pytest.skip("making the test users needs root (CI runs as root)")
    with unprivileged_user() as me, unprivileged_user(subids=True) as other, dev_fuse_mode(0o666):
        yield me, other


def unionfs_as(user: UnprivUser, *args: str, server: str = "auto") -> subprocess.CompletedProcess[str]:
    """``unionfs ARGS`` run as *user* (in /, a minimal environment, UNIONFS_SERVER=*server*)."""
    python, path = python_for(user)
    if os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        os.chmod("/dev/fuse", 0o666)  # another test's dev_fuse_mode() put it back meanwhile
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "HOME": "/", "LC_ALL": "C.UTF-8", "UNIONFS_SERVER": server}
    return subprocess.run([python, "-m", "unionfs", *args], capture_output=True, text=True, timeout=60, cwd="/",
                          stdin=subprocess.DEVNULL, env=env, user=user.uid, group=user.gid, extra_groups=[])
