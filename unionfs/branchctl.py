"""The client of a mount's control channel (`unionfs.server.control`): `unionfs branch ...` and the
AUFS spellings of `unionfs remount -o add:...,del:...,mod:...`.

The daemon is found from the mount point: the socket ``<key>.ctl`` in this user's state directory
(for another user's mount, in that user's: its daemon answers only that user and root), else the
abstract name a daemon with no state directory listens on.  The peer must run as us, root, or the
mount's user (``SO_PEERCRED``), and must say it serves this mount point.  Every directory named is
opened here, in the caller's namespaces, and passed as an fd.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from typing import Any

from unionfs.core import mountinfo
from unionfs.core.errors import QuietError
from unionfs.server import statedir
from unionfs.server.statedir import CONTROL_MAX as MAX_MESSAGE
from unionfs.server.statedir import CONTROL_SUFFIX as SUFFIX
from unionfs.server.statedir import control_abstract as abstract_name

#: The remount options that change branches, as AUFS spells them (ins: is AUFS's add:).
AUFS_WORDS = ("add", "ins", "del", "mod", "append", "prepend")
TIMEOUT = 60.0


FSTYPES = ("fuse.unionfs", "fuse.unionfs-overlay")


def union_mount(mountpoint: str) -> tuple[str, mountinfo.Mount]:
    """(real path, mount) of the unionfs mount at *mountpoint*; QuietError if it is none."""
    point = os.path.realpath(mountpoint)
    found = mountinfo.mount_at(point)
    if found is None:
        raise QuietError(f"{mountpoint!r} is not a mount point")
    if found.fstype not in FSTYPES:
        raise QuietError(f"{mountpoint!r} is a {found.fstype} mount, not unionfs")
    return point, found


def _owner(m: mountinfo.Mount) -> int | None:
    match = re.search(r"(?:^|,)user_id=(\d+)(?:,|$)", m.super_options)
    return int(match.group(1)) if match else None


def _addresses(point: str, owner: int | None) -> Iterator[str]:
    key = statedir.key_for(point, resolved=True)
    yield os.path.join(statedir.state_dir(), key + SUFFIX)
    if owner not in (None, 0, os.geteuid()):     # another user's mount: its daemon says if we may
        yield os.path.join(f"/run/user/{owner}/unionfs", key + SUFFIX)
        yield os.path.join(f"/tmp/unionfs-{owner}", key + SUFFIX)
    for uid in dict.fromkeys((os.geteuid(), *(() if owner is None else (owner,)))):
        yield abstract_name(uid, key)


def request(mountpoint: str, req: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
    """Send *req* (with *fds*) to the daemon of *mountpoint*; its reply, or QuietError with its one line."""
    point, found = union_mount(mountpoint)
    owner = _owner(found)
    trusted = {os.geteuid(), 0, *(() if owner is None else (owner,))}
    for address in _addresses(point, owner):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(TIMEOUT)
            try:
                sock.connect(address)
            except OSError:
                continue
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            uid = int.from_bytes(creds[4:8], sys.byteorder)
            if uid not in trusted:
                continue
            socket.send_fds(sock, [json.dumps(req).encode()], fds or [])
            data = sock.recv(MAX_MESSAGE)
        except TimeoutError:
            raise QuietError(f"the daemon of {mountpoint!r} did not answer in {TIMEOUT:.0f}s") from None
        except (ConnectionResetError, BrokenPipeError):
            data = b""      # closed on us without an answer: a refusal
        except OSError as e:
            raise QuietError(f"talking to the daemon of {mountpoint!r}: {e.strerror}") from None
        finally:
            sock.close()
        if not data:
            raise QuietError(f"the daemon of {mountpoint!r} refused the request (only its owner or root "
                             "may change a mount)")
        reply: dict[str, Any] = json.loads(data)
        if reply.get("ok") and reply.get("mountpoint") not in (point, None):
            continue    # a daemon of another mount point under the same key: not ours
        if not reply.get("ok"):
            raise QuietError(f"{mountpoint}: {reply.get('error')}")
        return reply
    raise QuietError(f"no control channel for {mountpoint!r}: its daemon cannot be reached from here "
                     "(mounted by another user, in other namespaces, or by an older unionfs)")


def list_branches(mountpoint: str) -> dict[str, Any]:
    return request(mountpoint, {"cmd": "list"})


def format_list(reply: dict[str, Any]) -> str:
    lines = [f"{b['index']}\t{b['mode']}\t{b['path']}" for b in reply["branches"]]
    return "\n".join(lines)


def change(mountpoint: str, changes: list[tuple[str, str, int | str | None, str | None]]) -> dict[str, Any]:
    """Apply (op, dir, index, mode) changes together: every dir opened here and sent as an fd."""
    fds: list[int] = []
    items: list[dict[str, Any]] = []
    try:
        for op, path, index, mode in changes:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError as e:
                if op == "add":
                    raise QuietError(f"{path}: {e.strerror}") from None
                at: int | None = None   # a branch whose directory is gone: named by its path
            except OSError as e:
                raise QuietError(f"{path}: {e.strerror}") from None
            else:
                fds.append(fd)
                at = len(fds) - 1
            items.append({"op": op, "fd": at, "path": os.path.abspath(path), "index": index, "mode": mode})
        _, found = union_mount(mountpoint)
        major, _, minor = found.dev.partition(":")
        mnt_dev = os.makedev(int(major), int(minor))    # (a stat of it may be refused to root)
        for (op, path, _, _), item in zip(changes, items, strict=True):
            if op == "add" and os.fstat(fds[item["fd"]]).st_dev == mnt_dev:
                raise QuietError(f"{path} is on the union {mountpoint} itself")
        return request(mountpoint, {"cmd": "change", "changes": items}, fds)
    finally:
        for fd in fds:
            os.close(fd)


def aufs_changes(words: list[str]) -> list[tuple[str, str, int | str | None, str | None]]:
    """AUFS's remount words (add:INDEX:DIR[=MODE], ins:..., del:DIR, mod:DIR=MODE, append:DIR[=MODE],
    prepend:DIR[=MODE]) as changes; QuietError on one that does not parse."""
    out: list[tuple[str, str, int | str | None, str | None]] = []
    for word in words:
        kind, _, rest = word.partition(":")
        if kind not in AUFS_WORDS:
            continue
        if kind in ("add", "ins"):
            idx, sep, spec = rest.partition(":")
            if not sep or not idx.isdigit():
                raise QuietError(f"bad option {word!r}: add:INDEX:DIR[=MODE]")
            path, mode = _dir_mode(spec)
            out.append(("add", path, int(idx), mode))
        elif kind == "del":
            out.append(("del", rest, None, None))
        elif kind == "mod":
            path, mode = _dir_mode(rest)
            if mode is None:
                raise QuietError(f"bad option {word!r}: mod:DIR=MODE")
            out.append(("mode", path, None, mode))
        else:
            path, mode = _dir_mode(rest)
            out.append(("add", path, "bottom" if kind == "append" else 0, mode))
        if not out[-1][1]:
            raise QuietError(f"bad option {word!r}: no directory")
    return out


def _dir_mode(spec: str) -> tuple[str, str | None]:
    path, sep, mode = spec.rpartition("=")
    if sep and mode.split("+")[0] in ("rw", "ro", "rr"):   # AUFS's +wh and friends: not ours
        return path, mode.split("+")[0]
    return spec, None
