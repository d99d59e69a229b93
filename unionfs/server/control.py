"""A mount's control channel: a unix socket its daemon answers on, one JSON request, one JSON reply.

The socket is ``<key>.ctl`` beside the pidfile in the state directory (`statedir`: the key is the
mount point's), mode 0600; a daemon with no state directory (root only in a user namespace cannot
write /run) listens on the abstract name ``unionfs/<uid>/<key>`` instead.  Either way only the
mount's owner or root gets an answer (``SO_PEERCRED``, checked for every connection).

A request is one ``SOCK_SEQPACKET`` message, a JSON object ``{"cmd": NAME, ...}``, with the directory
fds it names attached (``SCM_RIGHTS``): the client opens every directory in its own namespaces, and
the daemon never resolves a path the caller gave.  The reply is one JSON object, ``{"ok": true, ...}``
or ``{"ok": false, "error": LINE, "errno": N}``.

Commands are served on the trio loop, one at a time, between requests of the mount: each is an
async function ``(Control, request, fds) -> reply`` in `COMMANDS`.  To add one::

    @command("stats")
    async def _stats(ctl: Control, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"stats": ctl.ops.stats_snapshot()}

A command takes what it keeps of *fds* out of the list (``fds[i] = -1``); the rest are closed after it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from unionfs.core.branches import ancestors, identity
from unionfs.core.livebranches import (
    BOTTOM,
    BranchError,
    Change,
    Stale,
    apply,
    check_busy,
    copy_ups_running,
    describe,
    plan,
)

from . import compat  # isort: skip - patches libfuse and pyfuse3 before pyfuse3 loads
from .compat import pyfuse3  # isort: skip
from .operations import Operations
from .statedir import CONTROL_MAX, CONTROL_SUFFIX, StateDir, control_abstract

log = logging.getLogger(__name__)

SUFFIX = CONTROL_SUFFIX
MAX_MESSAGE = CONTROL_MAX
MAX_FDS = 64
#: How long a branch change waits for copy-ups under way to finish before it answers EBUSY.
BUSY_WAIT = 5.0

Reply = dict[str, Any]
Command = Callable[["Control", dict[str, Any], list[int]], Awaitable[Reply]]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register an async ``(ctl, request, fds) -> reply`` as the command *name*."""
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn
    return register


class Control:
    """What a command works on: the mount's handlers (and through them the union), its style and
    its mount point (as the daemon was given it)."""

    def __init__(self, ops: Operations, style: str, mountpoint: str) -> None:
        self.ops = ops
        self.style = style
        self.mountpoint = mountpoint
        self.lock = trio.Lock()
        #: Called after the branches changed (the daemon tells the shim which fds to let go of
        #: at the session's end: see `daemon._release_at_session_end`).
        self.after_change: Callable[[], None] = lambda: None


def listen(state: StateDir | None, key: str) -> socket.socket | None:
    """The listening socket: in *state* (mode 0600), else under an abstract name; None when
    neither can be had (the mount then has no control channel, which is logged)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        if state is not None:
            name = key + SUFFIX
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=state.fd)   # left by a daemon that died on this mount point
            old = os.umask(0o177)
            try:
                sock.bind(f"/proc/self/fd/{state.fd}/{name}")
            finally:
                os.umask(old)
        else:
            sock.bind(control_abstract(os.geteuid(), key))
        sock.listen(8)
    except OSError as e:
        log.warning("no control channel (unionfs branch ... will not reach this mount): %s", e)
        sock.close()
        return None
    return sock


def bound(state: StateDir | None, key: str) -> tuple[str, int, int] | None:
    """The socket file `listen` made in *state*: its name, st_dev and st_ino; None when there is none."""
    if state is None:
        return None
    try:
        st = os.stat(key + SUFFIX, dir_fd=state.fd, follow_symlinks=False)
    except OSError:
        return None
    return key + SUFFIX, st.st_dev, st.st_ino


def forget(state: StateDir | None, key: str, made: tuple[str, int, int] | None = None) -> None:
    """Remove the socket file at exit: with *made* (`bound`), only while it is still that file (a
    later mount on the same point may have made its own)."""
    if state is not None and state.fd >= 0:
        if made is not None:
            state.remove_if(key + SUFFIX, made[1:])
            return
        with contextlib.suppress(OSError):
            os.unlink(key + SUFFIX, dir_fd=state.fd)


async def serve(ctl: Control, listener: socket.socket) -> None:
    """Answer connections until cancelled, or until the listener is closed (announced with
    ``trio.lowlevel.notify_closing``: the mount's end)."""
    sock = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = await sock.accept()
            except trio.ClosedResourceError:
                return
            nursery.start_soon(_answer, ctl, conn)


async def _answer(ctl: Control, conn: trio.socket.SocketType) -> None:
    with conn:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid = (int.from_bytes(creds[i:i + 4], sys.byteorder) for i in (0, 4))
        if uid not in (os.geteuid(), 0):
            log.warning("control: refused pid %d of uid %d", pid, uid)
            return
        fds: list[int] = []
        try:
            with trio.move_on_after(30):
                msg, anc, _, _ = await conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
                fds = _fds_of(anc)
                reply = await _run(ctl, msg, fds)
                await conn.send(json.dumps(reply).encode())
        except OSError as e:
            log.debug("control: pid %d: %s", pid, e)
        finally:
            for fd in fds:
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4))
    return fds


async def _run(ctl: Control, msg: bytes, fds: list[int]) -> Reply:
    try:
        req = json.loads(msg)
        fn = COMMANDS.get(str(req.get("cmd"))) if isinstance(req, dict) else None
    except ValueError:
        fn = None
    if fn is None:
        return {"ok": False, "errno": errno.EINVAL, "error": "unknown or malformed request"}
    try:
        async with ctl.lock:
            reply = await fn(ctl, req, fds)
    except OSError as e:
        return {"ok": False, "errno": e.errno or errno.EIO, "error": str(e) if isinstance(e, BranchError)
                else e.strerror or str(e)}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return {"ok": False, "errno": errno.EINVAL, "error": f"malformed request: {e!r}"}
    return {"ok": True, "mountpoint": ctl.mountpoint, **reply}


@command("stats")
async def _stats(ctl: Control, req: dict[str, Any], fds: list[int]) -> Reply:
    return {"ok": True, "stats": ctl.ops.stats_snapshot()}


@command("list")
async def _list(ctl: Control, req: dict[str, Any], fds: list[int]) -> Reply:
    return {"branches": describe(ctl.ops.union.stack), "readonly": ctl.ops.union.readonly}


@command("change")
async def _change(ctl: Control, req: dict[str, Any], fds: list[int]) -> Reply:
    """``{"changes": [{"op": add|del|mode, "fd": I, "path": P, "index": N|"bottom"|null, "mode": M}]}``,
    applied together or not at all."""
    changes = []
    for item in req["changes"]:
        fd = -1 if item.get("fd") is None else fds[int(item["fd"])]
        index = item.get("index")
        changes.append(Change(str(item["op"]), fd, str(item["path"]),
                              BOTTOM if index == "bottom" else None if index is None else int(index),
                              None if item.get("mode") is None else str(item["mode"])))
    # What the given directories are, looked at on a worker thread: one on this very mount would
    # otherwise wait for an answer only this thread can give.
    known, here = await trio.to_thread.run_sync(_look_at, [c.fd for c in changes if c.fd >= 0],
                                                ctl.mountpoint)
    for c in changes:
        if c.fd >= 0:
            c.ident, c.above = known[c.fd]
            if c.op == "add" and c.ident[0] == here:
                raise BranchError(errno.EINVAL, f"{c.path} is on this union itself")
    union = ctl.ops.union
    with trio.move_on_after(BUSY_WAIT):
        while copy_ups_running(union):
            await trio.sleep(0.005)
    union.table.next_request()
    began = time.perf_counter()
    slots = plan(union.stack, changes, overlay=ctl.style == "overlay")
    check_busy(union, slots)
    stale = apply(union, slots)
    for node_id in stale.rebound:
        compat.no_capability(node_id, False)    # what the shim knew was of the node's old file
    applied = time.perf_counter()
    ctl.after_change()
    for i, fd in enumerate(fds):
        if any(c.op == "add" and c.fd == fd for c in changes):
            fds[i] = -1     # the union's now
    await trio.to_thread.run_sync(_invalidate, stale)
    log.info("branches now: %s (applied in %.1f ms, %d nodes; the kernel told in %.1f ms)",
             ", ".join(f"{b['path']}={b['mode']}" for b in describe(union.stack)), (applied - began) * 1e3,
             len(stale.dirs) + len(stale.rebound) + len(stale.files), (time.perf_counter() - applied) * 1e3)
    return {"branches": describe(union.stack), "readonly": union.readonly}


def _look_at(fds: list[int], mountpoint: str
             ) -> tuple[dict[int, tuple[tuple[int, int], set[tuple[int, int]]]], int]:
    """Each fd's identity and its ancestors', and the mount's own device (-1 if not to be had)."""
    out = {fd: (identity(fd), ancestors(fd)) for fd in fds}
    try:
        return out, os.stat(mountpoint).st_dev
    except OSError:
        return out, -1


def _invalidate(stale: Stale) -> None:
    """Tell the kernel (from a worker thread: a notification may wait for the loop) what went stale."""
    for parent, name in stale.entries:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry(parent, name)
    for ids, attr_only in ((stale.dirs, False), (stale.rebound, False), (stale.files, True)):
        for node_id in ids:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(node_id, attr_only=attr_only)
