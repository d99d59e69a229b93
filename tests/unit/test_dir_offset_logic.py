"""Offsets of READDIRPLUS without a directory handle (`Operations._snapshot`): every value maps to
the next entry of a snapshot, or past the end, without losing a reader's snapshot."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs.core.branches import open_stack
from unionfs.core.whiteout import Dialect
from unionfs.server.operations import Operations


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Operations]:
    upper, lower, work = (tmp_path / n for n in ("upper", "lower", "work"))
    for d in (upper, lower, work):
        d.mkdir()
    for name in ("a", "b", "c"):
        (lower / name).write_text(name)
    stack = open_stack([(str(upper), True), (str(lower), False)], str(work), aufs_work=False)
    o = Operations.over(stack, Dialect.OVERLAY)
    with contextlib.closing(stack), contextlib.closing(o.union):
        yield o


def test_values_below_every_snapshot_go_on_at_the_second_entry(ops: Operations) -> None:
    root = ops.union.table.root
    first, _, tag = ops._snapshot(root, 0)
    for value in (1, 5, 1 << 31, (1 << 32) - 1, tag):
        entries, start, tag2 = ops._snapshot(root, value)
        assert (entries, start, tag2) == (first, 1, tag), value


def test_values_above_the_newest_snapshot_are_past_the_end(ops: Operations) -> None:
    root = ops.union.table.root
    _, _, tag = ops._snapshot(root, 0)
    for value in (tag + (1 << 32), tag | 0xFFFF_FFFF, 1 << 62):
        entries, start, _ = ops._snapshot(root, value)
        assert entries[start:] == [], value


def test_a_directory_without_snapshots_ends_only_above_every_generation(ops: Operations) -> None:
    """Its snapshots were dropped with its listing: a generation handed out goes on at the same
    position in a new snapshot; one never handed out is past the end."""
    root = ops.union.table.root
    _, _, tag = ops._snapshot(root, 0)
    ops.snapshots.drop(root)
    entries, start, tag2 = ops._snapshot(root, tag | 3)
    assert start == 3 and entries[3:] and tag2 > tag
    ops.snapshots.drop(root)
    entries, start, _ = ops._snapshot(root, (ops.snapshots.last + 1) << 32 | 2)
    assert entries[start:] == []


def test_generations_start_again_and_old_readers_go_on(ops: Operations) -> None:
    root = ops.union.table.root
    ops.snapshots.last = (1 << 31) - 1
    _, _, old = ops._snapshot(root, 0)                # the numbering starts again
    assert old == 1 << 32 and ops.snapshots.wrapped
    ops.snapshots.drop(root)
    entries, start, _ = ops._snapshot(root, (1 << 31) - 1 << 32 | 2)
    assert start == 2 and entries[2:]
