"""Redirects: merged directories renamed in place, as overlayfs's ``redirect_dir`` records them.

With ``-o redirect_dir=on`` a directory that has content in a lower branch is renamed in the
writable branch alone: its upper directory gets a *redirect*, the path at which its lower content
is to be found, and a whiteout stays at the old name.  The on-disk form is overlayfs's own:

- overlay dialect: the xattr ``trusted.overlay.redirect`` (``user.overlay.redirect`` when the
  daemon cannot write trusted.*, as unprivileged overlayfs) on the upper directory;
- AUFS dialect: a symlink ``.wh..wh..redirect`` inside the upper directory whose target is the
  redirect (bookkeeping: never shown, removed with the directory's other markers).

The value is overlayfs's: the directory's old name when it stays in the same parent (relative),
else its old path from the union's root (absolute, starting with ``/``), built from the names and
redirects of its ancestors as ``ovl_get_redirect`` does; a redirect already there is kept unless
an absolute one is needed.  Both forms are read in every branch.

A lookup follows redirects as ``ovl_lookup`` does, branch by branch from the top: the name looked
up in each lower branch is the directory's name, replaced by a relative redirect met above, or an
absolute path from the branch's root once an absolute redirect was met (the redirects of the
directories along that path apply as they are met).  A whiteout or a non-directory stops the
stack, an opaque directory stops it after itself, a missing name skips the branch.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from .branches import DirFd
from .nodes import ROOT_ID, Node, NodeTable
from .whiteout import WH_PREFIX, Dialect, WhiteoutWriter, dir_is_opaque

REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
WH_REDIRECT = b".wh..wh..redirect"
#: overlayfs's default ``redirect_max``: a longer redirect makes the rename fail with EXDEV.
REDIRECT_MAX = 256
#: A branch directory's path from its branch's root, when it is not its union directory's name
#: in its parent's directory of that branch (see `dirfds.BranchDir.route`).
Route = tuple[bytes, ...]


def read_redirect(fd: DirFd) -> bytes | None:
    """The redirect of the branch directory *fd* in any dialect, None when it has none; EIO for
    one overlayfs would refuse (a relative one with a ``/``, an absolute one with an empty name)."""
    value: bytes | None = None
    for attr in REDIRECT_XATTRS:
        try:
            value = os.getxattr(fd, attr)
            break
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.EPERM):
                raise
    if value is None:
        try:
            value = fd.readlink(WH_REDIRECT)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise
            return None
    if not value or (b"/" in value if value[:1] != b"/" else b"" in value[1:].split(b"/")):
        raise OSError(errno.EIO, "invalid redirect", os.fsdecode(value))
    return value


class Redirects:
    """The mount's ``redirect_dir`` setting and what it does to lookups and renames.

    *mode*: ``on`` (made and followed), ``follow``, ``nofollow`` (a redirect met where a lower
    branch would be searched is refused with EPERM, as overlayfs does) or ``off`` (none made,
    none read: lookups by name, as before redirects existed here).
    """

    def __init__(self, mode: str, table: NodeTable, writer: WhiteoutWriter) -> None:
        self.mode = mode
        self.table = table
        self.writer = writer
        self.active = mode in ("on", "follow", "nofollow")    # lookups read redirects
        self.create = mode == "on"

    # ------------------------------------------------------------------ lookup

    def open_stack(self, parent: Node, name: bytes, top: int
                   ) -> tuple[list[tuple[int, DirFd, Route | None]], bytes | None]:
        """The branch directories of the directory *name* of *parent*, whose topmost is in branch
        *top*: ((layer, fd, route), ...) top first, and the redirect of its upper directory.
        The caller owns the fds."""
        out: list[tuple[int, DirFd, Route | None]] = []
        table = self.table
        layers = [layer for layer in table.stack.layers if layer.index >= top]
        own: bytes | None = None
        cur = name              # what is looked up in the parent's directory of each branch
        path: list[bytes] | None = None     # once an absolute redirect was met: from each root
        try:
            for i, layer in enumerate(layers):
                last = i == len(layers) - 1
                if path is None:
                    pfd = table.dirfd_or_none(parent, layer.index)
                    if pfd is None:
                        continue
                    fd, stop = _open_one(pfd, cur)
                    route: Route | None = None if cur == name else (*path_in(table, parent, layer.index), cur)
                else:
                    # (stop: an opaque directory on the way, unless the one found has an absolute redirect)
                    route = tuple(path)
                    fd, stop, path = self._walk(layer.fd, path)
                if fd is None:
                    if stop:
                        break
                    continue
                out.append((layer.index, fd, route))
                if last or dir_is_opaque(fd):
                    break
                red = read_redirect(fd)
                if red is not None:
                    if layer.index == 0:
                        own = red
                    if self.mode == "nofollow":
                        raise OSError(errno.EPERM, "refusing to follow a redirect (redirect_dir=nofollow)",
                                      os.fsdecode(name))
                    if red.startswith(b"/"):
                        path, stop = red[1:].split(b"/"), False
                    elif path is None:
                        cur = red
                    else:
                        path[-1] = red
                if stop:
                    break
        except BaseException:
            for _, fd, _ in out:
                os.close(fd)
            raise
        return out, own

    def _walk(self, root: DirFd, path: list[bytes]) -> tuple[DirFd | None, bool, list[bytes]]:
        """Look the absolute *path* up in one branch from its *root*: (the directory or None,
        whether the branches below are cut off, the path for those below).  The redirects of the
        directories passed apply to the path from then on, as in ``ovl_lookup_layer``."""
        base: DirFd = root
        stop = False
        i = 0
        try:
            while i < len(path):
                comp = path[i]
                last = i == len(path) - 1
                try:
                    fd = base.open_dir(comp)
                except FileNotFoundError:
                    return None, stop or base.exists(WH_PREFIX + comp), path
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):   # a whiteout or a non-directory
                        return None, True, path
                    raise
                if base is not root:
                    os.close(base)
                base = fd
                if not last:
                    if dir_is_opaque(fd):
                        stop = True
                    else:
                        red = read_redirect(fd)
                        if red is not None and red.startswith(b"/"):
                            stop = False
                            new = red[1:].split(b"/")
                            path = [*new, *path[i + 1:]]
                            i = len(new) - 1
                        elif red is not None:
                            path = [*path[:i], red, *path[i + 1:]]
                i += 1
        except BaseException:
            if base is not root:
                os.close(base)
            raise
        return (None if base is root else base), stop, path

    # ------------------------------------------------------------------ rename

    def before_move(self, node: Node, same_parent: bool) -> None:
        """*node*, a directory with content below now copied up, is about to move: give its upper
        directory the redirect overlayfs would (EXDEV where overlayfs falls back to a copy), and
        pin its lower branch directories to where they are (their routes)."""
        absolute = not same_parent
        cur = node.redirect
        if cur is None or (absolute and not cur.startswith(b"/")):
            value = self._redirect_for(node, absolute)
            fd = self.table.dirfd(node, 0)
            try:
                self._write(fd, value)
            except OSError as e:
                raise OSError(errno.EXDEV, f"cannot set redirect: {e.strerror}", os.fsdecode(value)) from None
            node.redirect = value
        for bd in node.dirs:
            if bd.layer != 0 and bd.route is None:
                bd.route = path_in(self.table, node, bd.layer)

    def _redirect_for(self, node: Node, absolute: bool) -> bytes:
        """``ovl_get_redirect``: the name, or the path from the root through the ancestors' own
        redirects (an absolute one ends the walk)."""
        if not absolute:
            return node.name_in()[1]
        parent, name = node.name_in()
        value = path_through_redirects(parent, node.redirect or name)
        if len(value) > REDIRECT_MAX:
            raise OSError(errno.EXDEV, "redirect too long", os.fsdecode(value))
        return value

    def _write(self, fd: DirFd, value: bytes) -> None:
        """Write the redirect *value* on the upper directory *fd* in the mount's dialect."""
        if self.writer.dialect is Dialect.OVERLAY:
            attr = "trusted.overlay.redirect" if self.writer.opaque_xattr.startswith("trusted.") \
                else "user.overlay.redirect"
            for name in dict.fromkeys((attr, "user.overlay.redirect")):
                try:
                    os.setxattr(fd, name, value)
                    return
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                        raise
        st = os.fstat(fd)
        try:
            fd.unlink(WH_REDIRECT)
        except FileNotFoundError:
            pass
        fd.symlink(value, WH_REDIRECT)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))   # bookkeeping: the times stay


def _open_one(pfd: DirFd, name: bytes) -> tuple[DirFd | None, bool]:
    """The directory *name* in the branch directory *pfd*: (fd or None, whether the branches below
    are cut off: a whiteout, in either dialect, or a non-directory)."""
    try:
        return pfd.open_dir(name), False
    except FileNotFoundError:
        return None, len(name) <= 255 - len(WH_PREFIX) and pfd.exists(WH_PREFIX + name)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            return None, True
        raise


def path_through_redirects(parent: Node, leaf: bytes) -> bytes:
    """``ovl_get_redirect``: the path from the root of *leaf* (a name, or a redirect of its own) in
    *parent*, through the ancestors' own redirects, an absolute one ending the walk.  Used for a
    moved directory and for a moved metadata-only copy alike."""
    parts = [leaf]
    if not leaf.startswith(b"/"):
        for n, name in _up(parent):
            part = n.redirect or name
            parts.append(part)
            if part.startswith(b"/"):
                break
    value = b"/".join(reversed(parts))
    return value if value.startswith(b"/") else b"/" + value


def _up(node: Node) -> Iterator[tuple[Node, bytes]]:
    """(node, its name) from *node* up to, not including, the root."""
    while node.id != ROOT_ID:
        parent, name = node.name_in()
        yield node, name
        node = parent


def path_in(table: NodeTable, node: Node, layer: int) -> Route:
    """The path from branch *layer*'s root of directory *node*'s directory there: its names up to
    the first ancestor (or itself) whose directory there has a route."""
    parts: list[bytes] = []
    for n, name in _up(node):
        bd = n.branch_dir(layer)
        if bd is not None and bd.route is not None:
            return (*bd.route, *reversed(parts))
        parts.append(name)
    return tuple(reversed(parts))

