"""The oracle's ``--redirect-dir``: both sides mounted with ``redirect_dir=on``, lower layers that
hold redirects, renames that move merged directories; unionfs and the kernel agree (the long soak is
`unionfs conformance --redirect-dir --seed 1 --sequences 200 --steps 50`, see docs/semantics.md)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from unionfs.conformance import machine
from unionfs.conformance.cli import conformance_command
from unionfs.conformance.impls import make_impl
from unionfs.conformance.layers import random_layers
from unionfs.conformance.machine import Runner, run_sequence
from unionfs.conformance.ops import Chooser

pytestmark = pytest.mark.usefixtures("need_overlay")


def test_draws_without_the_flag_are_unchanged() -> None:
    """The default campaign's sequences stay what they were: the flag draws more, only when set."""
    assert random_layers(random.Random(7), 3) == random_layers(random.Random(7), 3, redirects=False)
    tree = {"": "d", "a": "d", "a/b": "f", "c": "f"}
    plain, flagged = Chooser(random.Random(3)), Chooser(random.Random(3), dir_renames=False)
    assert [plain.next(tree) for _ in range(50)] == [flagged.next(tree) for _ in range(50)]


def test_redirects_in_layers_and_directory_renames_are_drawn() -> None:
    kinds = [e.kind for seed in range(20) for e in random_layers(random.Random(seed), 3, redirects=True).entries]
    assert kinds.count("redirect") >= 5
    tree = {"": "d", "a": "d", "a/b": "f", "c": "f", "d": "d"}
    chooser = Chooser(random.Random(1), {"rename"}, dir_renames=True)
    sources = [chooser.next(tree).args[0] for _ in range(200)]
    assert sum(tree.get(s) == "d" for s in sources) > 100


@pytest.mark.usefixtures("need_fuse")
def test_unionfs_agrees_with_the_kernel_and_moves_merged_directories(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    redirects: list[int] = []
    upper_tree = machine.upper_tree

    def counting(upper: str) -> machine.Snapshot:
        snap = upper_tree(upper)
        redirects.append(sum("redirect" in f for f in snap.entries.values()))
        return snap

    monkeypatch.setattr(machine, "upper_tree", counting)
    runner = Runner(make_impl("kernel", options="redirect_dir=on"),
                    make_impl("unionfs", options="redirect_dir=on"), str(tmp_path))
    for index in range(6):
        result = run_sequence(runner, 1, index, 40, (1, 3), dir_renames=True)
        assert result.failure is None, f"sequence {index}: {result.failure}"
    assert sum(redirects) >= 4, redirects    # merged directories were moved (both sides counted)


@pytest.mark.usefixtures("need_fuse")
def test_cli_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(conformance_command, ["--base", str(tmp_path), "--out", str(tmp_path),
                                                      "--redirect-dir", "--whiteout", "aufs", "--seed", "4",
                                                      "--sequences", "3", "--steps", "30"])
    assert re.search(r"^3 passed, 0 failed$", result.output, re.M), result.output
