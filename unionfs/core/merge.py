"""Resolve names through the branch stack: merged directory listings and the layers of a directory.

A merged listing maps each visible name of a directory to an `Entry`: the topmost branch that has
it, whether it is a directory, the branches whose directory of that name merge into it, and whether
any branch below the writable top still has the name (so that removing it needs a whiteout).
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Iterable

from .branches import DirFd
from .whiteout import WH_META_PREFIX, WH_OPQ, WH_PREFIX, dir_is_opaque, is_whiteout_stat

log = logging.getLogger(__name__)


class Entry:
    """One visible name in a merged directory."""

    __slots__ = ("layer", "is_dir", "dir_layers", "has_lower")

    def __init__(self, layer: int, is_dir: bool, has_lower: bool) -> None:
        self.layer = layer              # topmost branch holding the name
        self.is_dir = is_dir
        self.dir_layers: tuple[int, ...] = (layer,) if is_dir else ()  # branches merged into this directory
        self.has_lower = has_lower      # a branch below the top (index > 0) has the name, not whited out

    def __repr__(self) -> str:
        return f"Entry(layer={self.layer}, dir={self.is_dir}, dirs={self.dir_layers}, lower={self.has_lower})"


def scan_layer(fd: int) -> tuple[list[tuple[bytes, bool]], set[bytes], bool]:
    """Read one branch directory: (visible names with is-dir, names it whites out, opaque marker seen)."""
    if _scan_dir is None:
        return _scan_layer_py(fd)
    names, whiteouts, opaque = _scan_dir(fd, WH_PREFIX, WH_META_PREFIX, WH_OPQ)
    if whiteouts:
        names = [(n, d) for n, d in names if n not in whiteouts]   # as below
    return names, whiteouts, opaque


def _scan_layer_py(fd: int) -> tuple[list[tuple[bytes, bool]], set[bytes], bool]:
    """`scan_layer` in Python: what unionfs.core._native's scan_dir does in C, 4-6x as fast."""
    names: list[tuple[bytes, bool]] = []
    whiteouts: set[bytes] = set()
    opaque = False
    add = names.append
    # Every name of every branch passes here once per listing: the per-name work is kept to
    # method calls bound once (os.fsencode is str.encode with the filesystem's codec, in Python).
    with os.scandir(fd) as it:
        for de in it:
            name = _encode(de.name, _FS_ENCODING, _FS_ERRORS)
            if name.startswith(WH_PREFIX):
                if name.startswith(WH_META_PREFIX):
                    opaque = opaque or name == WH_OPQ
                else:
                    whiteouts.add(name[len(WH_PREFIX):])
                continue
            try:
                is_dir = de.is_dir(follow_symlinks=False)
                plain = is_dir or de.is_file(follow_symlinks=False)    # from d_type: no syscall
            except OSError:
                continue
            if not plain and _is_device_whiteout(de):
                whiteouts.add(name)
                continue
            add((name, is_dir))
    if whiteouts:
        # A branch holding both NAME and .wh.NAME (an AUFS delete cut short by a crash): the
        # whiteout wins, as in AUFS, so what was being deleted stays deleted.
        names = [(n, d) for n, d in names if n not in whiteouts]
    return names, whiteouts, opaque


_encode = str.encode
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()

_ScanDir = Callable[[int, bytes, bytes, bytes], tuple[list[tuple[bytes, bool]], set[bytes], bool]]
_scan_dir: _ScanDir | None
try:
    from ._native import scan_dir
    _scan_dir = scan_dir
except ImportError:     # not built: the same reading in Python
    _scan_dir = None


def _is_device_whiteout(de: os.DirEntry[str]) -> bool:
    """Whether a non-directory entry is a 0/0 character device (stat only for the rare kinds that
    d_type does not rule out)."""
    try:
        if de.is_file(follow_symlinks=False) or de.is_symlink():
            return False
        return is_whiteout_stat(de.stat(follow_symlinks=False))
    except OSError:
        return False


def build_listing(dirfds: Iterable[tuple[int, DirFd]]) -> dict[bytes, Entry]:
    """Merge the branch directories *dirfds* ((layer, fd), top first) into one listing.

    A higher branch wins; a non-directory stops the stack for its name; a whiteout in a branch hides
    the name in every branch below it.  *dirfds* already stops at an opaque directory.
    """
    entries: dict[bytes, Entry] = {}
    hidden: set[bytes] = set()      # whited out by some branch above the one being read
    closed: set[bytes] = set()      # names whose stack already stopped (non-directory seen)
    for layer, fd in dirfds:
        names, whiteouts, _opaque = scan_layer(fd)
        for name, is_dir in names:
            if name in hidden:
                continue
            e = entries.get(name)
            if e is None:
                entries[name] = Entry(layer, is_dir, layer > 0)
                if not is_dir:
                    closed.add(name)
                continue
            if layer > 0:
                e.has_lower = True
            if name in closed:
                continue
            if is_dir:
                e.dir_layers += (layer,)
            else:
                closed.add(name)
        hidden |= whiteouts
    return entries


def open_dir_layers(parent_fd: Callable[[int], DirFd | None], name: bytes, layers: tuple[int, ...]
                    ) -> list[tuple[int, DirFd]]:
    """Open the branch directories *name* in *layers* (top first) under the parent's fds
    (*parent_fd*(layer), None where the parent has no directory in that branch).

    Stops after an opaque one.  A branch whose entry is no longer a directory ends the stack.
    Returns (layer, fd) pairs; the caller owns the fds.
    """
    out: list[tuple[int, DirFd]] = []
    try:
        for i, layer in enumerate(layers):
            pfd = parent_fd(layer)
            if pfd is None:
                break
            try:
                fd = pfd.open_dir(name)
            except (FileNotFoundError, NotADirectoryError):
                break
            except OSError as e:
                if e.errno == errno.ELOOP:  # a symlink was swapped in; never follow it
                    break
                raise
            out.append((layer, fd))
            if i + 1 < len(layers) and dir_is_opaque(fd):
                break
    except BaseException:
        for _, fd in out:
            os.close(fd)
        raise
    return out
