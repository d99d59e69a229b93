"""The fast path of ``unionfs mount`` and ``unionfs-overlay``: mount here, serve in a resident server.

The client runs in the caller's own mount and user namespaces and imports neither click, trio nor
pyfuse3: it parses the command line with the core's config, opens the branch directories and the
work dir, mounts FUSE itself (root: /dev/fuse and mount(2), as libfuse does; other users:
fusermount3, which sends the /dev/fuse fd back over ``_FUSE_COMMFD``), hands the config and every
fd to the resident server (`unionfs.server.resident`) and waits for "ready".  The server forks a
worker that serves the mount.

Anything this path cannot do the normal path does: a command line it does not handle, a user error
(the normal path says it, in the same words as ever), no server to be had, a server that refuses
or fails.  A mount made here that the server did not take is unmounted before that.  So `try_mount`
either mounts (and returns the exit status) or returns None and leaves nothing behind.

``UNIONFS_SERVER=off`` in the environment keeps every mount on the normal path.
"""
from __future__ import annotations

import os
import socket
import stat
import sys
import time

from unionfs.core.config import MountConfig, build_config, flag_notes
from unionfs.core.errors import QuietError

PROTOCOL = 1
SOCKET_NAME = "server.sock"
ENV = "UNIONFS_SERVER"
START_TIMEOUT = 10.0   # seconds for a server this client started to listen
MAX_FDS = 250          # the kernel's SCM_MAX_FD is 253
FUSE_DEVICE = "/dev/fuse"
FSTYPE = "fuse.unionfs"

_debug = bool(os.environ.get("UNIONFS_DEBUG_CLIENT"))


def _say(msg: str) -> None:
    """The fast path's debug log: why a mount took the normal path (UNIONFS_DEBUG_CLIENT=1)."""
    if _debug:
        print(f"unionfs (fast path): {msg}", file=sys.stderr)


def build_id() -> str:
    """What a server and its client must share: the protocol, the interpreter and this very code
    (the newest modification time of unionfs' modules), so that a server started before an
    upgrade or an edit is not handed mounts."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    newest = 0
    for sub in ("", "core", "server"):
        d = os.path.join(pkg, sub)
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith((".py", ".so")):
                    newest = max(newest, e.stat().st_mtime_ns)
    return f"{PROTOCOL}:{sys.executable}:{pkg}:{newest}"


# The command lines

def unionfs_args(args: list[str]) -> tuple[str | None, str, list[str]] | None:
    """``unionfs mount [-o OPTS]... [BRANCHES] MOUNTPOINT`` or mount.fuse3's ``unionfs SRC MNT -o
    OPTS`` as (branches, mountpoint, options); None for any other command line (-f, -d, --log-file,
    help, a remount...), which the CLI takes."""
    if args[:1] == ["mount"]:
        rest = args[1:]
    elif len(args) == 4 and args[2] == "-o" and not args[0].startswith("-") and \
            any(c in args[0] for c in "/:=."):   # a word could be a command: the CLI decides
        rest = [args[2], args[3], args[0], args[1]]
    else:
        return None
    options, positional = _split(rest)
    if options is None or not 1 <= len(positional) <= 2:
        return None
    if len(positional) == 1:
        return None if not _has_lowerdir(options) else (None, positional[0], options)
    return positional[0], positional[1], options


def overlay_args(args: list[str]) -> tuple[str, list[str]] | None:
    """``unionfs-overlay [-o OPTS]... [SOURCE] MERGED`` as (mountpoint, options); None otherwise."""
    options, positional = _split(args)
    if options is None or not 1 <= len(positional) <= 2:
        return None
    return positional[-1], options


def command(prog: str, args: list[str]) -> tuple[str | None, str, list[str], bool] | None:
    """The command line of *prog* (``unionfs`` or ``unionfs-overlay``) after the program name as
    (branches, mountpoint, options, strict), or None when the CLI must take it."""
    if prog == "unionfs-overlay":
        over = overlay_args(args)
        return None if over is None else (None, over[0], over[1], False)
    parsed = unionfs_args(args)
    return None if parsed is None else (*parsed, True)


def _split(args: list[str]) -> tuple[list[str] | None, list[str]]:
    options: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            options.append(args[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.append(a[2:])
        elif a.startswith("-") or a == "":
            return None, []
        else:
            positional.append(a)
        i += 1
    if any(part in ("remount", "debug") for o in options for part in o.split(",")):
        return None, []
    return options, positional


def _has_lowerdir(options: list[str]) -> bool:
    return any(part.startswith("lowerdir=") for o in options for part in o.split(","))


# The mount

def try_mount(prog: str, spec: str | None, mountpoint: str, options: list[str], strict: bool) -> int | None:
    """Mount through a resident server; the exit status, or None to take the normal path."""
    if os.environ.get(ENV, "auto") == "off":
        return None
    try:
        cfg = build_config(spec, mountpoint, options, strict=strict)
    except (QuietError, OSError) as e:
        _say(f"{e}: the normal path says it")
        return None
    if len(cfg.branches) + 2 > MAX_FDS:
        return None
    sock = _greeted(connect(start=True))
    if sock is None:
        return None
    with sock:
        if not _mount_and_hand_over(sock, cfg):
            return None
    notes = mount_notes(prog, cfg, strict)
    if notes:
        print(*notes, sep="\n", file=sys.stderr)
    return 0


def mount_notes(prog: str, cfg: MountConfig, strict: bool) -> list[str]:
    """The lines the normal path says on stderr about a mount that succeeded."""
    notes = [f"{prog}: ignoring unsupported option {opt}" for opt in cfg.ignored] if not strict else []
    return notes + [f"{prog}: {n}" for n in flag_notes(cfg)]


def _mount_and_hand_over(sock: socket.socket, cfg: MountConfig) -> bool:
    fds: list[int] = []
    fuse_fd = -1
    try:
        try:
            for path, _ in cfg.branches:
                fds.append(_open_dir(path))
            if cfg.workdir is not None:
                fds.append(_open_dir(cfg.workdir))
        except OSError as e:
            _say(f"cannot open {e.filename}: {e.strerror}")
            return False
        # A Python literal (json is a few ms of imports); realpath before: not once mounted.
        request = repr(message(cfg)).encode()
        fuse_fd = mount_fuse(cfg)
        if fuse_fd < 0:
            return False
        reply = _hand_over(sock, request, [fuse_fd, *fds])
        if reply == "ready":
            return True
        _say(f"the server answered {reply!r}")
        unmount(cfg.mountpoint)
        return False
    finally:
        for fd in fds:
            os.close(fd)
        if fuse_fd >= 0:
            os.close(fuse_fd)


def _open_dir(path: str) -> int:
    """A branch or work dir, opened as `unionfs.core.branches.open_root` opens it."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def message(cfg: MountConfig) -> dict[str, object]:
    """The config as the server's worker rebuilds it (`MountConfig.from_fields`), its mount point
    resolved here, in the caller's namespaces."""
    return {**cfg.fields(), "mountpoint": os.path.realpath(cfg.mountpoint)}


def _greeted(sock: socket.socket | None) -> socket.socket | None:
    """*sock* once the server said it takes mounts of our build; a server of another build gives
    way, and one of ours is started."""
    for _ in range(2):
        if sock is None:
            return None
        try:
            sock.send(build_id().encode())
            answer = sock.recv(4096)
        except OSError as e:
            answer = f"(lost: {e.strerror})".encode()
        if answer == b"ok":
            return sock
        sock.close()
        _say(f"the server answered {answer!r}")
        if answer != b"refused: another build":
            return None
        sock = connect(start=True)
    return None


def _hand_over(sock: socket.socket, data: bytes, fds: list[int]) -> str:
    try:
        socket.send_fds(sock, [data], fds)
        reply = sock.recv(65536)
    except OSError as e:
        return f"(lost: {e.strerror})"
    return os.fsdecode(reply) if reply else "(the server hung up)"


# FUSE, mounted the way libfuse mounts it

def mount_fuse(cfg: MountConfig) -> int:
    """Mount FUSE at the mount point; the /dev/fuse fd, or -1 (said in the debug log)."""
    if os.geteuid() == 0:
        return _mount_as_root(cfg)
    return _mount_with_fusermount(cfg)


def _flag_words(cfg: MountConfig) -> list[str]:
    """The mount flags as words: libfuse's default nosuid,nodev, changed by what was asked."""
    words = {"suid": "nosuid", "dev": "nodev", "exec": "exec"}
    for flag in cfg.flags:
        words[flag.removeprefix("no")] = flag
    return ["ro" if not cfg.writable else "rw", *words.values()]


def kernel_options(cfg: MountConfig) -> list[str]:
    """The FUSE mount's own options after ``fd=,rootmode=,user_id=,group_id=``."""
    opts = ["default_permissions"]
    if cfg.allow_other or os.geteuid() == 0:
        opts.append("allow_other")
    return opts


def root_mount_flags(cfg: MountConfig) -> int:
    """mount(2)'s flags for root's mount."""
    from unionfs.core import sysx

    flags = 0
    for word in _flag_words(cfg):
        flags |= sysx.FLAG_WORDS.get(word, 0)
    return flags


def fusermount_options(cfg: MountConfig) -> list[str]:
    """fusermount3's ``-o`` words for a user's mount."""
    return [*_flag_words(cfg), *kernel_options(cfg), f"fsname={cfg.fsname}", "subtype=unionfs"]


def _mount_as_root(cfg: MountConfig) -> int:
    from unionfs.core import sysx

    flags = root_mount_flags(cfg)
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        _say(f"{FUSE_DEVICE}: {e.strerror}")
        return -1
    try:
        rootmode = stat.S_IFMT(os.stat(cfg.mountpoint).st_mode)
        data = f"fd={fd},rootmode={rootmode:o},user_id={os.getuid()},group_id={os.getgid()}"
        data = ",".join([data, *kernel_options(cfg)])
        sysx.mount(cfg.fsname.encode(), os.fsencode(cfg.mountpoint), FSTYPE.encode(), flags, data.encode())
    except OSError as e:
        _say(f"mount: {e.strerror}")
        os.close(fd)
        return -1
    return fd


def _mount_with_fusermount(cfg: MountConfig) -> int:
    """libfuse's protocol: fusermount3 mounts and sends the fd back over the socket _FUSE_COMMFD."""
    opts = fusermount_options(cfg)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            os.set_inheritable(theirs.fileno(), True)
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            pid = _spawn(["fusermount3", "-o", ",".join(opts), "--", cfg.mountpoint], env)
        finally:
            theirs.close()
        if pid < 0:
            return -1
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError as e:
            _say(f"fusermount3: {e.strerror}")
            fds = []
        _, status = os.waitpid(pid, 0)
    if not fds:
        _say(f"fusermount3 gave no fd (status {status})")
        return -1
    if status != 0:
        os.close(fds[0])
        return -1
    os.set_inheritable(fds[0], False)
    return fds[0]


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start *argv* (looked up on PATH) with stdin and stdout on /dev/null and its complaints hidden
    (the normal path, if taken, says them); its pid, or -1."""
    quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    try:
        return os.posix_spawnp(argv[0], argv, env if env is not None else os.environ, file_actions=quiet)
    except OSError as e:
        _say(f"{argv[0]}: {e.strerror}")
        return -1


def unmount(mountpoint: str) -> None:
    """Take back a mount this client made (lazily: nothing can be using it yet)."""
    if os.geteuid() == 0:
        from unionfs.core import sysx

        try:
            sysx.umount2(os.fsencode(mountpoint), sysx.MNT_DETACH)
        except OSError as e:
            _say(f"umount {mountpoint}: {e.strerror}")
        return
    pid = _spawn(["fusermount3", "-u", "-z", "--", mountpoint])
    if pid > 0:
        os.waitpid(pid, 0)


# The server's socket

def socket_path() -> str:
    """The server's socket, in the state directory of `unionfs.server.statedir.state_dir` (whose
    rule this repeats: that module's imports, logging and dataclasses, are half this path's cost).

    The client trusts the socket only after the kernel says who listens on it (`_connect_to`): a
    directory someone else made first can hand it nothing but a refusal."""
    if os.geteuid() == 0:
        return f"/run/unionfs/{SOCKET_NAME}"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base) and os.path.isdir(base):
        return os.path.join(base, "unionfs", SOCKET_NAME)
    return f"/tmp/unionfs-{os.getuid()}/{SOCKET_NAME}"


def connect(start: bool) -> socket.socket | None:
    """A connection to this user's resident server (with *start*, started first when there is
    none); None when there is none to be had."""
    sock = _connect_to(socket_path())
    if sock is not None or not start:
        return sock
    return _start_and_connect()


def _connect_to(path: str) -> socket.socket | None:
    """Connect to the server at *path* and check that it runs as our user (or root)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[0:4], sys.byteorder)
        uid = int.from_bytes(creds[4:8], sys.byteorder)
        if uid not in (os.geteuid(), 0):
            raise OSError(0, f"the server runs as uid {uid}")
        if not _same_namespaces(pid):
            raise OSError(0, "the server runs in other PID or user namespaces")
    except OSError as e:
        _say(f"no server: {e.strerror}")
        sock.close()
        return None
    return sock


def _same_namespaces(pid: int) -> bool:
    """Whether the server (*pid*, as this process sees it) shares our PID and user namespaces.

    The kernel gives a request's caller PID in the namespace of the process that mounted, which
    here is this client: a server in other namespaces would read the wrong /proc entry for a
    caller's groups and capabilities (ACLs, setgid), so such a server is not used."""
    if pid <= 0:
        return False   # not visible from here: another PID namespace
    try:
        return all(os.stat(f"/proc/self/ns/{ns}").st_ino == os.stat(f"/proc/{pid}/ns/{ns}").st_ino
                   for ns in ("pid", "user"))
    except OSError:
        return False


def _start_and_connect() -> socket.socket | None:
    """Start a server in the background (``python -m unionfs.server.resident start``, which returns
    once it listens, or once another is found listening) and connect to it."""
    pid = _spawn([sys.executable, "-m", "unionfs.server.resident", "start"])
    if pid < 0:
        return None
    _, status = os.waitpid(pid, 0)
    if status != 0:
        _say(f"the server did not start (status {status})")
        return None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        sock = connect(start=False)
        if sock is not None:
            return sock
        time.sleep(0.01)
    return None
