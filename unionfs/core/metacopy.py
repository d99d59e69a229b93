"""Metadata-only copy-up (``-o metacopy=on``), in overlayfs's own on-disk form.

A chmod, chown, utimes or xattr change of a lower regular file copies its metadata only: the copy
in the writable branch is sparse, of the same size, and carries the xattr ``trusted.overlay.metacopy``
(empty; ``user.overlay.metacopy`` from a daemon without CAP_SYS_ADMIN, as the opaque marker); its
data stays below and reads come from there.  The first open for writing, truncate or O_TRUNC
copies the data into the upper file in place and removes the xattr, as overlayfs's
``ovl_copy_up_meta_inode_data`` does (the upper's mtime then moves to now, as there); st_blocks
shows the data file's until then, as ``ovl_getattr`` does.

The data is found as overlayfs finds it: by the file's name among the lower branches of its parent
directory, the topmost that has it, passing over metacopy files there (a lower branch that was
once an upper), or where the file's ``redirect`` xattr points (overlayfs writes one when it
renames or links a metacopy file: a name in the same directory, or a path from the root).
unionfs itself copies the data up before a rename or a link of a metacopy file, so it writes no
redirect.  ``trusted.overlay.origin`` is not written: overlayfs finds the data by name without it.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .branches import DirFd, copy_data
from .copyup import INLINE_COPY_MAX
from .redirect import path_through_redirects

if TYPE_CHECKING:
    from .branches import LayerStack
    from .interfaces import Executor, Invalidator
    from .nodes import Node, NodeTable


class Resolver(Protocol):
    """What this module needs of the union's resolver (`unionfs.core.resolve.Resolver`, which calls
    it): named here, so that the two do not import each other."""

    stack: LayerStack
    table: NodeTable
    executor: Executor
    invalidator: Invalidator
    privileged: bool

    def touch(self, *nodes: Node | None) -> None: ...
    def open_handles(self, node: Node) -> list[Any]: ...
    def refresh(self, h: Any) -> None: ...
    def xattr_target(self, node: Node, fn: Callable[[str | int], object]) -> object: ...
    def xattr_names(self, node: Node) -> frozenset[bytes]: ...
    def data_layer(self, node: Node) -> int: ...

#: The xattrs that mark a metadata-only copy (overlayfs as root, and with userxattr).
METACOPY_XATTRS = (b"trusted.overlay.metacopy", b"user.overlay.metacopy")
REDIRECT_XATTRS = (b"trusted.overlay.redirect", b"user.overlay.redirect")


def meta_xattr(privileged: bool) -> str:
    """The xattr this daemon writes on a metadata-only copy."""
    return os.fsdecode(METACOPY_XATTRS[0 if privileged else 1])


def _redirect(res: Resolver, node: Node, names: frozenset[bytes]) -> bytes | None:
    for attr in REDIRECT_XATTRS:
        if attr in names:
            value = res.xattr_target(node, functools.partial(_getxattr, attr=attr))
            assert isinstance(value, bytes)
            return value
    return None


def _getxattr(target: str | int, attr: bytes) -> bytes:
    return os.getxattr(target, attr)


def _is_metacopy(names: frozenset[bytes] | list[str]) -> bool:
    return any(attr in names or os.fsdecode(attr) in names for attr in METACOPY_XATTRS)


@contextlib.contextmanager
def located(res: Resolver, node: Node, mode: int) -> Iterator[tuple[int, DirFd, bytes] | None]:
    """Where the data of *node* (of file type *mode*) is: (branch, directory fd, name) for a
    metacopy file, None when its own object holds it.  The fd is valid inside the block only.

    EIO when it is a metacopy file whose data is nowhere below, as overlayfs answers."""
    names = res.xattr_names(node) if stat.S_ISREG(mode) and node.links else frozenset()
    if not _is_metacopy(names):
        yield None
        return
    parent, name = node.name_in()
    target = _redirect(res, node, names)
    with contextlib.ExitStack() as opened:
        dirs: list[tuple[int, DirFd]]
        if target is None or b"/" not in target:
            name = name if target is None else target
            dirs = [(bd.layer, res.table.dirfd(parent, bd.layer)) for bd in parent.dirs]
        else:
            *path, name = target.strip(b"/").split(b"/")
            dirs = [(layer, opened.enter_context(_closing(fd))) for layer, fd in _walk(res, path)]
        for layer, dfd in dirs:
            if layer <= node.layer:
                continue
            try:
                st = dfd.lstat(name)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                break   # a whiteout or another type: nothing below shows through
            if _is_metacopy(dfd.on_path(name, os.listxattr)):
                continue    # a metadata-only copy in a lower branch: its data is further down
            yield layer, dfd, name
            return
    raise OSError(errno.EIO, "metacopy file without its data below", os.fsdecode(name))


def data_layer(res: Resolver, node: Node, mode: int) -> int:
    """The branch holding the data of *node*: 0 when its own object holds it (see `located`)."""
    with located(res, node, mode) as where:
        return 0 if where is None else where[0]


def open_data(res: Resolver, node: Node, flags: int) -> int:
    """The data of the metacopy file *node*, opened with *flags*."""
    with located(res, node, stat.S_IFREG) as where:
        if where is None:
            raise OSError(errno.EIO, "metacopy file lost its mark", str(node.id))
        return where[1].open_file(where[2], flags)


def data_blocks(res: Resolver, node: Node) -> int:
    """st_blocks of the data of the metacopy file *node*."""
    with located(res, node, stat.S_IFREG) as where:
        if where is None:
            raise OSError(errno.EIO, "metacopy file lost its mark", str(node.id))
        return where[1].lstat(where[2]).st_blocks


def set_move_redirect(res: Resolver, node: Node, parent: Node, name: bytes, samedir: bool,
                      absolute: bool = False) -> None:
    """Before the metacopy file *node* (in the writable branch) leaves *name* in *parent*, write
    the ``redirect`` that keeps its data found, as overlayfs does: the old name for a move in the
    same directory, else the path from the root (kept when it has one already; *absolute* for a
    link)."""
    if res.data_layer(node) in (0, node.layer):
        return
    old = _redirect(res, node, res.xattr_names(node))
    if old is not None and ((samedir and not absolute) or old.startswith(b"/")):
        return
    here = old if old is not None else name
    value = here if samedir and not absolute else path_through_redirects(parent, here)
    attr = REDIRECT_XATTRS[0 if res.privileged else 1]
    res.xattr_target(node, functools.partial(_setxattr, attr=attr, value=value))
    node.xattrs = None


def _setxattr(target: str | int, attr: bytes, value: bytes) -> None:
    os.setxattr(target, attr, value)


def _walk(res: Resolver, parts: list[bytes]) -> Iterator[tuple[int, DirFd]]:
    """(layer, new fd) of the directory at *parts* from the root of each lower branch that has it."""
    for layer in res.stack.layers:
        cur = layer.fd
        try:
            for part in parts:
                nxt = cur.open_dir(part)
                if cur is not layer.fd:
                    os.close(cur)
                cur = nxt
        except OSError:
            if cur is not layer.fd:
                os.close(cur)
            continue
        if cur is layer.fd:
            cur = DirFd(os.dup(cur))
        yield layer.index, cur


@contextlib.contextmanager
def _closing(fd: DirFd) -> Iterator[DirFd]:
    try:
        yield fd
    finally:
        os.close(fd)


async def copy_data_up(res: Resolver, node: Node, keep: int | None) -> None:
    """Copy the data of the metacopy file *node* (in the writable branch) into it, in place, and
    remove the metacopy mark; *keep* bounds the bytes copied (a truncate follows)."""
    parent, name = node.name_in()
    src = open_data(res, node, os.O_RDONLY)
    try:
        dst = res.table.dirfd(parent, 0).open_file(name, os.O_WRONLY)
        try:
            size = os.fstat(dst).st_size
            length = size if keep is None else min(keep, size)
            if length > INLINE_COPY_MAX:
                await res.executor.run(copy_data, src, dst, length)
            elif length:
                copy_data(src, dst, length)
            for attr in METACOPY_XATTRS:
                try:
                    os.removexattr(dst, attr)
                except OSError as e:
                    if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                        raise
        finally:
            os.close(dst)
    finally:
        os.close(src)
    node.lowerdata = 0
    node.xattrs = None
    res.touch(node)
    for h in res.open_handles(node):
        res.refresh(h)
    res.invalidator.invalidate_attr(node.id)
