"""The conformance oracle end to end, through real mounts.

- kernel overlayfs against itself: zero differences (the oracle has no noise of its own);
- kernel against kernel with ``redirect_dir=on``: a known difference is found, shrunk to a step or
  two, and the repro script reproduces it;
- unionfs against the kernel on fixed seeds, both whiteout dialects: the bounded CI run;
- unionfs with a planted bug (``--fault skip-whiteout-on-unlink``, planted by
  ``unionfs.conformance.faults``): found, with a minimal sequence of a few steps;
- the long soaks behind ``@pytest.mark.slow`` (``--runslow``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from unionfs.conformance.cli import conformance_command
from unionfs.conformance.impls import make_impl
from unionfs.conformance.machine import Runner, run_sequence

pytestmark = pytest.mark.usefixtures("need_overlay")

SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)


def conformance(tmp_path: Path, *args: str) -> tuple[Result, int, int]:
    """Run ``unionfs conformance`` with scratch dirs and scripts under ``tmp_path``."""
    result = CliRunner().invoke(conformance_command, ["--base", str(tmp_path), "--out", str(tmp_path),
                                                      *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    found = SUMMARY.findall(result.output)
    assert found, result.output
    passed, failed = map(int, found[-1])
    return result, passed, failed


def scripts(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("conformance-seed*-seq*.py"))


def minimal_steps(output: str) -> int:
    m = re.search(r"^minimal sequence \((\d+) steps", output, re.M)
    assert m, output
    return int(m.group(1))


def test_kernel_against_itself_shows_no_difference(tmp_path: Path) -> None:
    runner = Runner(make_impl("kernel"), make_impl("kernel"), str(tmp_path))
    for index in range(12):
        result = run_sequence(runner, 20260, index, 40, (1, 3))
        assert result.failure is None, f"sequence {index}: {result.failure}"
        assert len(result.trace.steps) == 40
    assert os.listdir(tmp_path) == []  # scratch dirs are removed


def test_known_difference_is_found_shrunk_and_scripted(tmp_path: Path) -> None:
    """redirect_dir=on lets a lower directory be renamed; without it the kernel says EXDEV."""
    result, passed, failed = conformance(tmp_path, "--impl-b", "kernel", "--options-b", "redirect_dir=on",
                                         "--seed", "1", "--sequences", "30", "--steps", "40")
    assert result.exit_code == 1 and failed == 1, result.output
    assert minimal_steps(result.output) <= 2
    assert "EXDEV" in result.output
    [repro] = scripts(tmp_path)
    run = subprocess.run([sys.executable, str(repro), "--base", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "EXDEV" in run.stdout
    same = subprocess.run([sys.executable, str(repro), "--base", str(tmp_path), "--options-b", ""],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no difference" in same.stdout


@pytest.mark.usefixtures("need_fuse")
@pytest.mark.parametrize("whiteout,seed", [("overlay", 4), ("aufs", 5)])
def test_unionfs_conforms_on_fixed_seeds(tmp_path: Path, whiteout: str, seed: int) -> None:
    """The bounded CI run: fixed seeds, a minute or so per dialect."""
    result, passed, failed = conformance(tmp_path, "--whiteout", whiteout, "--seed", str(seed),
                                         "--sequences", "25", "--steps", "40", "--shrink-seconds", "120")
    assert failed == 0, result.output
    assert passed == 25


@pytest.mark.usefixtures("need_fuse")
def test_documented_difference_of_a_refused_dir_move_is_normalised(tmp_path: Path) -> None:
    """Seed 32, sequence 100 (AUFS dialect) ends with a rename of a new directory refused with
    ENOTEMPTY, after which the kernel's upper layer has that directory opaque and unionfs' has not
    (README: differences; normalisation 9)."""
    result, passed, failed = conformance(tmp_path, "--whiteout", "aufs", "--seed", "32", "--first", "100",
                                         "--sequences", "1", "--steps", "50")
    assert (passed, failed) == (1, 0), result.output


@pytest.mark.usefixtures("need_fuse")
def test_planted_bug_is_found_with_a_minimal_sequence(tmp_path: Path) -> None:
    """With the whiteout on unlink skipped, a deleted lower file comes back: the oracle must say so
    in a sequence of a few steps."""
    result, passed, failed = conformance(tmp_path, "--fault", "skip-whiteout-on-unlink", "--seed", "1",
                                         "--sequences", "30", "--steps", "40", "--ops",
                                         "unlink,rename,open_,mkdir,rmdir,pwrite",
                                         "--layer-kinds", "file,dir,symlink,whiteout,opaque")
    assert result.exit_code == 1 and failed == 1, result.output
    assert minimal_steps(result.output) <= 3, result.output
    assert "unlink(s, " in result.output or "rename(s, " in result.output
    [repro] = scripts(tmp_path)
    run = subprocess.run([sys.executable, str(repro), "--base", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    # and it is the planted bug that was found: without the fault the same case agrees
    fixed = subprocess.run([sys.executable, str(repro), "--base", str(tmp_path), "--fault", ""],
                           capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("need_fuse")
@pytest.mark.parametrize("whiteout", ["overlay", "aufs"])
def test_soak_500x50(tmp_path: Path, whiteout: str) -> None:
    """The acceptance run: 500 sequences of 50 steps, zero differences."""
    result, passed, failed = conformance(tmp_path, "--whiteout", whiteout, "--seed", "500",
                                         "--sequences", "500", "--steps", "50")
    assert failed == 0, result.output


@pytest.mark.slow
@pytest.mark.usefixtures("need_fuse")
def test_soak_2000(tmp_path: Path) -> None:
    """The release soak."""
    result, passed, failed = conformance(tmp_path, "--seed", "2000", "--sequences", "2000", "--steps", "50",
                                         "--layers", "1-4")
    assert failed == 0, result.output


def test_run_a_users_program_on_both(tmp_path: Path) -> None:
    """--run: the user's command on copies of the user's layers, compared like a sequence."""
    top, base = tmp_path / "top", tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "motd").write_text("hello\n")
    top.mkdir()
    (top / "keep").write_text("x")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cmd = "rm etc/motd && mkdir -p etc/new && echo hi > etc/new/f && chmod 600 keep && ls $UNION/etc"
    args = ["--base", str(scratch), "--impl-b", "kernel", "--lower", str(top), "--lower", str(base), "--run"]
    ok = CliRunner().invoke(conformance_command, [*args, cmd])
    assert ok.exit_code == 0, ok.output
    assert "1 passed, 0 failed" in ok.output and "new\n" in ok.output
    differs = CliRunner().invoke(conformance_command, [*args, "mv etc etc2", "--options-b", "redirect_dir=on"])
    assert differs.exit_code == 1, differs.output
    assert "0 passed, 1 failed" in differs.output
    assert (base / "etc" / "motd").read_text() == "hello\n"  # the user's layers are only copied
    assert os.listdir(scratch) == []
