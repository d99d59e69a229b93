"""`unionfs explain PATH`: where a name of a mounted union comes from.

The branch list is asked of the daemon that serves the mount, through the read-only xattr
``user.unionfs.layout`` of the mount's root (`core.provenance`): it is the list the daemon serves
now (not the command line it was started with, which a future change of branches on a live mount
would make stale), it works for every way a union is mounted (`unionfs mount`, mount(8),
``unionfs-overlay``, ``unionfs run``), and it needs no access to the daemon's state directory (root's
is mode 0700).  The branches themselves are then read directly, without the daemon, by
`BranchView.explain`, so that what the union hides is found too.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from unionfs.core import mountinfo
from unionfs.core.branchview import BranchView
from unionfs.core.errors import QuietError
from unionfs.core.provenance import (
    ABSENT,
    HOLDING,
    LAYOUT_XATTR,
    MERGED,
    SERVES,
    SHADOWED,
    WHITEOUT,
    Explanation,
)

FSTYPES = ("fuse.unionfs", "fuse.unionfs-overlay")


@dataclass
class Report:
    path: bytes                         # as given, made absolute
    mountpoint: bytes
    branches: list[tuple[str, bytes]]   # (mode, path), top first
    names: list[bytes]                  # the path's names inside the union
    explanation: Explanation


def _mount_of(path: bytes) -> mountinfo.Mount | None:
    """The topmost mount at the deepest mount point above (or at) *path*."""
    best: mountinfo.Mount | None = None
    for m in mountinfo.mounts():
        point = m.point.rstrip(b"/") + b"/"
        if (path + b"/").startswith(point) and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def layout(mountpoint: bytes) -> list[tuple[str, bytes]]:
    """(mode, path) of each branch of the union mounted at *mountpoint*, top first, as its daemon says."""
    try:
        value = os.getxattr(mountpoint, LAYOUT_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            raise QuietError(f"{os.fsdecode(mountpoint)}: its daemon does not say its branches "
                             "(a unionfs older than explain?)") from None
        raise QuietError(f"{os.fsdecode(mountpoint)}: {e.strerror}") from None
    out = []
    for item in value.split(b"\0"):
        mode, _, path = item.partition(b":")
        out.append((os.fsdecode(mode), path))
    return out


def explain_path(given: str | bytes) -> Report:
    """Explain *given* (a path on a unionfs mount); QuietError when it is on no unionfs mount."""
    raw = os.path.abspath(os.fsencode(given))
    parent, base = os.path.split(raw)
    path = os.path.join(os.path.realpath(parent), base) if base else raw
    m = _mount_of(path)
    if m is None or m.fstype not in FSTYPES:
        what = f"on a {m.fstype} mount at {os.fsdecode(m.point)}" if m else "on no mount"
        raise QuietError(f"{os.fsdecode(raw)} is not on a unionfs mount (it is {what})")
    branches = layout(m.point)
    inside = [n for n in path[len(m.point):].split(b"/") if n]
    names = [n for n in m.root.split(b"/") if n] + inside
    with BranchView([os.fsdecode(p) for _, p in branches]) as view:
        explanation = view.explain(names)
    return Report(raw, m.point, branches, names, explanation)


def as_json(r: Report) -> dict[str, Any]:
    """*r* for ``--json``: paths as str with os.fsdecode (a byte that is not UTF-8 is a lone
    surrogate, which json writes as ``\\udcXX``; ``os.fsencode`` gives the bytes back)."""
    e = r.explanation
    top = e.serving
    return {
        "path": os.fsdecode(r.path), "mountpoint": os.fsdecode(r.mountpoint),
        "exists": not e.missing, "missing": e.missing,
        "serving": top.index if top else None,
        "copied_up": e.copied_up,
        "merges": [f.index for f in e.found if f.role in (SERVES, MERGED)] if top and top.is_dir else [],
        "holders": [f.index for f in e.found if f.role in HOLDING],
        "branches": [{"index": f.index, "path": os.fsdecode(r.branches[f.index][1]),
                      "mode": r.branches[f.index][0], "kind": f.kind, "dialect": f.dialect or None,
                      "opaque": f.opaque or None, "role": f.role, "why": f.why or None}
                     for f in e.found],
    }


def as_text(r: Report) -> list[str]:
    """*r* for people: a summary line, then one line per branch (paths as os.fsdecode gives them)."""
    e = r.explanation
    top = e.serving
    path = os.fsdecode(r.path)
    if top is None:
        lines = [f"{path}: not in the union: {e.missing}"]
    else:
        mode, bpath = r.branches[top.index]
        lines = [f"{path}: {top.kind} from branch {top.index} ({mode}) {os.fsdecode(bpath)}"]
        if e.missing:
            lines.append(f"  but the union does not show it: {e.missing}")
        if e.copied_up:
            below = [str(f.index) for f in e.found if f.role == SHADOWED]
            lines.append(f"  copied up: the writable branch holds it, and below it branch {', '.join(below)}")
        if top.is_dir:
            merged = [str(f.index) for f in e.found if f.role in (SERVES, MERGED)]
            lines.append(f"  its listing merges branch{'es' if len(merged) > 1 else ''} {', '.join(merged)}")
    for f in e.found:
        mode, bpath = r.branches[f.index]
        what = f.kind + (f" ({f.dialect})" if f.dialect else "")
        what += f", opaque ({f.opaque})" if f.opaque else ""
        role = {ABSENT: "", WHITEOUT: ": hides the name below"}.get(f.role, f": {f.role}")
        role += f" by {f.why}" if f.why else ""
        lines.append(f"  branch {f.index} {mode} {os.fsdecode(bpath)}: {what}{role}")
    return lines
