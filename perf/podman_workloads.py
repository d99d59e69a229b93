"""``podman build`` and ``podman run --rm`` on unionfs-overlay, fuse-overlayfs and the kernel's overlay.

podman's overlay driver three ways, each with a private store of its own (graph root under
/var/tmp/unionfs-wlperf/<impl>/, run root a short directory in /run, its own storage.conf and
containers.conf: the set-up of tests/images/test_podman.py, nothing of the host's storage touched):

  unionfs-overlay   overlay driver, ``mount_program = .venv/bin/unionfs-overlay``
  fuse-overlayfs    overlay driver, ``mount_program = fuse-overlayfs``
  kernel            overlay driver, the kernel's overlayfs

The base image is the Debian bookworm minbase root filesystem that tests/launcher/test_run_debian.py
builds and caches in /var/tmp/unionfs-test-cache (built when missing, which needs Debian's mirror),
imported into each store once per run (``podman import``).

Groups:

  build      ``podman build --no-cache`` of perf/containerfiles/build/Containerfile: COPY, then RUN
             steps of shell file operations (2,000 files of 4 KiB and 32 MiB in 4 KiB writes, a
             delete of lower files, a replaced directory, a rename); no network
  build-apt  the same with Containerfile.apt: ``apt-get update && apt-get install jq file`` then the
             delete, replaced directory and rename; host network, only with --network
  run        ``podman run --rm IMAGE true`` on the base image, --runs times per repetition

Every build is checked before it counts: a container of the built image runs files/check.sh and
every line must be what the Containerfile implies (computed here, not from another implementation),
and every RUN step must have run on the implementation's own filesystem (``fuse.unionfs``,
``fuse.fuse-overlayfs``, ``overlay``: a podman that fell back to another is caught).  Before each
repetition's ``run`` series one container reports the type of its root the same way.  An invalid or
failed run is reported n/a with its reason and never enters a median.

Implementations are interleaved in an order that rotates every repetition; ratios are taken within
each repetition.  Only the podman command is timed (the check, ``podman rmi`` and the pruning of
the build's intermediate images are not).

    sudo .venv/bin/python perf/podman_workloads.py                    # build and run, 3 repetitions
    sudo .venv/bin/python perf/podman_workloads.py --only run --reps 5 --runs 20
    sudo .venv/bin/python perf/podman_workloads.py --network --only build-apt

Writes ``podman-workloads-<UTC time>.{txt,json}`` under --out (default perf/results/).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("tests", "tests/images", "perf")]

from groups import REPO, VENV_BIN, Sample, Target, exclusive, header, machine, report, rotated, write_results  # noqa: E402
from run_workloads import debian_rootfs, mounted_under  # noqa: E402
from test_podman import BLOB_CACHE_DIR, Podman  # noqa: E402

IMPLS = ("unionfs-overlay", "fuse-overlayfs", "kernel")
GROUPS = ("build", "run", "build-apt")
DEFAULT_GROUPS = ("build", "run")
BASE = Path("/var/tmp/unionfs-wlperf")
IMAGE = "localhost/unionfs-perf-bookworm:latest"
BUILT = "localhost/unionfs-perf-built:latest"
CONTEXT = REPO / "perf" / "containerfiles" / "build"
FSTYPE = {"unionfs-overlay": "fuse.unionfs", "fuse-overlayfs": "fuse.fuse-overlayfs", "kernel": "overlay"}
RUN_STEPS = 4  # RUN lines in each Containerfile
SMALL_FILES = [(d, f) for d in range(40) for f in range(50)]  # as files/small-writes.sh makes them
BIG_SIZE = 8192 * 4096
BUILD_TIMEOUT = 1800.0
RUN_TIMEOUT = 120.0
ROOT_FSTYPE = "grep ' / / ' /proc/self/mountinfo | sed 's/.* - //' | cut -d' ' -f1"
TITLES = {
    "build": "podman build --no-cache of perf/containerfiles/build/Containerfile (no network)",
    "build-apt": "podman build --no-cache of Containerfile.apt (apt-get install jq file)",
    "run": "podman run --rm IMAGE true (Debian bookworm minbase)",
}
TARGETS = {
    "build": [Target("unionfs-overlay", "fuse-overlayfs", 1.0)],
    "build-apt": [Target("unionfs-overlay", "fuse-overlayfs", 1.0)],
    "run": [Target("unionfs-overlay", "kernel", 1.2)],
}


class RunError(Exception):
    """A run failed or its result was wrong; the message is one line for the report."""


def mount_program(impl: str) -> str | None:
    if impl == "unionfs-overlay":
        return str(VENV_BIN / "unionfs-overlay")
    if impl == "fuse-overlayfs":
        return shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
    return None


def cleanup_stale() -> None:
    """Unmount what an interrupted run left under BASE, and remove it."""
    for point in sorted(mounted_under(BASE), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(BASE, ignore_errors=True)


def podman(pm: Podman, argv: Sequence[str], timeout: float) -> tuple[float, str]:
    """Run ``podman ARGV`` in *pm*'s store; (seconds, stdout); RunError with its last error line."""
    t0 = time.monotonic()
    try:
        r = subprocess.run(["podman", *argv], env=pm.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, cwd="/")
    except subprocess.TimeoutExpired:
        raise RunError(f"podman {argv[0]} timed out after {timeout:.0f} s") from None
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        raise RunError(f"podman {argv[0]} exited {r.returncode}: {lines[-1] if lines else ''}")
    return seconds, r.stdout


def podman_build(pm: Podman, argv: Sequence[str], timeout: float) -> tuple[float, list[tuple[str, float]]]:
    """``podman build ARGV``: (seconds, [(step, seconds)]), each step timed from its "STEP i/n:" line
    to the next (the last one to the end: it includes the commit of the image)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["podman", "build", *argv], env=pm.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, cwd="/")
    killer = threading.Timer(timeout, proc.kill)  # our own child
    killer.start()
    marks: list[tuple[str, float]] = []
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("STEP "):
            marks.append((line.split(":", 1)[-1].strip()[:48], time.monotonic()))
        tail = [*tail[-20:], line.rstrip()]
    proc.wait()
    killer.cancel()
    end = time.monotonic()
    if proc.returncode != 0:
        lines = [line for line in tail if line.strip()]
        raise RunError(f"podman build exited {proc.returncode}: {lines[-1] if lines else ''}")
    steps = [(label, (marks[i + 1][1] if i + 1 < len(marks) else end) - t)
             for i, (label, t) in enumerate(marks)]
    return end - t0, steps


def step_table(steps: dict[tuple[str, str, int], list[tuple[str, float]]], group: str,
               impls: Sequence[str]) -> str:
    """Median seconds of each build step, per implementation (valid builds only)."""
    per: dict[str, dict[str, list[float]]] = {}
    labels: list[str] = []
    for (g, impl, _rep), got in steps.items():
        if g != group:
            continue
        for label, seconds in got:
            per.setdefault(impl, {}).setdefault(label, []).append(seconds)
            if label not in labels:
                labels.append(label)
    if not per:
        return ""
    shown = [i for i in impls if i in per]
    lines = [f"  build steps (s, medians): {'':24s}" + "".join(f"{i:>17s}" for i in shown)]
    for label in labels:
        lines.append(f"  {label:50s}" + "".join(
            f"{statistics.median(per[i][label]):17.2f}" if label in per[i] else f"{'-':>17s}" for i in shown))
    return "\n".join(lines)


def open_store(impl: str, tarball: Path) -> Podman:
    """A private podman store for *impl* with the base image imported."""
    pm = Podman(BASE / impl, mount_program(impl))
    if pm.mount_program is not None:
        opts = pm.graph_options()
        prog = opts.get("overlay.mount_program")
        if not (isinstance(prog, dict) and prog.get("Executable") == pm.mount_program):
            pm.close()
            raise RunError(f"podman does not use {pm.mount_program} as its mount program: {opts}")
    podman(pm, ["import", str(tarball), IMAGE], RUN_TIMEOUT * 5)
    return pm


# -- the checks -----------------------------------------------------------------------------------------

def expected_check(impl: str, apt: bool, rootfs: Path) -> dict[str, str]:
    """What files/check.sh must print in the built image, line by line (keyed by its first word)."""
    want = {
        "fstypes": " ".join([FSTYPE[impl]] * RUN_STEPS),
        "present": "",
        "absent": "/etc/issue.net /usr/share/doc /etc/debian_version /srv/data",
        "licenses": "NEW replaced",
        "renamed": (rootfs / "etc" / "debian_version").read_text().strip(),
    }
    if apt:
        want.update({"jq": "7", "file": "ELF"})
    else:
        block = "0" * 4000
        digest = hashlib.md5()
        for _path, (d, f) in sorted((f"/srv/data-renamed/d{d}/f{f}", (d, f)) for d, f in SMALL_FILES):
            digest.update(f"{d}/{f} {block}\n".encode())
        want.update({"files": str(len(SMALL_FILES)), "sum": digest.hexdigest(),
                     "big": f"{BIG_SIZE} {'00' * 16}"})
    return want


def parse_check(out: str) -> dict[str, str]:
    got: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.strip().partition(" ")
        got.setdefault(key, []).append(value.strip())
    return {k: " ".join(v) for k, v in got.items()}


def check_build(pm: Podman, impl: str, apt: bool, rootfs: Path) -> None:
    _, out = podman(pm, ["run", "--rm", "--pull=never", "--network=none", BUILT, "sh", "/opt/perf/check.sh"],
                    RUN_TIMEOUT)
    wrong = wrong_lines(out, expected_check(impl, apt, rootfs))
    if wrong:
        raise RunError("the built image is wrong: " + "; ".join(wrong))


def wrong_lines(out: str, want: dict[str, str]) -> list[str]:
    """What in check.sh's output *out* differs from *want*."""
    got = parse_check(out)
    return [f"{k}: {got.get(k, '(missing)')!r} != {v!r}" for k, v in want.items() if got.get(k, "") != v]


def check_root(pm: Podman, impl: str) -> None:
    _, out = podman(pm, ["run", "--rm", "--pull=never", "--network=none", IMAGE, "sh", "-c", ROOT_FSTYPE],
                    RUN_TIMEOUT)
    if out.strip() != FSTYPE[impl]:
        raise RunError(f"the container's / is {out.strip()!r}, not {FSTYPE[impl]}")


# -- one run --------------------------------------------------------------------------------------------

STEPS: dict[tuple[str, str, int], list[tuple[str, float]]] = {}


def build_once(pm: Podman, impl: str, apt: bool, rootfs: Path, rep: int) -> float:
    containerfile = CONTEXT / ("Containerfile.apt" if apt else "Containerfile")
    argv = ["--pull=never", "--no-cache", f"--network={'host' if apt else 'none'}",
            "-f", str(containerfile), "-t", BUILT, str(CONTEXT)]
    try:
        seconds, steps = podman_build(pm, argv, BUILD_TIMEOUT)
        check_build(pm, impl, apt, rootfs)
        STEPS[("build-apt" if apt else "build", impl, rep)] = steps
        return seconds
    finally:
        for argv in (["rmi", "-f", BUILT], ["image", "prune", "-f"]):
            subprocess.run(["podman", *argv], env=pm.env, capture_output=True, timeout=RUN_TIMEOUT)


def run_true(pm: Podman) -> float:
    return podman(pm, ["run", "--rm", "--pull=never", "--network=none", IMAGE, "true"], RUN_TIMEOUT)[0]


def measure(samples: list[Sample], group: str, impl: str, rep: int, action: Callable[[], float]) -> None:
    try:
        samples.append(Sample(group, impl, rep, action()))
    except RunError as e:
        samples.append(Sample(group, impl, rep, None, str(e)))


def run_group(group: str, impl: str, rep: int, pm: Podman, rootfs: Path, runs: int,
              samples: list[Sample]) -> None:
    if group == "run":
        try:
            check_root(pm, impl)
        except RunError as e:
            samples.append(Sample(group, impl, rep, None, str(e)))
            return
        for _ in range(runs):
            measure(samples, group, impl, rep, lambda: run_true(pm))
    else:
        measure(samples, group, impl, rep, lambda: build_once(pm, impl, group == "build-apt", rootfs, rep))
    mine = [s for s in samples if (s.group, s.impl, s.rep) == (group, impl, rep)]
    ok = sorted(s.seconds for s in mine if s.seconds is not None)
    errors = [s.error for s in mine if s.seconds is None]
    shown = f"{ok[len(ok) // 2] * 1000:.0f} ms" if ok else "n/a"
    print(f"  rep {rep + 1} {group:9s} {impl:16s} {shown}{' error: ' + errors[0] if errors else ''}",
          flush=True)


# -- main -----------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("podman_workloads: run as root (podman with private stores, mounts)", file=sys.stderr)
        return 2
    with exclusive(Path(f"{BASE}.lock")):
        return measure_all(argv)


def measure_all(argv: Sequence[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10, help="podman run --rm per implementation and repetition")
    ap.add_argument("--only", default="",
                    help=",".join(GROUPS) + " (default build,run; build-apt with --network)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=",".join(IMPLS))
    ap.add_argument("--network", action="store_true", help="also the build-apt group (Debian's mirror)")
    ap.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    args = ap.parse_args(argv)
    groups = ([g for g in args.only.split(",") if g]
              or [*DEFAULT_GROUPS, *(["build-apt"] if args.network else [])])
    impls = [i for i in args.impls.split(",") if i]
    unknown = [g for g in groups if g not in GROUPS] + [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")
    if "build-apt" in groups and not args.network:
        ap.error("build-apt needs Debian's mirror: add --network")
    missing = [t for t in ("podman", "runc", "tar") if shutil.which(t) is None]
    if missing:
        print(f"podman_workloads: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    info = machine()
    rootfs = debian_rootfs()
    cleanup_stale()
    made = [d for d in (Path("/var/lib/containers"), BLOB_CACHE_DIR) if not d.exists()]
    BASE.mkdir(parents=True)
    tarball = BASE / "bookworm.tar"
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], check=True)
    print(f"podman_workloads: {info['date_utc']}, load {info['load_start']:.2f}, base {rootfs}; "
          f"groups {','.join(groups)}", flush=True)
    stores: dict[str, Podman] = {}
    samples: list[Sample] = []
    skipped: dict[str, str] = {}
    try:
        for impl in impls:
            try:
                stores[impl] = open_store(impl, tarball)
            except (RunError, AssertionError) as e:
                skipped[impl] = str(e).splitlines()[0]
        running = [i for i in impls if i in stores]
        if "run" in groups:
            for impl in running:  # warm: the image's files in the page cache, podman's own start-up
                for _ in range(2):
                    measure([], "run", impl, -1, lambda: run_true(stores[impl]))  # noqa: B023
        for rep in range(args.reps):
            for group in groups:
                for impl in rotated(running, rep):
                    run_group(group, impl, rep, stores[impl], rootfs, args.runs, samples)
    finally:
        problems = [p for pm in stores.values() for p in pm.close()]
        cleanup_stale()
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
    head = header(info)
    parts = [head, ""]
    verdicts = []
    for group in groups:
        text, v = report(samples, group, TITLES[group], impls, args.reps, TARGETS[group])
        parts += [text, step_table(STEPS, group, impls), ""] if group != "run" else [text, ""]
        verdicts += v
    parts += [f"skipped {impl}: {why}" for impl, why in skipped.items()]
    parts += [f"left behind (cleaned up): {p}" for p in problems]
    text = "\n".join(parts).rstrip()
    print("\n" + text)
    txt = write_results(args.out, "podman-workloads", text,
                        {"machine": info, "reps": args.reps, "runs": args.runs, "groups": groups,
                         "skipped": skipped, "targets": verdicts,
                         "steps": [{"group": g, "impl": i, "rep": r, "steps": st}
                                   for (g, i, r), st in STEPS.items()]},
                        samples)
    print(f"wrote {txt} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
