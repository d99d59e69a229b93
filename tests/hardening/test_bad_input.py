"""Hardening, bad input: one line, non-zero exit, nothing mounted, nothing created or changed.

(How these tests are built: see conftest.py here.)
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from hardening_util import (
    OVERLAY,
    UNIONFS,
    figure,
    )

pytestmark = pytest.mark.fuse


# ==================================================================================================
# 7. Bad input: one line, non-zero exit, nothing mounted, nothing created or changed


def _bad_cases(a: Path) -> dict[str, list[str | bytes]]:
    """Bad command lines; names not in BAD_EXIT exit 1 (2 for a `run-` case: its usage errors)."""
    A, B, U, W, M = (str(a / n) for n in "ABUWM")
    R = [UNIONFS, "run"]
    C = [UNIONFS, "conformance", "--sequences", "1", "--steps", "1"]  # bounded, should one ever start
    x = os.fsencode(str(a))    # non-UTF-8 names below: bytes arguments
    ok = f"lowerdir={A},upperdir={U},workdir={W}"
    return {
        # unionfs mount (cases beyond tests/test_cli.py)
        "mount-empty-branch": [UNIONFS, "mount", f"{A}::{B}", M],
        "mount-two-writable": [UNIONFS, "mount", f"{A}=rw:{B}=rw", M],
        "mount-mountpoint-symlink-to-file": [UNIONFS, "mount", f"{A}:{B}", str(a / "linkfile")],
        "mount-whiteout-empty": [UNIONFS, "mount", "-o", "whiteout=", f"{A}:{B}", M],
        "mount-timeout-negative": [UNIONFS, "mount", "-o", "timeout=-1", f"{A}:{B}", M],
        "mount-timeout-text": [UNIONFS, "mount", "-o", "timeout=soon", f"{A}:{B}", M],
        "mount-branches-and-lowerdir": [UNIONFS, "mount", "-o", f"lowerdir={B}", f"{A}:{B}", M],
        "mount-upperdir-without-lowerdir": [UNIONFS, "mount", "-o", f"upperdir={U}", f"{A}:{B}", M],
        "mount-workdir-without-upperdir": [UNIONFS, "mount", "-o", f"lowerdir={A},workdir={W}", M],
        "mount-workdir-is-upperdir": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir={U},workdir={U}", M],
        "mount-upper-inside-lower": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir={A}/sub,workdir={W}", M],
        "mount-mountpoint-is-a-branch": [UNIONFS, "mount", f"{A}:{B}", A],
        "mount-three-arguments": [UNIONFS, "mount", f"{A}:{B}", M, M],
        "mount-lowerdir-trailing-colon": [UNIONFS, "mount", "-o", f"lowerdir={A}:", M],
        "mount-workdir-is-a-file": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir={U},workdir={A}/a", M],
        "mount-escaped-colon-missing": [UNIONFS, "mount", f"{A}\\:x:{B}", M],
        "mount-lowerdir-is-mountpoint": [UNIONFS, "mount", "-o", f"lowerdir={M}", M],
        "mount-no-arguments": [UNIONFS, "mount"],
        "mount-branch-is-symlink-to-file": [UNIONFS, "mount", f"{A}:{a}/linkfile", M],
        "mount-log-file-in-missing-dir": [UNIONFS, "mount", "--log-file", f"{a}/nodir/log", f"{A}:{B}", M],
        "mount-log-file-is-a-dir": [UNIONFS, "mount", "--log-file", W, f"{A}:{B}", M],
        # unionfs-overlay
        "overlay-no-options": [OVERLAY, M],
        "overlay-dash-o-without-value": [OVERLAY, M, "-o"],
        "overlay-missing-lower": [OVERLAY, "-o", f"lowerdir={a}/nope,upperdir={U},workdir={W}", M],
        "overlay-upper-without-work": [OVERLAY, "-o", f"lowerdir={A},upperdir={U}", M],
        "overlay-mountpoint-is-a-file": [OVERLAY, "-o", f"lowerdir={A},upperdir={U},workdir={W}", f"{A}/a"],
        "overlay-bad-whiteout": [OVERLAY, "-o", f"lowerdir={A},upperdir={U},workdir={W},whiteout=zfs", M],
        "overlay-lower-twice": [OVERLAY, "-o", f"lowerdir={A}:{A},upperdir={U},workdir={W}", M],
        # unionfs run
        "run-missing-branch": [*R, f"{U}:{a}/nope", "--", "/bin/true"],
        "run-branch-is-a-file": [*R, f"{U}:{A}/a", "--", "/bin/true"],
        "run-no-command": [*R, f"{U}:{A}", "--"],
        "run-relative-workdir": [*R, "-w", "tmp", f"{U}:{A}", "--", "/bin/true"],
        "run-bad-net": [*R, "--net", "bridge", f"{U}:{A}", "--", "/bin/true"],
        "run-bad-hostname": [*R, "--hostname", "bad_host!", f"{U}:{A}", "--", "/bin/true"],
        "run-env-without-key": [*R, "-e", "=value", f"{U}:{A}", "--", "/bin/true"],
        "run-empty-branch": [*R, f"{U}::{A}", "--", "/bin/true"],
        "run-unknown-option": [*R, "--frobnicate", f"{U}:{A}", "--", "/bin/true"],
        # unionfs mount: values out of range or missing
        "mount-timeout-nan": [UNIONFS, "mount", "-o", "timeout=nan", f"{A}:{B}", M],
        "mount-timeout-inf": [UNIONFS, "mount", "-o", "timeout=inf", f"{A}:{B}", M],
        "mount-timeout-1e300": [UNIONFS, "mount", "-o", "timeout=1e300", f"{A}:{B}", M],
        "mount-timeout-empty": [UNIONFS, "mount", "-o", "timeout=", f"{A}:{B}", M],
        "mount-timeout-without-value": [UNIONFS, "mount", "-o", "timeout", f"{A}:{B}", M],
        "mount-upperdir-without-value": [UNIONFS, "mount", "-o", f"lowerdir={A},upperdir,workdir={W}", M],
        "mount-fsname-with-space": [UNIONFS, "mount", "-o", "fsname=a b", f"{A}:{B}", M],
        "mount-dash-o-last": [UNIONFS, "mount", f"{A}:{B}", M, "-o"],
        "mount-log-file-last": [UNIONFS, "mount", f"{A}:{B}", M, "--log-file"],
        "mount-unknown-short-flag": [UNIONFS, "mount", "-z", f"{A}:{B}", M],
        # unionfs mount: a non-UTF-8 name in every path argument
        "mount-nonutf8-branch-missing": [UNIONFS, "mount", x + b"/A\xff:" + x + b"/B", M],
        "mount-nonutf8-lower-branch-missing": [UNIONFS, "mount", x + b"/A:" + x + b"/B\xff", M],
        "mount-nonutf8-branch-is-a-file": [UNIONFS, "mount", x + b"/A:" + x + b"/f\xff", M],
        "mount-nonutf8-branch-mode": [UNIONFS, "mount", x + b"/A=r\xff:" + x + b"/B", M],
        "mount-nonutf8-mountpoint-missing": [UNIONFS, "mount", f"{A}:{B}", x + b"/M\xff"],
        "mount-nonutf8-mountpoint-is-a-file": [UNIONFS, "mount", f"{A}:{B}", x + b"/f\xff"],
        "mount-nonutf8-mountpoint-inside-branch": [UNIONFS, "mount", f"{A}:{B}", x + b"/A/sub\xff"],
        "mount-nonutf8-lowerdir-missing": [UNIONFS, "mount", "-o", b"lowerdir=" + x + b"/n\xff", M],
        "mount-nonutf8-upperdir-missing": [UNIONFS, "mount", "-o",
                                           f"lowerdir={A},workdir={W},upperdir=".encode() + x + b"/U\xff", M],
        "mount-nonutf8-workdir-missing": [UNIONFS, "mount", "-o",
                                          f"lowerdir={A},upperdir={U},workdir=".encode() + x + b"/W\xff", M],
        "mount-nonutf8-workdir-is-a-file": [UNIONFS, "mount", "-o",
                                            f"lowerdir={A},upperdir={U},workdir=".encode() + x + b"/f\xff", M],
        "mount-nonutf8-log-file-in-missing-dir": [UNIONFS, "mount", "--log-file", x + b"/n\xff/log", f"{A}:{B}", M],
        "mount-nonutf8-log-file-is-a-dir": [UNIONFS, "mount", "--log-file", x + b"/d\xff", f"{A}:{B}", M],
        "mount-nonutf8-unknown-option": [UNIONFS, "mount", "-o", b"fr\xffob", f"{A}:{B}", M],
        "mount-nonutf8-fsname": [UNIONFS, "mount", "-o", b"fsname=\xff", f"{A}:{B}", M],
        "mount-nonutf8-foreground-mountpoint-is-a-file": [UNIONFS, "mount", "-f", f"{A}:{B}", x + b"/f\xff"],
        # unionfs umount
        "umount-not-mounted": [UNIONFS, "umount", M],
        "umount-not-unionfs": [UNIONFS, "umount", "/proc"],
        "umount-no-argument": [UNIONFS, "umount"],
        "umount-two-arguments": [UNIONFS, "umount", M, A],
        "umount-unknown-flag": [UNIONFS, "umount", "--frobnicate", M],
        "umount-nonutf8-missing": [UNIONFS, "umount", x + b"/M\xff"],
        "umount-nonutf8-not-mounted": [UNIONFS, "umount", x + b"/d\xff"],
        # unionfs-overlay
        "overlay-unknown-flag": [OVERLAY, "--frobnicate", "-o", ok, M],
        "overlay-unknown-flag-alone": [OVERLAY, "--frobnicate"],
        "overlay-three-positionals": [OVERLAY, "-o", ok, "src", M, M],
        "overlay-timeout-nan": [OVERLAY, "-o", f"{ok},timeout=nan", M],
        "overlay-upperdir-without-value": [OVERLAY, "-o", f"lowerdir={A},upperdir,workdir={W}", M],
        "overlay-ignored-option-and-missing-lower": [OVERLAY, "-o", f"lowerdir={a}/nope,squash_to_root", M],
        "overlay-nonutf8-mountpoint-missing": [OVERLAY, "-o", ok, x + b"/M\xff"],
        "overlay-nonutf8-mountpoint-is-a-file": [OVERLAY, "-o", ok, x + b"/f\xff"],
        "overlay-nonutf8-lower-missing": [OVERLAY, "-o", b"lowerdir=" + x + b"/n\xff", M],
        "overlay-nonutf8-upper-missing": [OVERLAY, "-o", f"lowerdir={A},workdir={W},upperdir=".encode() + x
                                          + b"/U\xff", M],
        "overlay-nonutf8-work-missing": [OVERLAY, "-o", f"lowerdir={A},upperdir={U},workdir=".encode() + x
                                         + b"/W\xff", M],
        "overlay-nonutf8-flag": [OVERLAY, b"--fr\xff", "-o", ok, M],
        # unionfs run
        "run-no-arguments": [*R],
        "run-bad-backend": [*R, "--backend", "zfs", f"{U}:{A}", "--", "/bin/true"],
        "run-bad-branch-mode": [*R, f"{U}=rx:{A}", "--", "/bin/true"],
        "run-branch-twice": [*R, f"{U}:{A}:{U}", "--", "/bin/true"],
        "run-nonutf8-branch-missing": [*R, f"{U}:".encode() + x + b"/n\xff", "--", "/bin/true"],
        "run-nonutf8-upper-missing": [*R, x + b"/U\xff:" + A.encode(), "--", "/bin/true"],
        "run-nonutf8-branch-is-a-file": [*R, f"{U}:".encode() + x + b"/f\xff", "--", "/bin/true"],
        "run-nonutf8-relative-workdir": [*R, "-w", b"t\xff", f"{U}:{A}", "--", "/bin/true"],
        "run-nonutf8-hostname": [*R, "--hostname", b"h\xff", f"{U}:{A}", "--", "/bin/true"],
        "run-nonutf8-env-without-key": [*R, "-e", b"=\xff", f"{U}:{A}", "--", "/bin/true"],
        # unionfs conformance
        "conformance-base-missing": [*C, "--base", f"{a}/nope"],
        "conformance-base-is-a-file": [*C, "--base", f"{A}/a"],
        "conformance-nonutf8-base-missing": [*C, "--base", x + b"/n\xff"],
        "conformance-nonutf8-out-is-a-file": [*C, "--out", x + b"/f\xff"],
        "conformance-nonutf8-lower-missing": [*C, "--run", "true", "--lower", x + b"/n\xff"],
        "conformance-run-without-lower": [*C, "--run", "true"],
        "conformance-negative-sequences": [UNIONFS, "conformance", "--sequences", "-1"],
        "conformance-zero-steps": [UNIONFS, "conformance", "--sequences", "1", "--steps", "0"],
        "conformance-negative-first": [*C, "--first", "-3"],
        "conformance-bad-layers": [*C, "--layers", "3-1"],
        "conformance-run-timeout-nan": [*C, "--run", "true", "--lower", A, "--run-timeout", "nan"],
        "conformance-run-timeout-negative": [*C, "--run", "true", "--lower", A, "--run-timeout", "-1"],
        "conformance-shrink-seconds-inf": [*C, "--shrink-seconds", "inf"],
        "conformance-bad-impl": [*C, "--impl-a", "zfs"],
        "conformance-unknown-option": [*C, "--frobnicate"],
    }


# Bad command lines that exit 2 (a malformed command line, as click's usage errors); the rest exit 1,
# or for `unionfs run` 2 when the command line is at fault and 125 (as docker and podman) otherwise.
BAD_EXIT = {
    **dict.fromkeys([
        "mount-three-arguments", "mount-no-arguments", "mount-dash-o-last", "mount-log-file-last",
        "mount-unknown-short-flag", "mount-log-file-is-a-dir", "mount-nonutf8-log-file-is-a-dir",
        "umount-no-argument", "umount-two-arguments", "umount-unknown-flag",
        "overlay-dash-o-without-value", "overlay-unknown-flag",
        "overlay-unknown-flag-alone", "overlay-three-positionals", "overlay-nonutf8-flag",
        "conformance-nonutf8-out-is-a-file", "conformance-nonutf8-lower-missing",
        "conformance-run-without-lower", "conformance-negative-sequences", "conformance-zero-steps",
        "conformance-negative-first", "conformance-bad-layers", "conformance-run-timeout-nan",
        "conformance-run-timeout-negative", "conformance-shrink-seconds-inf", "conformance-bad-impl",
        "conformance-unknown-option", "conformance-base-missing", "conformance-base-is-a-file",
        "conformance-nonutf8-base-missing",
    ], 2),
}


def _bad_exit(name: str) -> int:
    return BAD_EXIT.get(name, 2 if name.startswith("run-") else 1)




def test_unionfs_overlay_without_mountpoint_is_one_line(bad_area: Path) -> None:
    a = bad_area
    r = subprocess.run([OVERLAY, "-o", f"lowerdir={a}/A,upperdir={a}/U,workdir={a}/W"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


def test_foreground_mount_with_unusable_log_file_is_one_line(bad_area: Path) -> None:
    a = bad_area
    r = subprocess.run([UNIONFS, "mount", "-f", "--log-file", f"{a}/nodir/log", f"{a}/A:{a}/B", f"{a}/M"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not util.is_mounted(a / "M")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture
def bad_area(tmp_path: Path, need_fuse: None) -> Iterator[Path]:
    a = tmp_path / "area"
    for n in "ABUWM":
        (a / n).mkdir(parents=True)
    (a / "A" / "a").write_bytes(b"a\n")
    (a / "A" / "sub").mkdir()
    (a / "B" / "b").write_bytes(b"b\n")
    os.symlink(a / "A" / "a", a / "linkfile")
    x = os.fsencode(str(a))
    os.mkdir(x + b"/A/sub\xff")
    os.mkdir(x + b"/d\xff")
    with open(x + b"/f\xff", "wb") as f:
        f.write(b"f\n")
    util.fix_times(os.fsencode(str(a)))
    yield a
    prefix = os.fsencode(str(a))
    for mp, _t, _s in reversed(util.mounts()):
        if mp == prefix or mp.startswith(prefix + b"/"):
            util.umount(os.fsdecode(mp))
    util.kill_daemons(str(a))


def test_bad_input_matrix(bad_area: Path) -> None:
    """Each case: exactly one line on stderr, no traceback, a non-zero exit, nothing mounted, no
    daemon left, and the area (names, types, modes, content, mtimes, ctimes, inode numbers)
    unchanged. The failures are collected, so one run shows them all."""
    from unionfs.server.daemon import pidfile_for

    cases = _bad_cases(bad_area)
    assert len(cases) >= 60
    failures = []
    prefix = os.fsencode(str(bad_area))
    state_before = util.layer_state(bad_area)
    pidfile = pidfile_for(str(bad_area / "M"))
    state_files = [pidfile, pidfile.removesuffix(".pid") + ".log"]
    t0 = time.monotonic()
    for name, args in cases.items():
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        problems = []
        if r.returncode != _bad_exit(name):
            problems.append(f"exit {r.returncode}, not {_bad_exit(name)}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        if "Traceback" in r.stderr:
            problems.append("traceback")
        mounted = [mp for mp, _t, _s in util.mounts() if mp == prefix or mp.startswith(prefix + b"/")]
        if mounted:
            problems.append(f"mounted {mounted}")
            for mp in reversed(mounted):
                util.umount(os.fsdecode(mp))
        if util.wait_daemons_gone(str(bad_area), timeout=5):
            problems.append("daemon left")
            util.kill_daemons(str(bad_area))
        now = util.layer_state(bad_area)
        if now != state_before:
            changed = sorted(set(now) ^ set(state_before)) or [k for k in now if now[k] != state_before.get(k)]
            problems.append(f"changed {changed[:5]}")
            state_before = now
        left = [f for f in state_files if os.path.lexists(f)]
        if left:
            problems.append(f"left {left}")
            for f in left:
                os.unlink(f)
        if problems:
            failures.append(f"{name}: {', '.join(problems)}; rc={r.returncode} stderr={r.stderr.strip()[:300]!r}")
    figure("bad_input", cases=len(cases), failures=len(failures), seconds=round(time.monotonic() - t0, 1))
    assert not failures, "\n".join(failures)
