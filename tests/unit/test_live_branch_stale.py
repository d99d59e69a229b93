"""A request for a node whose name a live branch change gave to an object it cannot stand for
(another type, here) answers ESTALE.

The kernel may have looked a path up just before the change and ask for the node it got just
after (or the change may land while a copy-up of it awaits): ESTALE makes the VFS walk the path
again and find the name's new object, where ENOENT would tell the caller that a file that is there
is not.  Without a mount: the kernel's retry is the FUSE race test's (tests/hardening).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from test_union_logic import make, open_union

from unionfs.core.livebranches import Change, apply, check_busy, plan
from unionfs.core.union import Union


@pytest.fixture
def tree(tmp_path: Path) -> list[Path]:
    """U (top), B with shared/f, W (work) and P, a branch to add, with a shared/f of its own."""
    upper, lower, work, pool = (tmp_path / n for n in ("U", "B", "W", "P"))
    make(upper, {"./": None})
    make(work, {"./": None})
    make(lower, {"shared/f": "B\n"})
    make(pool, {"shared/f": "P\n"})
    return [upper, lower, work, pool]


def add_branch(u: Union, path: Path) -> None:
    """Add *path* read-only just below the top, as `unionfs branch add` does."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    slots = plan(u.stack, [Change("add", fd, str(path), index=1, mode="ro")], overlay=True)
    check_busy(u, slots)
    apply(u, slots)


def lookup(u: Union, *names: bytes) -> Any:
    """The node of the path *names*, looked up as the kernel does (which keeps each node)."""
    node = u.table.root
    for name in names:
        found = u.lookup(node, name)
        assert found is not None, name
        node = found[0]
        node.nlookup += 1
    return node


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY | os.O_APPEND])
async def test_open_of_a_node_whose_name_shows_another_type_is_estale(tree: list[Path], flags: int) -> None:
    upper, lower, work, pool = tree
    (pool / "shared" / "f").unlink()
    (pool / "shared" / "f").symlink_to("elsewhere")
    with open_union(upper, lower, work) as u:
        old = lookup(u, b"shared", b"f")
        add_branch(u, pool)        # shared/f is P's symlink now: the kernel's inode cannot be one
        with pytest.raises(OSError) as e:
            await u.open(old, flags)
        assert e.value.errno == errno.ESTALE
        new = lookup(u, b"shared", b"f")     # the kernel's walk again
        assert new is not old
        assert u.readlink(new) == b"elsewhere"


async def test_change_during_a_copy_up_is_estale(tree: list[Path]) -> None:
    upper, lower, work, pool = tree
    with open_union(upper, lower, work) as u:
        node = lookup(u, b"shared", b"f")
        copy = u.copyup.file

        async def changed_meanwhile(*args: Any, **kw: Any) -> Any:
            made = await copy(*args, **kw)
            add_branch(u, pool)    # between the copy and its placing
            return made

        u.copyup.file = changed_meanwhile  # type: ignore[method-assign]
        with pytest.raises(OSError) as e:
            await u.open(node, os.O_WRONLY | os.O_APPEND)
        assert e.value.errno == errno.ESTALE
    assert not (upper / "shared" / "f").exists()
    assert os.listdir(work / "unionfs-work") == []
