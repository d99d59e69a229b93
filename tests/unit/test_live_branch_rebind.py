"""A file whose name a live branch change gives to another branch's object of its type keeps its
node, now standing for that object (as AUFS refreshes its inode): a request the kernel had on its
way for the node, or holds the node for (an O_PATH descriptor), serves the name's new object.  A
node that cannot follow (open, another type) or whose name is gone answers ENOENT while the name is
gone, ESTALE once it shows an object again (the kernel then walks the path again).  Without a mount:
what the kernel makes of it is the FUSE tests' (tests/fuse/test_live_branches_held.py).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from test_live_branch_stale import lookup
from test_union_logic import make, open_union

from unionfs.core.livebranches import Change, apply, check_busy, plan
from unionfs.core.union import Union


@pytest.fixture
def tree(tmp_path: Path) -> list[Path]:
    """U (top), B with shared/f, W (work) and P, a branch to add: its own shared/f, shared/g and
    own/x."""
    upper, lower, work, pool = (tmp_path / n for n in ("U", "B", "W", "P"))
    make(upper, {"./": None})
    make(work, {"./": None})
    make(lower, {"shared/f": "B\n"})
    make(pool, {"shared/f": "P-f\n", "shared/g": "P-g\n", "own/x": "P-x\n"})
    return [upper, lower, work, pool]


def change(u: Union, op: str, path: Path) -> None:
    """Add *path* read-only just below the top, or remove it, as `unionfs branch` does."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        slots = plan(u.stack, [Change(op, fd, str(path), index=1 if op == "add" else None,
                                      mode="ro" if op == "add" else None)], overlay=True)
        check_busy(u, slots)
        apply(u, slots)
    finally:
        if op != "add":
            os.close(fd)


async def read(u: Union, node: Any, flags: int = os.O_RDONLY) -> bytes:
    h = await u.open(node, flags)
    try:
        return os.pread(h.fd, 100, 0)
    finally:
        u.release(h)


@pytest.mark.parametrize("first", ["B", "P"])
async def test_a_file_served_by_another_branch_keeps_its_node(tree: list[Path], first: str) -> None:
    upper, lower, work, pool = tree
    with open_union(upper, lower, work) as u:
        if first == "P":
            change(u, "add", pool)
        node = lookup(u, b"shared", b"f")
        change(u, "del" if first == "P" else "add", pool)
        want, other = (b"B\n", pool) if first == "P" else (b"P-f\n", lower)
        assert await read(u, node) == want          # no ESTALE: the same node, the new object
        st = u.stat(node)
        real = os.stat((lower if first == "P" else pool) / "shared" / "f")
        assert (st.st_size, node.ino) == (real.st_size, real.st_ino)
        assert lookup(u, b"shared", b"f") is node
        assert other.exists()
        h = await u.open(node, os.O_WRONLY | os.O_APPEND)    # copied up from the new object
        u.release(h)
    assert (upper / "shared" / "f").read_bytes() == want


async def test_a_file_open_keeps_its_object(tree: list[Path]) -> None:
    upper, lower, work, pool = tree
    with open_union(upper, lower, work) as u:
        old = lookup(u, b"shared", b"f")
        h = await u.open(old, os.O_RDONLY)
        change(u, "add", pool)
        assert os.pread(h.fd, 100, 0) == b"B\n"
        assert (await u.read(h.fh, 0, 100)) == b"B\n"
        assert u.stat(old).st_size == 2                 # through its open file
        new = lookup(u, b"shared", b"f")
        assert new is not old
        assert await read(u, new) == b"P-f\n"
        u.release(h)


@pytest.mark.parametrize("path", [(b"shared", b"g"), (b"own",), (b"own", b"x")])
async def test_a_name_gone_is_enoent_then_estale_once_it_shows_again(tree: list[Path],
                                                                     path: tuple[bytes, ...]) -> None:
    upper, lower, work, pool = tree
    with open_union(upper, lower, work) as u:
        change(u, "add", pool)
        node = lookup(u, *path)
        change(u, "del", pool)
        with pytest.raises(OSError) as e:
            u.stat(node)
        assert e.value.errno == errno.ENOENT             # gone, as after an unlink
        if not node.is_dir:
            with pytest.raises(OSError) as e:
                await u.open(node, os.O_RDONLY)
            assert e.value.errno == errno.ENOENT
        change(u, "add", pool)
        with pytest.raises(OSError) as e:
            u.stat(node)
        assert e.value.errno == errno.ESTALE             # there again: the kernel walks the path again
        if not node.is_dir:
            with pytest.raises(OSError) as e:
                await u.open(node, os.O_RDONLY)
            assert e.value.errno == errno.ESTALE
        assert lookup(u, *path) is not node
