"""Branch changes on a live union, as AUFS makes them: add, remove, or change the mode of a branch.

The caller hands each directory open (an fd it opened in its own namespaces): nothing here resolves
a path it was given.  A batch of changes is checked as a whole against the current stack (`plan`)
and then applied at once, between two requests (`apply`): the stack's list of branches is replaced
in place, every node the union knows is renumbered to the new list, and every name the union had
resolved is resolved again.  A name now served by another branch keeps its node when the object
there is of the same type (a directory always: its branch directories are the new ones; a file
named once and not open: it is rebound, as AUFS refreshes its inode), so that a request the kernel
already has on its way for the node serves the name's new object; any other name that changed (gone,
another type, a file open or with other names) loses its node, which the kernel is told to look
up again and which answers ENOENT while the name is gone, ESTALE once it shows an object again
(`Resolver.gone`).  Nodes the kernel keeps see their attributes,
directories their listings and rebound files their cached pages invalidated (`Stale`): one
notification per node known, one listing rebuilt per directory known.

Rules (AUFS's): removing a branch in which files are open, or replacing or demoting the writable
top while files are open for writing, is EBUSY; only the top may be writable, and a read-only top
makes the union read-only; an overlay-style mount (lowerdir=...) keeps its upper directory and
work directory (only lower branches change).  Nothing is written into any branch, but the hidden
work directory an AUFS-style writable top holds while it is the top (made and removed as at mount).
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from .branches import AUFS_WORK_NAME, DirFd, Layer, LayerStack, ancestors, aufs_work_dir, identity
from .merge import Entry, open_dir_layers
from .nodes import Node, superseded
from .resolve import Resolver

MODES = ("rw", "ro", "rr")
#: `Change.index` for the bottom of the stack (AUFS's append).
BOTTOM = -1


class BranchError(OSError):
    """A change refused, nothing changed: ``str()`` is one line for the user."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class Change:
    """One asked change.  *fd* is the caller's directory, open: for ``add`` the union keeps it
    (when the change is applied), for ``del`` and ``mode`` it only names the branch by identity
    (-1: the caller could not open it, and the branch is the one its path was given as)."""

    op: str                 # add, del, mode
    fd: int
    path: str               # how the caller named the directory (messages, listings)
    index: int | None = None    # add: 0 = top, BOTTOM = bottom, None = just below the top
    mode: str | None = None     # add: default ro; mode: the new mode
    ident: tuple[int, int] | None = None            # (st_dev, st_ino) of *fd*, if known already
    above: set[tuple[int, int]] | None = None       # its ancestors' (see `branches.ancestors`)


@dataclass
class Stale:
    """What the kernel may hold that a change made stale: directories (attributes and listings),
    files rebound to another object (attributes and cached pages), other nodes (attributes), and
    names (entries, negative ones included) under a parent."""

    dirs: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    rebound: list[int] = field(default_factory=list)
    entries: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class _Slot:
    """A branch of the stack being planned: an existing one (*layer*) or one added (*fd*)."""

    layer: Layer | None
    fd: int
    path: str
    mode: str
    ident: tuple[int, int]


def _fail(code: int, msg: str) -> BranchError:
    return BranchError(code, msg)


def describe(stack: LayerStack) -> list[dict[str, object]]:
    """The branches, top first: index, path (as given at mount or change), mode."""
    return [{"index": la.index, "path": la.path, "mode": la.mode} for la in stack.layers]


def plan(stack: LayerStack, changes: list[Change], overlay: bool) -> list[_Slot]:
    """The new stack, top first, after *changes* in order; BranchError (nothing changed) if any is
    refused."""
    slots = [_Slot(la, la.fd, la.path, la.mode, identity(la.fd)) for la in stack.layers]
    above: dict[tuple[int, int], set[tuple[int, int]]] = {}

    def ancestors_of(s: _Slot) -> set[tuple[int, int]]:
        got = above.get(s.ident)
        if got is None:
            got = above[s.ident] = ancestors(s.fd)
        return got

    def find(c: Change) -> int:
        if c.fd < 0:    # a directory the caller cannot open (gone): by the path it was given as
            for i, s in enumerate(slots):
                if s.path == c.path:
                    return i
            raise _fail(errno.ENOENT, f"{c.path} is not a branch of this union")
        ident = c.ident or identity(c.fd)
        for i, s in enumerate(slots):
            if s.ident == ident:
                return i
        raise _fail(errno.ENOENT, f"{c.path} is not a branch of this union")

    for c in changes:
        if c.fd < 0 and c.op == "add":
            raise _fail(errno.EBADF, f"{c.path}: no directory given")
        if c.mode is not None and c.mode not in MODES:
            raise _fail(errno.EINVAL, f"unknown branch mode {c.mode!r} (rw, ro or rr)")
        if c.op == "add":
            new = _Slot(None, c.fd, c.path, c.mode or "ro", c.ident or identity(c.fd))
            if c.above is not None:
                above[new.ident] = c.above
            for i, s in enumerate(slots):
                if s.ident == new.ident:
                    raise _fail(errno.EEXIST, f"{c.path} is a branch already (index {i}: {s.path})")
            mine = ancestors_of(new)
            for s in slots:
                if s.ident in mine:
                    raise _fail(errno.EINVAL, f"{c.path} is inside the branch {s.path}")
                if new.ident in ancestors_of(s):
                    raise _fail(errno.EINVAL, f"the branch {s.path} is inside {c.path}")
            at = min(1, len(slots)) if c.index is None else len(slots) if c.index == BOTTOM else c.index
            if not 0 <= at <= len(slots):
                raise _fail(errno.EINVAL, f"index {c.index} is out of range (0 to {len(slots)})")
            slots.insert(at, new)
        elif c.op == "del":
            i = find(c)
            if len(slots) == 1:
                raise _fail(errno.EINVAL, f"{c.path} is the last branch: a union needs one")
            del slots[i]
        elif c.op == "mode":
            if c.mode is None:
                raise _fail(errno.EINVAL, "no mode given (rw, ro or rr)")
            slots[find(c)].mode = c.mode
        else:
            raise _fail(errno.EINVAL, f"unknown change {c.op!r}")
    for i, s in enumerate(slots):
        if s.mode == "rw" and i != 0:
            raise _fail(errno.EINVAL, f"only the top branch may be rw, not {s.path} (index {i}): "
                        "make it ro first, or add the new branch below it")
    if overlay:
        upper = stack.upper
        top = slots[0]
        if (upper is not None and (top.layer is not upper or top.mode != "rw")) or \
                (upper is None and top.mode == "rw"):
            raise _fail(errno.EINVAL, "an overlay-style mount (lowerdir=...) may change only its "
                        "lower branches, not its upper directory")
    return slots


def check_busy(union: Resolver, slots: list[_Slot]) -> None:
    """EBUSY when the plan removes a branch with open files, or replaces or demotes the writable
    top while files are open for writing (or a copy-up is under way)."""
    stack = union.stack
    kept = {id(s.layer) for s in slots if s.layer is not None}
    for la in stack.layers:
        if id(la) not in kept and any(h.layer == la.index or h.node.layer == la.index
                                      for h in union.handles.values()):
            raise _fail(errno.EBUSY, f"the branch {la.path} has open files")
    if top_changes(stack, slots):
        if any(h.flags & os.O_ACCMODE != os.O_RDONLY for h in union.handles.values()):
            raise _fail(errno.EBUSY, f"the writable top {stack.layers[0].path} has files open for writing")
        if copy_ups_running(union):
            raise _fail(errno.EBUSY, "a copy-up is under way")


def top_changes(stack: LayerStack, slots: list[_Slot]) -> bool:
    """Whether the plan replaces or demotes the writable top (or makes a branch the writable top)."""
    upper = stack.upper
    new_upper = slots[0].layer if slots[0].mode == "rw" else None
    return upper is not new_upper or (upper is None and slots[0].mode == "rw")


def copy_ups_running(union: Resolver) -> bool:
    return any(getattr(n.lock, "locked", _never)() for n in union.table.nodes.values() if n.lock is not None)


def _never() -> bool:
    return False


def apply(union: Resolver, slots: list[_Slot]) -> Stale:
    """Swap the planned stack in (see the module docstring); the union then owns the added fds.
    Call `check_busy` first, with no await in between."""
    stack = union.stack
    table = union.table
    old_upper = stack.upper
    new_top = top_changes(stack, slots)
    work = None
    if new_top and slots[0].mode == "rw":
        # Made before anything changes: a top where it cannot be made is refused.
        try:
            work = aufs_work_dir(DirFd(slots[0].fd))
        except OSError as e:
            raise _fail(e.errno or errno.EIO, f"cannot make the work directory in {slots[0].path}: "
                        f"{e.strerror}") from None
    kept = {id(s.layer) for s in slots if s.layer is not None}
    removed = [la for la in stack.layers if id(la) not in kept]
    # Directories with a directory in a branch that goes: their visible names may change.
    touched = {n.id for n in table.nodes.values() if n.is_dir
               and any(bd.layer in {la.index for la in removed} for bd in n.dirs)}
    remap: dict[int, int] = {}
    added: set[int] = set()
    layers: list[Layer] = []
    for i, s in enumerate(slots):
        la = s.layer
        if la is None:
            la = Layer(i, s.path, DirFd(s.fd), False, os.fstat(s.fd).st_dev)
            added.add(i)
        else:
            remap[la.index] = i
            la.index = i
        la.writable, la.rr = s.mode == "rw", s.mode == "rr"
        stack.fs_index(la.dev)
        layers.append(la)
    if old_upper is not None and new_top:
        stack.drop_work()   # the old top's, removed from it while it is still layers[0]
    stack.layers[:] = layers
    table.fds.roots = {la.index: la.fd for la in layers}     # where moved directories' routes start
    if work is not None:
        stack.work_fd, stack.remove_work = work, AUFS_WORK_NAME
    _renumber(union, remap)
    root = table.root
    table.close_dirs(root, keep=0)
    root.dirs = [table.fds.fixed(root, la.index, la.fd) for la in layers]
    top_id = identity(layers[0].fd)
    if root.key != top_id:
        table.rekey(root, top_id)
        root.ino = table.ino_for(os.fstat(layers[0].fd))
    for la in removed:
        os.close(la.fd)
    union.readonly = stack.upper is None
    union.work_fd = union.writer.work_fd = union.copyup.work_fd = stack.work_fd
    stale = Stale()
    _resolve_again(union, stale, touched, added)
    rebound = set(stale.rebound)
    for n in table.nodes.values():
        if n.is_dir:
            stale.dirs.append(n.id)
        elif n.id not in rebound:
            stale.files.append(n.id)
    return stale


def _renumber(union: Resolver, remap: dict[int, int]) -> None:
    """Give every node, branch directory and open file its branch's new index; forget what was
    cached of the old stack (stats, xattr names, listings)."""
    table = union.table
    for node in table.nodes.values():
        node.st = None
        node.xattrs = None
        node.lowerdata = None   # -o metacopy: the branch holding the data, by index: looked up again
        if node.listing is not None:
            node.listing = None
            table.listings.drop(node)
        if node.is_dir:
            if node is table.root:
                continue
            keep = []
            for bd in node.dirs:
                new = remap.get(bd.layer)
                if new is None:
                    table.fds.close(bd)
                else:
                    bd.layer = new
                    keep.append(bd)
            node.dirs = keep
            node.layer = keep[0].layer if keep else -1
        else:
            node.layer = remap.get(node.layer, -1)
    for h in union.handles.values():
        h.layer = remap.get(h.layer, -1)


def _resolve_again(union: Resolver, stale: Stale, touched: set[int], added: set[int]) -> None:
    """Resolve every name the union knows again, parents first; names that changed lose their node
    (and go in *stale*), as do names newly visible in a directory a changed branch reaches."""
    table = union.table
    todo = [table.root]
    while todo:
        parent = todo.pop()
        try:
            listing = union.listing(parent)
        except OSError:
            listing = {}
        for name, child in list(parent.children.items()):
            if _still(union, parent, name, child, listing):
                if child.is_dir:
                    todo.append(child)
                continue
            if _rebind(union, parent, name, child, listing):
                stale.rebound.append(child.id)
                continue
            table.drop_link(child, parent, name)
            if not child.links:
                child.links = superseded(parent, name)    # see Resolver.gone
            stale.entries.append((parent.id, name))
        if parent.id in touched or any(bd.layer in added for bd in parent.dirs):
            stale.entries.extend((parent.id, name) for name in listing if name not in parent.children)


def _still(union: Resolver, parent: Node, name: bytes, child: Node, listing: dict[bytes, Entry]) -> bool:
    """Whether *name* in *parent* still stands for *child* (a directory gets its new branch
    directories here)."""
    e = listing.get(name)
    if e is None or e.is_dir != child.is_dir:
        return False
    if not child.is_dir:
        return child.layer == e.layer
    table = union.table
    fds = open_dir_layers(lambda layer: table.dirfd_or_none(parent, layer), name, e.dir_layers)
    if not fds:
        return False
    st = os.fstat(fds[0][1])
    key = (st.st_dev, st.st_ino)
    other = table.find(key)
    if other is not None and other is not child:
        for _, fd in fds:
            os.close(fd)
        return False
    table.set_dirs(child, fds)
    child.layer = e.layer
    if child.key != key:
        table.rekey(child, key)
        child.ino = table.ino_for(st)
    return True


def _rebind(union: Resolver, parent: Node, name: bytes, child: Node, listing: dict[bytes, Entry]) -> bool:
    """Whether the file *child*, whose *name* is now served by another branch, stands for the
    object there from now on: one of the same type, when *name* is the node's only one and no file
    of it is open (an open file keeps reading its own object; the kernel ties all of an inode's open
    files to one object)."""
    e = listing.get(name)
    if e is None or e.is_dir or child.is_dir or child.handles or len(child.links) != 1:
        return False
    table = union.table
    try:
        st = table.dirfd(parent, e.layer).lstat(name)
    except OSError:
        return False
    if stat.S_IFMT(st.st_mode) != child.kind:
        return False
    key = (st.st_dev, st.st_ino) if e.layer == 0 else (parent.id, name)
    other = table.find(key)
    if other is not None and other is not child:
        return False
    child.layer = e.layer
    if child.key != key:
        table.rekey(child, key)
    child.ino = table.ino_for(st)
    table.remember(child, st)
    return True
