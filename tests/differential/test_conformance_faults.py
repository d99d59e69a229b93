"""The conformance harness's planted bugs (unionfs.conformance.faults): planted only in the daemon it
starts for them, refused by name when unknown.  That the oracle finds a planted bug is
tests/test_conformance_mount.py's."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from unionfs.conformance.cli import conformance_command
from unionfs.conformance.faults import FAULTS, command
from unionfs.core.whiteout import WhiteoutWriter


def test_a_fault_is_planted_through_its_own_entry_and_only_there() -> None:
    assert command("", ["mount", "-f"])[1:] == ["mount", "-f"]
    assert command("skip-whiteout-on-unlink", ["mount"]) == [
        sys.executable, "-m", "unionfs.conformance.faults", "skip-whiteout-on-unlink", "mount"]
    code = ("import sys; from unionfs.core.whiteout import WhiteoutWriter as W; w = W.write\n"
            "from unionfs.conformance.faults import FAULTS; FAULTS['skip-whiteout-on-unlink']()\n"
            "print(W.write is w)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"                     # planted in that process
    assert WhiteoutWriter.write.__module__ == "unionfs.core.whiteout"   # not in this one
    assert set(FAULTS) == {"skip-whiteout-on-unlink"}


def test_an_unknown_fault_is_refused_before_anything_is_mounted() -> None:
    run = subprocess.run([sys.executable, "-m", "unionfs.conformance.faults", "no-such-bug", "--help"],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip() == "unknown fault no-such-bug (known: skip-whiteout-on-unlink)"
    result = CliRunner().invoke(conformance_command, ["--fault", "no-such-bug", "--sequences", "1"])
    assert result.exit_code == 2 and "unknown fault no-such-bug" in result.output, result.output
