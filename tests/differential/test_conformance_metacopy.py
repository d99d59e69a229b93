"""The oracle's ``--metacopy``: kernel overlayfs and unionfs both mounted with metadata-only copy-up.

The kernel turns redirect_dir on with metacopy; unionfs does not rename merged directories yet (the
other half of redirect_dir), so the bounded run here leaves renames out; the soak with every
operation is reported in docs/metacopy.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from unionfs.conformance.cli import conformance_command
from unionfs.conformance.impls import make_impl
from unionfs.conformance.machine import Runner, run_sequence
from unionfs.conformance.ops import WEIGHTS

pytestmark = pytest.mark.usefixtures("need_overlay")

NO_RENAME = set(WEIGHTS) - {"rename"}
META = ("chmod", "chown", "utimens", "setxattr")
DATA = ("read", "open_", "pwrite", "append", "truncate", "fd_open")


def test_metacopy_oracle_is_clean_and_draws_metadata_changes_before_data(tmp_path: Path) -> None:
    runner = Runner(make_impl("kernel", options="redirect_dir=on,metacopy=on"),
                    make_impl("unionfs", options="metacopy=on"), str(tmp_path))
    followed = 0
    for index in range(6):
        result = run_sequence(runner, 7, index, 40, (1, 2), NO_RENAME)
        assert result.failure is None, f"sequence {index}: {result.failure}"
        changed: set[str] = set()
        for op, out_a, _ in result.trace.steps:
            path = op.args[0] if op.args and isinstance(op.args[0], str) else None
            if op.name in META and out_a is not None and not out_a.errno and path:
                changed.add(path)
            elif op.name in DATA and path in changed:
                followed += 1
    assert followed >= 3, "metadata changes followed by reads or writes of the same file were drawn"
    assert os.listdir(tmp_path) == []


def test_metacopy_flag_mounts_both_sides_with_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(conformance_command, [
        "--base", str(tmp_path), "--out", str(tmp_path), "--metacopy", "--seed", "3", "--sequences", "2",
        "--steps", "20", "--ops", ",".join(sorted(NO_RENAME)), "-v"])
    assert result.exit_code == 0, result.output
    assert "2 passed, 0 failed" in result.output
    refused = CliRunner().invoke(conformance_command, ["--base", str(tmp_path), "--metacopy",
                                                      "--impl-b", "fuse-overlayfs"])
    assert refused.exit_code == 2 and "no metadata-only copy-up" in refused.output
