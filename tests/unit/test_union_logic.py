"""Unit tests of the union's logic without a mount: config parsing, merging, whiteouts, copy-up.

These build branches in tmp_path and call `Union` (and pyfuse3-free helpers) directly; what the
kernel makes of it is proven by the FUSE tests.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs.core.branches import open_stack
from unionfs.core.config import build_config, parse_branch_spec, split_escaped
from unionfs.core.errors import QuietError
from unionfs.core.merge import build_listing
from unionfs.core.union import Creds, Union
from unionfs.core.whiteout import Dialect, escape_xattr, is_private_xattr, unescape_xattr

ROOT = Creds(0, 0)


def make(tree: Path, spec: dict[str, str | None]) -> None:
    """Create files (text), dirs (None) under *tree*; names ending in '/' are dirs."""
    for rel, content in spec.items():
        p = tree / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content or "")


@pytest.fixture
def branches(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    upper, lower, work, mnt = (tmp_path / n for n in ("upper", "lower", "work", "mnt"))
    for d in (upper, lower, work, mnt):
        d.mkdir()
    return upper, lower, work, mnt


@contextlib.contextmanager
def open_union(upper: Path, lower: Path, work: Path, dialect: Dialect = Dialect.OVERLAY) -> Iterator[Union]:
    """A Union of *upper* over *lower* for the length of the block; its branches closed after it."""
    stack = open_stack([(str(upper), True), (str(lower), False)], str(work), aufs_work=False)
    try:
        u = Union(stack, dialect)
        try:
            yield u
        finally:
            u.close()
    finally:
        stack.close()


def names(u: Union, path: bytes = b"") -> list[bytes]:
    node = u.table.root
    for part in [p for p in path.split(b"/") if p]:
        found = u.lookup(node, part)
        assert found is not None, part
        node = found[0]
    return sorted(u.listing(node))


# ---------------------------------------------------------------------- config


def test_split_escaped_keeps_escaped_separators() -> None:
    assert split_escaped(r"a\:b:c", ":") == ["a:b", "c"]


def test_branch_modes() -> None:
    assert parse_branch_spec("A=rw:B:C=ro") == [("A", "rw"), ("B", None), ("C", "ro")]
    with pytest.raises(QuietError, match="unknown branch mode"):
        parse_branch_spec("A=rx")


def test_aufs_defaults_first_writable(branches: tuple[Path, ...]) -> None:
    upper, lower, _work, mnt = branches
    cfg = build_config(f"{upper}:{lower}", str(mnt), [])
    assert cfg.branches == [(str(upper), True), (str(lower), False)]
    assert cfg.dialect is Dialect.AUFS and cfg.writable


def test_overlay_style_and_dialect(branches: tuple[Path, ...]) -> None:
    upper, lower, work, mnt = branches
    cfg = build_config(None, str(mnt), [f"lowerdir={lower},upperdir={upper},workdir={work}"])
    assert cfg.style == "overlay" and cfg.dialect is Dialect.OVERLAY
    ro = build_config(None, str(mnt), [f"lowerdir={lower}"])
    assert not ro.writable


@pytest.mark.parametrize("case", ["missing", "twice", "nested", "mount-inside", "unknown", "lower-rw"])
def test_bad_config(branches: tuple[Path, ...], case: str) -> None:
    upper, lower, work, mnt = branches
    spec, opts = {
        "missing": (f"{upper}:{lower}/nope", []),
        "twice": (f"{upper}:{upper}", []),
        "nested": (f"{upper}:{upper}", []),
        "mount-inside": (f"{upper}:{lower}", []),
        "unknown": (f"{upper}:{lower}", ["bogus"]),
        "lower-rw": (f"{upper}:{lower}=rw", []),
    }[case]
    mp = str(mnt)
    if case == "nested":
        (upper / "sub").mkdir()
        spec = f"{upper}:{upper}/sub"
    if case == "mount-inside":
        (lower / "m").mkdir()
        mp = str(lower / "m")
    with pytest.raises(QuietError):
        build_config(spec, mp, opts)


# ---------------------------------------------------------------------- merge and whiteouts


def test_merge_higher_wins_and_whiteouts(branches: tuple[Path, ...]) -> None:
    upper, lower, work, _ = branches
    make(lower, {"a": "la", "x": "lx", "gone": "", "aufs-gone": "", "d/f": "", "od/hidden": ""})
    make(upper, {"x": "ux", ".wh.aufs-gone": "", "od/.wh..wh..opq": "", "od/seen": ""})
    os.mknod(upper / "gone", stat.S_IFCHR, 0)
    with open_union(upper, lower, work) as u:
        assert names(u) == [b"a", b"d", b"od", b"x"]
        assert names(u, b"od") == [b"seen"]
        found = u.lookup(u.table.root, b"x")
        assert found is not None and found[0].layer == 0
        assert u.lookup(u.table.root, b"gone") is None


def test_non_directory_above_hides_directory_below(tmp_path: Path) -> None:
    top, bottom = tmp_path / "t", tmp_path / "b"
    make(bottom, {"n/inner": ""})
    make(top, {"n": "file"})
    fds = [(0, os.open(top, os.O_RDONLY)), (1, os.open(bottom, os.O_RDONLY))]
    try:
        e = build_listing(fds)[b"n"]
        assert not e.is_dir and e.layer == 0 and e.has_lower
    finally:
        for _, fd in fds:
            os.close(fd)


def test_private_xattrs_and_escaping() -> None:
    assert is_private_xattr(b"trusted.overlay.opaque")
    assert not is_private_xattr(b"trusted.overlay.overlay.opaque")
    assert escape_xattr(b"trusted.overlay.x") == b"trusted.overlay.overlay.x"
    assert unescape_xattr(b"trusted.overlay.overlay.x") == b"trusted.overlay.x"
    assert unescape_xattr(b"trusted.overlay.origin") is None
    assert escape_xattr(b"user.fuseoverlayfs.opaque") == b"user.fuseoverlayfs.overlay.opaque"
    assert unescape_xattr(b"user.fuseoverlayfs.opaque") is None
    assert escape_xattr(b"user.plain") == b"user.plain"


# ---------------------------------------------------------------------- changes


async def test_copy_up_keeps_metadata_and_lower(branches: tuple[Path, ...]) -> None:
    upper, lower, work, _ = branches
    make(lower, {"dir/f": "data"})
    os.chmod(lower / "dir", 0o750)
    os.chown(lower / "dir/f", 1234, 4321)
    os.utime(lower / "dir/f", ns=(10**18, 2 * 10**18))
    os.setxattr(lower / "dir/f", "user.k", b"v")
    with open_union(upper, lower, work) as u:
        d = u.lookup(u.table.root, b"dir")
        assert d is not None
        f = u.lookup(d[0], b"f")
        assert f is not None
        h = await u.open(f[0], os.O_WRONLY)   # the copy-up: metadata as it was below
        st = os.stat(upper / "dir/f")
        assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1234, 4321, 2 * 10**18)
        os.pwrite(h.fd, b"DATA", 0)
        u.release(h)
    assert os.getxattr(upper / "dir/f", "user.k") == b"v"
    assert stat.S_IMODE(os.stat(upper / "dir").st_mode) == 0o750
    assert (upper / "dir/f").read_text() == "DATA"
    assert (lower / "dir/f").read_text() == "data"
    assert os.listdir(work / "unionfs-work") == []


async def test_unlink_and_rmdir_leave_whiteouts_only_where_needed(branches: tuple[Path, ...]) -> None:
    upper, lower, work, _ = branches
    make(lower, {"lf": "", "ld/": None})
    with open_union(upper, lower, work, Dialect.AUFS) as u:
        root = u.table.root
        u.create(root, b"new", 0o644, os.O_WRONLY, ROOT)[0]
        u.unlink(root, b"new")
        u.unlink(root, b"lf")
        u.rmdir(root, b"ld")
        assert sorted(os.listdir(upper)) == [".wh.ld", ".wh.lf"]
        assert names(u) == []
        with pytest.raises(OSError) as exc:
            u.unlink(root, b"lf")
        assert exc.value.errno == errno.ENOENT
        node, _ = u.mkdir(root, b"ld", 0o755, ROOT)
        assert (upper / "ld/.wh..wh..opq").exists() and not (upper / ".wh.ld").exists()


async def test_rename_merged_dir_is_exdev(branches: tuple[Path, ...]) -> None:
    upper, lower, work, _ = branches
    make(lower, {"d/f": ""})
    make(upper, {"d/g": "", "mine/h": ""})
    with open_union(upper, lower, work) as u:
        root = u.table.root
        with pytest.raises(OSError) as exc:
            await u.rename(root, b"d", root, b"d2", 0)
        assert exc.value.errno == errno.EXDEV
        await u.rename(root, b"mine", root, b"mine2", 0)
        assert names(u) == [b"d", b"mine2"]


async def test_read_only_union_refuses_changes(branches: tuple[Path, ...]) -> None:
    _upper, lower, _work, _ = branches
    make(lower, {"f": "x"})
    stack = open_stack([(str(lower), False)], None, aufs_work=False)
    u = Union(stack, Dialect.OVERLAY)
    try:
        root = u.table.root
        for call in (lambda: u.unlink(root, b"f"), lambda: u.mkdir(root, b"d", 0o755, ROOT)):
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.EROFS
    finally:
        u.close()
        stack.close()


# ---------------------------------------------------------------------- listings without a dir handle


def test_readers_without_a_handle_continue_in_their_snapshot(branches: tuple[Path, ...]) -> None:
    """With zero-message opendir, READDIRPLUS names no open directory: a read from offset 0 takes a
    snapshot, and an offset handed out from it continues in it however the directory changed."""
    from unionfs.server.operations import SNAPSHOTS_KEPT, Operations

    upper, lower, work, _ = branches
    make(lower, {"a": "1", "b": "2", "c": "3"})
    stack = open_stack([(str(upper), True), (str(lower), False)], str(work), aufs_work=False)
    ops = Operations.over(stack, Dialect.OVERLAY)
    u = ops.union
    with contextlib.closing(stack), contextlib.closing(u):
        root = u.table.root
        first, start, tag = ops._snapshot(root, 0)
        assert start == 0 and tag != 0
        assert first == [b".", b"..", *u.listing(root)]
        u.unlink(root, b"a")
        h, _, _ = u.create(root, b"new", 0o644, os.O_WRONLY, ROOT)
        u.release(h)
        # the reader that got the 3rd entry's offset goes on in the listing it started with
        again, start, tag2 = ops._snapshot(root, tag | 3)
        assert again is first and start == 3 and tag2 == tag
        # a reader starting over sees the change
        fresh, start, tag3 = ops._snapshot(root, 0)
        assert start == 0 and tag3 != tag
        assert b"new" in fresh
        # only the last few snapshots are kept; an evicted one goes on at the same position in a new one
        for _ in range(SNAPSHOTS_KEPT):
            ops._snapshot(root, 0)
        late, start, tag4 = ops._snapshot(root, tag | 3)
        assert late is not first and start == 3 and tag4 not in (tag, tag3)


async def test_new_file_keeps_setgid_only_for_members_of_its_group(branches: tuple[Path, ...]) -> None:
    """A file made in a setgid directory of a group the caller is not in loses S_ISGID, as the
    kernel's inode_init_owner decides (kernels before 6.0 leave that to the filesystem)."""
    upper, lower, work, _ = branches
    os.chown(upper, 0, 4321)
    os.chmod(upper, 0o2777)
    outsider = Creds(1234, 1234, 0, pid=0)     # not in 4321 (no process to ask: counts as outside)
    member = Creds(1234, 4321, 0, pid=0)
    with open_union(upper, lower, work) as u:
        for name, who, kept in ((b"outsider", outsider, False), (b"member", member, True)):
            h, _node, _st = u.create(u.table.root, name, 0o2755, os.O_WRONLY, who)
            u.release(h)
            st = os.stat(upper / os.fsdecode(name))
            assert st.st_gid == 4321
            assert bool(st.st_mode & stat.S_ISGID) == kept, (name, oct(st.st_mode))
            assert stat.S_IMODE(st.st_mode) & 0o777 == 0o755
