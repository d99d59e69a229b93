"""Where a name of the union comes from: which branch serves it, what each branch below holds and
what hides it.  One rule, used by `unionfs explain` (through the branches, without the daemon) and by
the daemon's read-only ``user.unionfs.*`` xattrs.

The rule is the union's (`branchview.BranchView._step`): in the branch directories the union merges
for a parent, top first, the first entry of the name *serves* it; a directory below a directory is
*merged* into its listing; an opaque directory, a whiteout (``.wh.NAME``, AUFS, or a 0/0 character
device, overlay) or a non-directory ends the search, and everything below is *hidden* by it.  An
entry below the serving one that the union would show if the one above were gone (a copy-up leaves
the lower file *shadowed*) still *holds* the name.
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .branches import DirFd
from .whiteout import is_whiteout_stat, opaque_marker, whiteouts_at

#: The read-only xattrs the union answers for every file and directory (never listed, never
#: stored: a branch's own xattr of the same name is stored escaped and never shown).
BRANCH_XATTR = b"user.unionfs.branch"       # the serving branch's path
BRANCHES_XATTR = b"user.unionfs.branches"   # each branch holding the name, top first, "\n" between
LAYOUT_XATTR = b"user.unionfs.layout"       # the mount root only: "MODE:PATH" per branch, NUL between
VIRTUAL_XATTRS = frozenset((BRANCH_XATTR, BRANCHES_XATTR, LAYOUT_XATTR))

SERVES, MERGED, SHADOWED, WHITEOUT, HIDDEN, ABSENT = (
    "serves", "merged", "shadowed", "whiteout", "hidden", "absent")
HOLDING = (SERVES, MERGED, SHADOWED)


@dataclass
class Found:
    """What branch *index* has for a name, and what the union makes of it."""

    index: int
    kind: str               # "file", "directory", "symlink", ..., "whiteout", "nothing"
    dialect: str = ""       # whiteouts: "aufs" (.wh.NAME) or "overlay" (0/0 device)
    opaque: str = ""        # opaque directories: the marker (an xattr's name, or .wh..wh..opq)
    role: str = ABSENT      # SERVES, MERGED, SHADOWED, WHITEOUT, HIDDEN or ABSENT
    why: str = ""           # HIDDEN and SHADOWED: what hides it

    @property
    def is_dir(self) -> bool:
        return self.kind == "directory"


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def look(index: int, fd: DirFd, name: bytes) -> tuple[Found, DirFd | None]:
    """What the branch directory *fd* (branch *index*) holds for *name*; with the entry's own
    directory opened when it is one (the caller closes it)."""
    device, aufs = whiteouts_at(fd, name)
    if aufs or device:
        return Found(index, "whiteout", dialect="aufs" if aufs else "overlay"), None
    try:
        st = fd.lstat(name)
    except FileNotFoundError:
        return Found(index, "nothing"), None
    if is_whiteout_stat(st):
        return Found(index, "whiteout", dialect="overlay"), None
    found = Found(index, _KINDS.get(stat.S_IFMT(st.st_mode), "unknown"))
    if not found.is_dir:
        return found, None
    try:
        sub = fd.open_dir(name)
    except OSError:
        return found, None
    found.opaque = opaque_marker(sub) or ""
    return found, sub


def judge(found: Sequence[Found], where: str) -> None:
    """Give each of *found* (one per branch directory the union merges for the parent, top first)
    its role by the union's rule; *where* names the path in the reasons given."""
    top: Found | None = None
    cut = ""
    for f in found:
        if f.role == HIDDEN:
            continue
        if cut:
            f.role, f.why = (HIDDEN, cut) if f.kind != "nothing" else (ABSENT, "")
            continue
        if f.kind == "nothing":
            continue
        if top is not None and not top.is_dir:
            # Below a non-directory nothing is consulted: what is there waits, shadowed by it.
            f.role, f.why = (WHITEOUT, "") if f.kind == "whiteout" else (SHADOWED, _by(top, where))
            continue
        if f.kind == "whiteout":
            f.role = WHITEOUT
            cut = f"a whiteout of {where} in branch {f.index} ({f.dialect})"
            continue
        if top is None:
            top, f.role = f, SERVES
        elif f.is_dir:
            f.role = MERGED
        else:
            f.role, f.why = SHADOWED, _by(top, where)
            cut = _by(f, where)
        if f.is_dir and f.opaque:
            cut = f"the opaque directory {where} in branch {f.index} ({f.opaque})"


def _by(f: Found, where: str) -> str:
    return f"the {f.kind} {where} in branch {f.index}"


def at_name(dirs: Sequence[tuple[int, DirFd]], name: bytes, where: str = "") -> list[Found]:
    """The roles of *name* in the branch directories *dirs* ((branch, fd), top first) of its parent."""
    found = []
    with contextlib.ExitStack() as opened:
        for index, fd in dirs:
            f, sub = look(index, fd, name)
            if sub is not None:
                opened.callback(os.close, sub)
            found.append(f)
    judge(found, where or os.fsdecode(name))
    return found


@dataclass
class Explanation:
    """`explain`'s answer: one `Found` per branch (every branch of the union, top first), and
    *missing* saying why the union has no such name ("" when it has)."""

    found: list[Found]
    missing: str

    @property
    def serving(self) -> Found | None:
        return next((f for f in self.found if f.role == SERVES), None)

    @property
    def copied_up(self) -> bool:
        """Served by the top branch while a branch below holds the name too (a copy-up, or a name
        made again over a lower one)."""
        top = self.serving
        return (top is not None and top.index == 0 and not top.is_dir
                and any(f.role == SHADOWED for f in self.found))


def explain(roots: Sequence[DirFd], names: Sequence[bytes]) -> Explanation:
    """Where the path made of *names* comes from in the union of the branch roots *roots*.

    Each branch is followed literally (without a symlink) as deep as it has the path, so a name
    hidden above (below a whiteout of a parent, say) is still found and its reason given."""
    with contextlib.ExitStack() as opened:
        dirs: list[DirFd | None] = list(roots)
        hidden: list[str] = [""] * len(roots)
        missing = ""
        found = [Found(i, "directory", role=SERVES if i == 0 else MERGED) for i in range(len(roots))]
        where = ""
        for depth, name in enumerate(names):
            where = where + "/" + os.fsdecode(name)
            found = []
            subs: list[DirFd | None] = []
            for index, fd in enumerate(dirs):
                if fd is None:
                    f, sub = Found(index, "nothing"), None
                else:
                    f, sub = look(index, fd, name)
                    if sub is not None:
                        opened.callback(os.close, sub)
                if hidden[index] and f.kind != "nothing":
                    f.role, f.why = HIDDEN, hidden[index]
                found.append(f)
                subs.append(sub)
            judge(found, where)
            for f in found:
                if f.role == HIDDEN and not hidden[f.index]:
                    hidden[f.index] = f.why
            top = next((f for f in found if f.role == SERVES), None)
            if depth < len(names) - 1:
                if top is None and not missing:
                    missing = f"{where} is not in the union"
                elif top is not None and not top.is_dir and not missing:
                    missing = f"{where} is a {top.kind} in the union, not a directory"
                for f in found:
                    if f.role not in (SERVES, MERGED) and not hidden[f.index]:
                        hidden[f.index] = missing or f.why or f"nothing of {where} in branch {f.index}"
                    if missing and not hidden[f.index]:
                        hidden[f.index] = missing
            elif top is None and not missing:
                missing = f"{where} is not in the union"
            dirs = subs
        return Explanation(found, missing)


def holders(found: Sequence[Found]) -> Iterator[int]:
    """The branches that hold the name (serve it, merge it or shadow it), top first."""
    return (f.index for f in found if f.role in HOLDING)
