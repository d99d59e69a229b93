"""A rehearsal of a mount, on throwaways, for a resident server's spare worker.

A worker forked for a mount pays, once, for what it runs first: the copy-on-write faults of the
objects it touches (it shares the server's pages until it writes one, and Python writes an object
whenever it takes a reference) and the interpreter's first passes through each function. Paid after a
client asked, that was about 4 ms before the mount was ready and 2 ms more over its first dozen
requests. A spare worker (`unionfs.server.resident`) runs `rehearse` while it waits instead: the
start of `daemon.serve_handed_over` and `daemon.serve` up to the FUSE session, then the handlers
of the requests a mount gets first, on a union of three directories it makes for the purpose (a
lower layer, an upper one and a work dir in the state directory) and removes.

No FUSE session is involved: the handlers are called as pyfuse3 would call them, with a union that
tells the kernel nothing (`NO_KERNEL_CACHE`).  Nothing is left behind: files, fds, logging and the
interpreter's state are as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import types
from typing import Any

from unionfs.core import mountinfo
from unionfs.core.interfaces import NO_KERNEL_CACHE
from unionfs.core.whiteout import Dialect

from . import control, daemon
from .statedir import REHEARSAL_PREFIX, StateDir

log = logging.getLogger(__name__)

ROOT = 1   # pyfuse3.ROOT_INODE


def rehearse() -> list[str]:
    """Rehearse a mount's start and its first requests (see the module's docstring); the handlers
    that failed where a mount's would have answered (none, unless something changed under it)."""
    import trio

    trio.run(trio.sleep, 0)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    state = StateDir.open(create=True)
    try:
        _start(state)
        return trio.run(_requests, state.path) if state is not None else []
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        if state is not None:
            state.close()


def _start(state: StateDir | None) -> None:
    """What `serve_handed_over` and `serve` do before the FUSE session, on throwaway names."""
    from unionfs.core.branches import stack_from_fds

    from .operations import Operations

    name = f"{REHEARSAL_PREFIX}{os.getpid()}"
    if state is not None:
        log_ = state.open_log(name + ".log")
        try:
            daemon._setup_logging(False, log_)
            log_.tidy()
        finally:
            os.close(log_.fd)
    daemon._open_fds()
    mountinfo.mount_at("/")
    with daemon._stderr_captured():
        pass
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    layers = stack_from_fds([("/", fd, False)], None, None, False)
    try:
        ops = Operations.over(layers, Dialect.OVERLAY, readonly=True, invalidator=NO_KERNEL_CACHE)
        control.Control(ops, "overlay", "/")
        if state is not None:
            held = daemon._write_pidfile(state, name + ".pid")
            try:
                state.remove_pid(name + ".pid", os.getpid())
            finally:
                if held is not None:
                    os.close(held)
            listener = control.listen(state, name)
            if listener is not None:
                listener.close()
                control.forget(state, name)
        ops.union.close()
    finally:
        layers.close()


async def _requests(where: str) -> list[str]:
    """The requests a new mount gets first (lookups, a read, a listing's open, a create, a copy-up,
    mkdir, rename, unlink, symlink, chmod), answered by the handlers over a throwaway union under
    *where*, which is removed."""
    from unionfs.core.branches import stack_from_fds

    from .operations import Operations

    top = tempfile.mkdtemp(prefix=REHEARSAL_PREFIX, dir=where)
    try:
        lower, upper, work = (os.path.join(top, d) for d in ("lower", "upper", "work"))
        for d in (lower, upper, work, os.path.join(lower, "d")):
            os.mkdir(d)
        for f in ("f", "d/a", "d/b", "d/c", "d/e"):
            with open(os.path.join(lower, f), "w") as out:
                out.write("rehearsal\n")
        opened = [(upper, _dir(upper), True), (lower, _dir(lower), False)]
        layers = stack_from_fds(opened, _dir(work), work, False)
        try:
            ops = Operations.over(layers, Dialect.OVERLAY, invalidator=NO_KERNEL_CACHE)
            try:
                return await _script(ops)
            finally:
                ops.union.close()
        finally:
            layers.close()
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def _script(ops: Any) -> list[str]:
    ctx = types.SimpleNamespace(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o022)
    failed: list[str] = []

    async def call(handler: str, *args: Any) -> Any:
        try:
            return await getattr(ops, handler)(*args)
        except Exception:  # noqa: BLE001 - a rehearsal goes on: the real mount will say it
            failed.append(handler)
            return None

    f = await call("lookup", ROOT, b"f", ctx)
    d = await call("lookup", ROOT, b"d", ctx)
    if f is None or d is None:
        return failed
    await call("getattr", f.st_ino, ctx)
    await call("lookup", ROOT, b"missing", ctx)
    fi = await call("open", f.st_ino, os.O_RDONLY, ctx)
    if fi is not None:
        await call("read", fi.fh, 0, 4096)
        await call("release", fi.fh)
    dh = await call("opendir", d.st_ino, ctx)
    if dh is not None:
        await call("releasedir", dh)
    made = await call("create", ROOT, b"n", 0o644, os.O_WRONLY | os.O_CREAT, ctx)
    if made is not None:
        await call("write", made[0].fh, 0, b"n\n")
        await call("release", made[0].fh)
    a = await call("lookup", d.st_ino, b"a", ctx)
    if a is not None:
        fi = await call("open", a.st_ino, os.O_WRONLY | os.O_APPEND, ctx)   # a copy-up
        if fi is not None:
            await call("write", fi.fh, 10, b"more\n")
            await call("release", fi.fh)
    m = await call("mkdir", ROOT, b"m", 0o755, ctx)
    await call("lookup", d.st_ino, b"b", ctx)
    if m is not None:
        await call("rename", d.st_ino, b"b", m.st_ino, b"b", 0, ctx)
    await call("lookup", d.st_ino, b"c", ctx)
    await call("unlink", d.st_ino, b"c", ctx)
    await call("symlink", ROOT, b"s", b"f", ctx)
    e = await call("lookup", d.st_ino, b"e", ctx)
    if e is not None:
        attr = types.SimpleNamespace(st_mode=0o100600)
        fields = types.SimpleNamespace(update_atime=False, update_ctime=False, update_gid=False,
                                       update_mode=True, update_mtime=False, update_size=False,
                                       update_uid=False)
        await call("setattr", e.st_ino, attr, fields, None, ctx)
    await call("listxattr", f.st_ino, ctx)
    await call("statfs", ctx)
    return failed


def _dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


__all__ = ["rehearse"]
