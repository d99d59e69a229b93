#!/usr/bin/env python3
"""Run the long hardening tests and print the figures for the README's "Reliability and
security" section.

    .venv/bin/python scripts/hardening_report.py            # the long (slow) versions
    .venv/bin/python scripts/hardening_report.py --quick    # the bounded default-suite versions

Each test in tests/hardening/ prints one ``FIGURE name key=value ...`` line; this script runs
pytest with output capture off, collects those lines and the pass/xfail outcome of every test, and
prints them as a table. Exit status: pytest's.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the default-suite versions only")
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--basetemp", default="/var/tmp/unionfs-hard-report")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "hardening"), "-s", "-rA",
           "-p", "no:warnings", f"--basetemp={args.basetemp}"]
    if not args.quick:
        cmd += ["--runslow", "-m", "slow"]
    if args.k:
        cmd += ["-k", args.k]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    # with -s the figure shares its line with pytest's progress dots: take it from "FIGURE " on
    figures = [ln.split("FIGURE ", 1)[1] for ln in out.splitlines() if "FIGURE " in ln]
    outcomes = re.findall(r"^(PASSED|FAILED|XFAIL|XPASS|SKIPPED|ERROR) (\S+)", out, re.M)
    print(f"# hardening figures ({'quick' if args.quick else 'long'} run, {time.monotonic() - t0:.0f} s)\n")
    print("| figure | values |\n|---|---|")
    for f in figures:
        name, _, rest = f.partition(" ")
        print(f"| {name} | {rest} |")
    print("\n| outcome | test |\n|---|---|")
    for outcome, test in outcomes:
        print(f"| {outcome} | {test.split('::')[-1]} |")
    if proc.returncode not in (0, 5):
        print("\n--- pytest output (tail) ---")
        print(out[-6000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
