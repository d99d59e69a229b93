"""The FUSE handlers called directly, without a mount (as s3ql's t3_fs_api does): a real `Operations`
over a real `Union` of an upper and a lower directory in tmp_path, each handler awaited under trio
the way pyfuse3 would call it, and the answer and the branches checked.

What the kernel makes of these answers is the FUSE tier's business (tests/fuse); here a handler's
reply, errno and effect on the branches are pinned down one by one, and an unexpected exception is
seen to become EIO plus a logged traceback (which the log checker then requires to be declared).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from pyfuse3 import FUSEError

from unionfs.core.branches import open_stack
from unionfs.core.whiteout import Dialect
from unionfs.server.operations import Operations

RENAME_NOREPLACE = 1


@dataclass
class Ctx:
    """What a handler reads of pyfuse3's RequestContext."""

    uid: int = 0
    gid: int = 0
    umask: int = 0o022
    pid: int = field(default_factory=os.getpid)


CTX: Any = Ctx()


@dataclass
class Fs:
    ops: Operations
    upper: Path
    lower: Path

    @property
    def root(self) -> int:
        return self.ops.union.table.root.id

    async def lookup(self, name: bytes, parent: int | None = None) -> pyfuse3.EntryAttributes:
        return await self.ops.lookup(self.root if parent is None else parent, name, CTX)

    async def ino(self, name: bytes, parent: int | None = None) -> int:
        attr = await self.lookup(name, parent)
        assert attr.st_ino != 0, f"{name!r} not found"
        return int(attr.st_ino)

    async def read_all(self, name: bytes) -> bytes:
        fi = await self.ops.open(await self.ino(name), os.O_RDONLY, CTX)
        try:
            return await self.ops.read(fi.fh, 0, 1 << 20)
        finally:
            await self.ops.release(fi.fh)

    async def listdir(self, ino: int | None = None) -> list[bytes]:
        fh = await self.ops.opendir(self.root if ino is None else ino, CTX)
        try:
            token: list[bytes] = []
            await self.ops.readdir(fh, 0, token)  # type: ignore[arg-type]
            return token
        finally:
            await self.ops.releasedir(fh)


def _reply(token: list[bytes], name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
    """pyfuse3.readdir_reply without a kernel: the names collect in the token."""
    token.append(name)
    return True


def _build(upper: Path, lower: Path, work: Path, writable: bool = True) -> Iterator[Operations]:
    branches = [(str(upper), True), (str(lower), False)] if writable else [(str(lower), False)]
    stack = open_stack(branches, str(work) if writable else None, aufs_work=False)
    try:
        ops = Operations.over(stack, Dialect.OVERLAY, readonly=not writable, timeout=0)
        try:
            yield ops
        finally:
            ops.union.close()
    finally:
        stack.close()


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fs]:
    """upper: ufile, dir/u, a whiteout of `gone`; lower: lfile, gone, dir/l, ldir/inner."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", _reply)
    upper, lower, work = tmp_path / "upper", tmp_path / "lower", tmp_path / "work"
    for d in (upper, lower, work, upper / "dir", lower / "dir", lower / "ldir"):
        d.mkdir()
    (upper / "ufile").write_bytes(b"upper data")
    (upper / "dir" / "u").write_bytes(b"u")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (lower / "lfile").write_bytes(b"lower data")
    (lower / "gone").write_bytes(b"hidden")
    (lower / "dir" / "l").write_bytes(b"l")
    (lower / "ldir" / "inner").write_bytes(b"inner")
    yield from (Fs(ops, upper, lower) for ops in _build(upper, lower, work))


async def _errno(aw: Any) -> int:
    with pytest.raises(FUSEError) as e:
        await aw
    return e.value.errno


# ---------------------------------------------------------------------- lookup and getattr


async def test_lookup_of_a_lower_file_answers_its_attributes(fs: Fs) -> None:
    attr = await fs.lookup(b"lfile")
    assert attr.st_ino != 0 and stat.S_ISREG(attr.st_mode)
    assert attr.st_size == len(b"lower data")
    assert fs.ops.union.table.get(attr.st_ino).nlookup == 1


async def test_each_lookup_counts_one_for_forget(fs: Fs) -> None:
    ino = await fs.ino(b"ufile")
    await fs.lookup(b"ufile")
    assert fs.ops.union.table.get(ino).nlookup == 2
    await fs.ops.forget([(ino, 1)])
    assert fs.ops.union.table.get(ino).nlookup == 1


async def test_lookup_of_a_missing_or_whited_out_name_is_negative(fs: Fs) -> None:
    for name in (b"nothing", b"gone"):
        attr = await fs.lookup(name)
        assert attr.st_ino == 0, name


async def test_getattr_of_root_and_of_a_merged_directory(fs: Fs) -> None:
    assert stat.S_ISDIR((await fs.ops.getattr(fs.root, CTX)).st_mode)
    attr = await fs.ops.getattr(await fs.ino(b"dir"), CTX)
    assert stat.S_ISDIR(attr.st_mode)


# ---------------------------------------------------------------------- create, write, read


async def test_create_write_read_lands_in_the_upper_branch(fs: Fs) -> None:
    fi, attr = await fs.ops.create(fs.root, b"new", stat.S_IFREG | 0o640, os.O_RDWR, CTX)
    assert attr.st_ino != 0 and stat.S_IMODE(attr.st_mode) == 0o640 & ~0o022
    assert await fs.ops.write(fi.fh, 0, b"hello") == 5
    assert await fs.ops.read(fi.fh, 0, 100) == b"hello"
    await fs.ops.release(fi.fh)
    assert (fs.upper / "new").read_bytes() == b"hello"
    assert not (fs.lower / "new").exists()


async def test_create_over_an_existing_name_with_o_excl_is_eexist(fs: Fs) -> None:
    assert await _errno(fs.ops.create(fs.root, b"lfile", stat.S_IFREG | 0o644,
                                      os.O_WRONLY | os.O_CREAT | os.O_EXCL, CTX)) == errno.EEXIST


async def test_read_of_a_lower_file_copies_nothing_up(fs: Fs) -> None:
    assert await fs.read_all(b"lfile") == b"lower data"
    assert not (fs.upper / "lfile").exists()


async def test_write_to_a_lower_file_copies_it_up_and_leaves_the_lower_alone(fs: Fs) -> None:
    fi = await fs.ops.open(await fs.ino(b"lfile"), os.O_WRONLY, CTX)
    await fs.ops.write(fi.fh, 0, b"LOWER")
    await fs.ops.release(fi.fh)
    assert (fs.upper / "lfile").read_bytes() == b"LOWER data"
    assert (fs.lower / "lfile").read_bytes() == b"lower data"
    assert await fs.read_all(b"lfile") == b"LOWER data"


# ---------------------------------------------------------------------- unlink, rmdir, mkdir


async def test_unlink_of_a_lower_file_leaves_a_whiteout(fs: Fs) -> None:
    await fs.ops.unlink(fs.root, b"lfile", CTX)
    assert (await fs.lookup(b"lfile")).st_ino == 0
    assert stat.S_ISCHR(os.lstat(fs.upper / "lfile").st_mode)
    assert (fs.lower / "lfile").read_bytes() == b"lower data"


async def test_unlink_of_an_upper_only_file_leaves_no_whiteout(fs: Fs) -> None:
    await fs.ops.unlink(fs.root, b"ufile", CTX)
    assert not os.path.lexists(fs.upper / "ufile")


async def test_unlink_of_a_missing_name_is_enoent(fs: Fs) -> None:
    assert await _errno(fs.ops.unlink(fs.root, b"nothing", CTX)) == errno.ENOENT
    assert await _errno(fs.ops.unlink(fs.root, b"gone", CTX)) == errno.ENOENT


async def test_rmdir_of_a_directory_with_lower_entries_is_enotempty(fs: Fs) -> None:
    assert await _errno(fs.ops.rmdir(fs.root, b"ldir", CTX)) == errno.ENOTEMPTY
    attr = await fs.ops.mkdir(fs.root, b"newdir", stat.S_IFDIR | 0o755, CTX)
    assert stat.S_ISDIR(attr.st_mode) and (fs.upper / "newdir").is_dir()
    await fs.ops.rmdir(fs.root, b"newdir", CTX)
    assert not (fs.upper / "newdir").exists()


# ---------------------------------------------------------------------- rename


async def test_rename_of_a_lower_file_moves_it_and_whites_out_the_old_name(fs: Fs) -> None:
    await fs.ops.rename(fs.root, b"lfile", fs.root, b"moved", 0, CTX)
    assert (await fs.lookup(b"lfile")).st_ino == 0
    assert await fs.read_all(b"moved") == b"lower data"
    assert (fs.upper / "moved").read_bytes() == b"lower data"
    assert (fs.lower / "lfile").exists()


async def test_rename_noreplace_over_an_existing_name_is_eexist(fs: Fs) -> None:
    assert await _errno(fs.ops.rename(fs.root, b"ufile", fs.root, b"lfile", RENAME_NOREPLACE, CTX)) == errno.EEXIST
    assert await fs.read_all(b"lfile") == b"lower data"


async def test_rename_of_a_merged_directory_is_exdev(fs: Fs) -> None:
    assert await _errno(fs.ops.rename(fs.root, b"dir", fs.root, b"dir2", 0, CTX)) == errno.EXDEV


# ---------------------------------------------------------------------- readdir


async def test_readdir_merges_branches_and_hides_whiteouts(fs: Fs) -> None:
    names = await fs.listdir()
    assert names[:2] == [b".", b".."]
    assert sorted(names[2:]) == [b"dir", b"ldir", b"lfile", b"ufile"]
    assert sorted((await fs.listdir(await fs.ino(b"dir")))[2:]) == [b"l", b"u"]


async def test_readdir_skips_a_name_removed_after_opendir(fs: Fs) -> None:
    fh = await fs.ops.opendir(fs.root, CTX)
    first: list[bytes] = []
    await fs.ops.readdir(fh, 0, first)  # type: ignore[arg-type]  # the snapshot is taken here
    await fs.ops.unlink(fs.root, b"ufile", CTX)
    again: list[bytes] = []
    await fs.ops.readdir(fh, 0, again)  # type: ignore[arg-type]
    await fs.ops.releasedir(fh)
    assert b"ufile" in first and b"ufile" not in again


# ---------------------------------------------------------------------- xattrs


async def test_setxattr_on_a_lower_file_copies_it_up(fs: Fs) -> None:
    ino = await fs.ino(b"lfile")
    await fs.ops.setxattr(ino, b"user.k", b"v", CTX)
    assert await fs.ops.getxattr(ino, b"user.k", CTX) == b"v"
    assert b"user.k" in await fs.ops.listxattr(ino, CTX)
    assert os.getxattr(fs.upper / "lfile", "user.k") == b"v"
    assert os.listxattr(fs.lower / "lfile") == []


async def test_getxattr_of_a_missing_name_is_enodata(fs: Fs) -> None:
    assert await _errno(fs.ops.getxattr(await fs.ino(b"ufile"), b"user.none", CTX)) == errno.ENODATA


async def test_overlay_private_xattrs_are_not_listed(fs: Fs) -> None:
    os.setxattr(fs.upper / "dir", "trusted.overlay.opaque", b"n")
    assert not any(n.startswith(b"trusted.overlay.") for n in await fs.ops.listxattr(await fs.ino(b"dir"), CTX))


# ---------------------------------------------------------------------- errors


@pytest.mark.daemon_log_ok(r"unexpected error in lookup", r"RuntimeError: planted")
async def test_an_unexpected_exception_is_eio_and_logged(fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("planted")
    monkeypatch.setattr(fs.ops.union, "lookup", boom)
    assert await _errno(fs.lookup(b"lfile")) == errno.EIO


async def test_a_read_only_union_refuses_changes_with_erofs(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_bytes(b"f")
    for ops in _build(tmp_path / "none", lower, tmp_path / "none", writable=False):
        root = ops.union.table.root.id
        assert await _errno(ops.create(root, b"new", stat.S_IFREG | 0o644, os.O_WRONLY, CTX)) == errno.EROFS
        assert await _errno(ops.unlink(root, b"f", CTX)) == errno.EROFS
        assert await _errno(ops.mkdir(root, b"d", stat.S_IFDIR | 0o755, CTX)) == errno.EROFS
    assert sorted(os.listdir(lower)) == ["f"]
