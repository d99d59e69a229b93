"""Snapshots of what a union shows (the visible tree) and of what it wrote (the upper layer).

Both are plain dicts ``relative path -> {field: value}`` ('' is the root) so that two snapshots are
compared with ``==`` and a difference is printed field by field. Every deliberate, documented
difference between unionfs and kernel overlayfs is normalised in the block marked NORMALISATIONS
below, and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .layers import AUFS_OPQ, AUFS_REDIRECT, AUFS_WH, SYNTHETIC_EPOCH

log = logging.getLogger(__name__)

Fields = dict[str, Any]

# =====================================================================================
# NORMALISATIONS — the complete list of what the oracle does not compare, and why.
#
# 1. st_ino and st_dev are not compared as numbers: a FUSE filesystem and kernel overlayfs number
#    inodes differently (the kernel passes real inode numbers through, or xino-encodes them).
#    What users rely on is compared instead: which paths are the same inode (hard-link groups,
#    ``Snapshot.links``), st_nlink, and whether a path's inode number stayed the same across a
#    step that did not name it (``ino_changes``; overlayfs keeps st_ino across copy-up and remount).
# 2. atime, ctime, st_blocks and st_blksize are not compared: atime depends on mount options
#    (relatime/noatime), ctime cannot be set by anyone, blocks/blksize are allocation details.
# 3. mtime is compared exactly when it is a fixed time set by the layer builder or a utimens step
#    (before 2017); any later mtime is "now", set by the clock while the step ran, and only
#    "it is now" is compared: both sides must agree whether an object was touched.
# 4. In the upper layer, whiteouts and opaque markers are read in every dialect and compared in
#    one: a 0/0 character device or a ``.wh.NAME`` file is "whiteout"; ``trusted.overlay.opaque=y``,
#    ``user.overlay.opaque=y`` or a ``.wh..wh..opq`` file is "opaque". A whiteout's own metadata
#    (the kernel shares one whiteout inode, so its nlink grows) is not compared.  A directory's
#    redirect (-o redirect_dir) is compared the same way: the ``trusted.overlay.redirect`` or
#    ``user.overlay.redirect`` xattr, or the AUFS dialect's ``.wh..wh..redirect`` symlink.
# 5. Private bookkeeping of each implementation is ignored: xattrs ``trusted.overlay.*`` and
#    ``user.overlay.*`` other than opaque and redirect (kernel origin/impure/...), ``user.fuseoverlayfs.*``
#    (fuse-overlayfs only), AUFS's private ``.wh..wh.*`` entries at the branch root, and the work dir.
# 6. ``readdir_while`` leaves out of its result the one name it changed mid-listing: whether such a
#    name shows up is unspecified by POSIX (the step's errno is still compared).
# 7. Per implementation, the differences its authors documented as deliberate (KNOWN_DIFFERENCES
#    below). unionfs: st_ino stability (see there). fuse-overlayfs is only a development
#    stand-in; its entries let the oracle be exercised end to end, they are not claims about what
#    is right.
#    The same classes (IGNORABLE) can be switched off for one exploratory run with
#    ``--ignore CLASS``, to look past a known bug for the next one; such a run says so and is not
#    a conformance verdict.
# 8. setxattr refused by its flag (XATTR_CREATE -> EEXIST, XATTR_REPLACE -> ENODATA): the kernel
#    copies the object up before refusing; pyfuse3 answers the flag itself, so unionfs never sees
#    the call. machine._copy_up_after_refused_setxattr copies the object up on the unionfs side
#    after such a step, so later steps compare like with like (the step's errno is compared).
# =====================================================================================

KNOWN_DIFFERENCES: dict[str, frozenset[str]] = {
    "kernel": frozenset(),
    # unionfs: st_ino is reported differently on purpose (the differences table names st_ino/st_dev
    # reporting as a deliberate difference), including over time: a parent directory's st_ino
    # changes when it is copied up, where the kernel keeps the lower origin's number. Drop "ino"
    # here to enforce it.
    "unionfs": frozenset({"ino"}),
    # fuse-overlayfs counts subdirectories for a merged directory's st_nlink; the kernel reports 1.
    "fuse-overlayfs": frozenset({"dir-nlink"}),
}

NOW_THRESHOLD_NS = 1_500_000_000 * 1_000_000_000  # 2017-07; see 3.
assert SYNTHETIC_EPOCH * 1_000_000_000 < NOW_THRESHOLD_NS

PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")


def mtime_class(ns: int) -> int | str:
    """Normalisation 3: an exact synthetic time, or 'now'."""
    return ns if ns < NOW_THRESHOLD_NS else "now"


def public_xattrs(names: list[str]) -> list[str]:
    """Normalisation 5: drop private bookkeeping xattrs."""
    return sorted(n for n in names if not n.startswith(PRIVATE_XATTR_PREFIXES))


def is_whiteout_dev(st: os.stat_result) -> bool:
    """Normalisation 4: the overlay dialect's whiteout."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def aufs_private(rel: str) -> bool:
    """Normalisation 5: AUFS's private entries at the branch root (``.wh..wh.plnk`` and friends)."""
    return "/" not in rel and rel.startswith(AUFS_WH + AUFS_WH) and rel != AUFS_OPQ


# =====================================================================================

TYPE_LETTERS = {
    stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
    stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFSOCK: "s",
}


@dataclass
class Snapshot:
    """A tree: entries by relative path, and the hard-link groups among non-directories."""

    entries: dict[str, Fields] = field(default_factory=dict)
    links: list[tuple[str, ...]] = field(default_factory=list)
    inos: dict[str, int] = field(default_factory=dict)  # st_dev changes at remount; see 1.

    def types(self) -> dict[str, str]:
        return {p: f.get("type", "?") for p, f in self.entries.items()}


def _content(path: str) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        return f"open error {e.errno}"
    try:
        h = hashlib.sha256()
        data = b""
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
            if len(data) <= 64:
                data += chunk
    except OSError as e:
        return f"read error {e.errno}"
    finally:
        os.close(fd)
    return data if len(data) <= 64 else "sha256:" + h.hexdigest()[:16]


def _xattrs(path: str) -> Any:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return f"listxattr error {e.errno}"
    out: dict[str, bytes | str] = {}
    for name in public_xattrs(names):
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            out[name] = f"getxattr error {e.errno}"
    return out


def _fields(path: str, st: os.stat_result) -> Fields:
    kind = TYPE_LETTERS.get(stat.S_IFMT(st.st_mode), "?")
    f: Fields = {
        "type": kind,
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "owner": (st.st_uid, st.st_gid),
        "nlink": st.st_nlink,
        "mtime": mtime_class(st.st_mtime_ns),
    }
    if kind != "d":
        f["size"] = st.st_size
    if kind == "f":
        f["content"] = _content(path)
    elif kind == "l":
        f["target"] = os.readlink(path)
    elif kind in ("c", "b"):
        f["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    f["xattrs"] = _xattrs(path)
    return f


def _link_groups(inodes: dict[tuple[int, int], list[str]]) -> list[tuple[str, ...]]:
    return sorted(tuple(sorted(paths)) for paths in inodes.values() if len(paths) > 1)


def visible_tree(root: str) -> Snapshot:
    """Everything a program sees through the mount at ``root``, without following symlinks."""
    snap = Snapshot()
    inodes: dict[tuple[int, int], list[str]] = defaultdict(list)

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        try:
            st = os.lstat(full)
        except OSError as e:
            snap.entries[rel] = {"error": f"lstat errno {e.errno}"}
            return
        f = _fields(full, st)
        snap.entries[rel] = f
        snap.inos[rel] = st.st_ino
        if f["type"] != "d":
            inodes[(st.st_dev, st.st_ino)].append(rel)
            return
        try:
            names = sorted(os.listdir(full))
        except OSError as e:
            f["listing"] = f"readdir errno {e.errno}"
            return
        for name in names:
            walk(os.path.join(rel, name) if rel else name)

    walk("")
    snap.links = _link_groups(inodes)
    return snap


def upper_tree(upper: str) -> Snapshot:
    """The upper layer as written, with whiteouts and opaque markers in one dialect."""
    snap = Snapshot()
    inodes: dict[tuple[int, int], list[str]] = defaultdict(list)

    def walk(rel: str) -> None:
        full = os.path.join(upper, rel) if rel else upper
        st = os.lstat(full)
        if is_whiteout_dev(st):
            snap.entries[rel] = {"type": "whiteout"}
            return
        f = _fields(full, st)
        snap.entries[rel] = f
        if f["type"] != "d":
            inodes[(st.st_dev, st.st_ino)].append(rel)
            return
        xattrs = f["xattrs"]
        opaque = False
        for name in OPAQUE_XATTRS:
            try:
                opaque |= os.getxattr(full, name, follow_symlinks=False) == b"y"
            except OSError:
                pass
        names = sorted(os.listdir(full))
        if AUFS_OPQ in names:
            names.remove(AUFS_OPQ)
            opaque = True
        f["opaque"] = opaque
        redirect = _redirect(full, names)
        if redirect is not None:
            f["redirect"] = redirect
        assert isinstance(xattrs, dict)
        for name in names:
            child = os.path.join(rel, name) if rel else name
            if not rel and aufs_private(name):
                if os.path.isdir(os.path.join(upper, name)) and not os.path.islink(os.path.join(upper, name)):
                    f["nlink"] -= 1  # normalisation 5: as if the private directory were not there
                continue
            if name.startswith(AUFS_WH):
                hidden = os.path.join(rel, name[len(AUFS_WH):]) if rel else name[len(AUFS_WH):]
                if hidden in snap.entries or os.path.lexists(os.path.join(upper, hidden)):
                    snap.entries[hidden + " (.wh. conflict)"] = {"type": "whiteout"}
                else:
                    snap.entries[hidden] = {"type": "whiteout"}
                continue
            walk(child)

    walk("")
    snap.links = _link_groups(inodes)
    return snap


def _redirect(path: str, names: list[str]) -> bytes | None:
    """The redirect of an upper directory (-o redirect_dir) in either dialect: the xattr, or the
    AUFS dialect's ``.wh..wh..redirect`` symlink (taken out of *names*)."""
    if AUFS_REDIRECT in names:
        names.remove(AUFS_REDIRECT)
        return os.fsencode(os.readlink(os.path.join(path, AUFS_REDIRECT)))
    for name in REDIRECT_XATTRS:
        try:
            return os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass
    return None


def tree_digest(root: str) -> str:
    """A hash of everything under ``root`` (a lower layer), to prove it was not written."""
    h = hashlib.sha256()
    snap = upper_tree_raw(root)
    h.update(repr(sorted(snap.items())).encode())
    return h.hexdigest()


def upper_tree_raw(root: str) -> dict[str, Any]:
    """Every object under ``root`` with all its metadata (including atime-free stat fields)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            full = os.path.join(dirpath, name) if name else dirpath
            if not name and dirpath != root:
                continue
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            xs = {n: os.getxattr(full, n, follow_symlinks=False)
                  for n in os.listxattr(full, follow_symlinks=False)}
            entry: Any = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns,
                          st.st_rdev, sorted(xs.items()))
            if stat.S_ISREG(st.st_mode):
                entry += (_content(full),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(full),)
            out[rel] = entry
    return out


IGNORABLE = {
    "dir-nlink": "st_nlink of directories",
    "file-nlink": "st_nlink of non-directories and the hard-link groups",
    "mtime": "st_mtime of everything",
    "ino": "whether st_ino stays the same across steps",
}


def _ignored(known: frozenset[str], fa: Fields, key: str) -> bool:
    """Normalisation 7: is this field covered by a documented difference?"""
    if key == "nlink":
        return ("dir-nlink" if fa.get("type") == "d" else "file-nlink") in known
    return key == "mtime" and "mtime" in known


def known_differences(*impls: object) -> frozenset[str]:
    """Normalisation 7 for a pair of implementations (named like 'kernel[opts]')."""
    return frozenset[str]().union(*(KNOWN_DIFFERENCES.get(str(i).partition("[")[0], frozenset())
                                     for i in impls))


def diff(a: Snapshot, b: Snapshot, name_a: str = "A", name_b: str = "B", limit: int = 20,
         ignore: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable differences between two snapshots; empty when they agree."""
    known = ignore | known_differences(name_a, name_b)
    lines: list[str] = []
    for path in sorted(set(a.entries) | set(b.entries)):
        shown = "/" + path
        if path not in b.entries:
            lines.append(f"{shown}: only in {name_a} ({_brief(a.entries[path])})")
        elif path not in a.entries:
            lines.append(f"{shown}: only in {name_b} ({_brief(b.entries[path])})")
        else:
            fa, fb = a.entries[path], b.entries[path]
            for key in sorted(set(fa) | set(fb)):
                if fa.get(key) != fb.get(key) and not _ignored(known, fa, key):
                    lines.append(f"{shown}: {key} {name_a}={fa.get(key)!r} {name_b}={fb.get(key)!r}")
    if a.links != b.links and "file-nlink" not in known:
        lines.append(f"hard-link groups: {name_a}={a.links} {name_b}={b.links}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def ino_changes(before: Snapshot, after: Snapshot, touched: tuple[str, ...]) -> set[str]:
    """Paths present in both snapshots, not at or below a ``touched`` path, whose inode number
    changed (normalisation 1: compared as this set, never as numbers)."""
    def related(path: str) -> bool:
        return any(path == t or path.startswith(t + "/") for t in touched)
    return {p for p in before.inos.keys() & after.inos.keys()
            if before.inos[p] != after.inos[p] and not related(p)}


def _brief(f: Fields) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in f.items() if k in ("type", "mode", "size", "target", "error"))
