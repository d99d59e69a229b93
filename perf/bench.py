"""unionfs side by side with a native directory, kernel overlayfs and fuse-overlayfs.

Usage (as root):
    .venv/bin/python perf/bench.py [--quick] [--only W1,W3] [--impls ...] [--reps 3] [--out perf/results]

Builds the layers once (cached under /var/tmp/unionfs-perf), then for each repetition, workload and
implementation (in a rotating order) mounts the layers fresh, runs the workload in a child process,
validates its output, and unmounts. Prints the table of medians and per-repetition ratios and the
targets; writes the raw numbers (CSV, JSON), the table and a PNG chart of the ratios under --out.
See perf/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import profiling
from layerset import LayerSet, ensure_layers, restore_native
from mounts import IMPLEMENTATIONS, MountError, cleanup_stale_mounts, mount, stop_stuck_server
from report import Record, summarise, table, write_outputs
from spec import FULL, QUICK, Layout
from validate import check, check_layers_after

PERF_DIR = Path(__file__).resolve().parent
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W10", "W9")
LABELS = {
    "W1": "find+stat",
    "W2": "read big",
    "W3": "tar c",
    "W4": "copy-up",
    "W5": "",
    "W6": "ls",
    "W7": "",
    "W8": "",
    "W10": "",
}
VARIANTS = {
    "W1": ["cold", "warm"],
    "W2": ["cold", "lower-warm", "warm"],
    "W3": ["cold", "warm"],
    "W4": ["small", "big"],
    "W5": ["create", "delete"],
    "W6": ["cold", "warm"],
    "W7": ["untar"],
    "W8": ["cold", "warm"],
    "W10": ["write 4k", "read 4k random", "write 1m"],
}
WRITES_NATIVE = {"W4", "W5", "W7", "W10"}


@dataclass
class Case:
    """One mount of one workload: the layers to mount and what the worker gets."""

    workload: str
    lowers: list[Path]
    upper_template: Path | None
    native_root: Path | None  # None: the native directory has no equivalent (W8 with several branches)
    params: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""

    def metric(self, variant: str) -> str:
        return " ".join(part for part in (self.workload, self.prefix, variant) if part)


def cases_for(workload: str, layers: LayerSet) -> list[Case]:
    layout = layers.layout
    label = LABELS[workload]
    if workload == "W8":
        return [
            Case(
                "W8",
                layers.branches(n),
                None,
                layers.branches_root / "0" if n == 1 else None,
                {"branches": n},
                f"N={n}",
            )
            for n in layout.sizes.branch_counts
        ]
    every_params: dict[str, dict[str, Any]] = {
        "W2": {"lower_file": str(layers.bottom / "big/read.bin")},
        "W4": {"targets": [f.rel for f in layout.copyup_targets]},
        "W5": {"count": layout.sizes.create_files, "size": layout.sizes.create_size},
        "W7": {"tarball": str(layers.tarball)},
        "W10": {"lower_file": str(layers.bottom / "big/read.bin"), "big_read": layout.sizes.big_read,
                "small_writes": layout.sizes.small_writes, "random_reads": layout.sizes.random_reads,
                "big_write": layout.sizes.big_write},
    }
    params = every_params.get(workload, {})
    return [Case(workload, layers.lowers, layers.upper_template, layers.native, params, label)]


class Bench:
    """Runs the cases, collecting a Record per (repetition, metric, implementation)."""

    def __init__(
        self,
        layers: LayerSet,
        impls: list[str],
        timeout: float,
        profile: Path | None = None,
        unionfs_options: str = "",
    ) -> None:
        self.unionfs_options = unionfs_options
        self.layers = layers
        self.impls = impls
        self.timeout = timeout
        self.profile = profile  # where py-spy stacks of the unionfs daemon go, per case
        self.records: list[Record] = []
        self.disabled: dict[str, str] = unavailable_impls(impls)

    def run_round(self, rep: int, workloads: list[str]) -> None:
        shift = rep % len(self.impls)
        order = self.impls[shift:] + self.impls[:shift]
        for workload in workloads:
            for case in cases_for(workload, self.layers):
                for impl in order:
                    self.run_case(rep, case, impl)

    def run_case(self, rep: int, case: Case, impl: str) -> None:
        variants = VARIANTS[case.workload]
        if impl == "native" and case.native_root is None:
            return
        if impl in self.disabled:
            self.fail(rep, case, impl, variants, self.disabled[impl])
            return
        started = time.monotonic()
        try:
            times, problems = self.measure(case, impl)
        except MountError as exc:
            self.disabled[impl] = f"mount failed: {exc}"
            self.fail(rep, case, impl, variants, self.disabled[impl])
            return
        except WorkerError as exc:
            self.fail(rep, case, impl, variants, str(exc))
            return
        for variant in variants:
            seconds, problem = times.get(variant), problems.get(variant)
            error = f"invalid output: {problem}" if problem else ""
            self.records.append(
                Record(rep, case.workload, case.metric(variant), impl, None if error else seconds, error)
            )
        outcome = {v: (times.get(v), problems.get(v)) for v in variants}
        progress(rep, case, impl, outcome, time.monotonic() - started)

    def measure(self, case: Case, impl: str) -> tuple[dict[str, float], dict[str, str | None]]:
        native = case.native_root or self.layers.native
        if impl == "native" and case.workload in WRITES_NATIVE:
            restore_native(self.layers)
        try:
            with mount(impl, case.lowers, case.upper_template, native, self.unionfs_options) as view:
                request = {"workload": case.workload, "root": str(view.root), "params": case.params}
                with self.sampling(impl, case, view.daemon_pid):
                    result = run_worker(request, self.timeout, lambda: stop_stuck_server(view))
            layer_problem = check_layers_after(case.workload, view.upper, self.layers)
        finally:
            if impl == "native" and case.workload in WRITES_NATIVE:
                restore_native(self.layers)
        problems: dict[str, str | None] = {}
        for key, observed in result["obs"].items():
            variant = key.split("#")[0]  # "warm#2": the second warm run, validated like the first
            problem = layer_problem or check(case.workload, variant, observed, self.layers, case.params)
            problems[variant] = problems.get(variant) or problem
        return result["times"], problems

    def sampling(self, impl: str, case: Case, pid: int | None) -> AbstractContextManager[None]:
        if self.profile is None or impl != "unionfs":
            return nullcontext()
        return profiling.sampled(pid, self.profile / f"{case.metric('').replace(' ', '-')}.txt")

    def fail(self, rep: int, case: Case, impl: str, variants: list[str], error: str) -> None:
        for variant in variants:
            self.records.append(Record(rep, case.workload, case.metric(variant), impl, None, error))
        print(f"  [rep {rep + 1}] {case.metric('')} {impl}: n/a ({error})", file=sys.stderr, flush=True)


class WorkerError(Exception):
    """The workload failed or timed out; the message is one line for the report."""


def run_worker(request: dict[str, Any], timeout: float, on_timeout: Callable[[], None]) -> dict[str, Any]:
    process = subprocess.Popen(
        [sys.executable, str(PERF_DIR / "worker.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = process.communicate(json.dumps(request).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        on_timeout()  # a request stuck in our FUSE mount would block the kill
        process.kill()
        process.communicate()
        raise WorkerError(f"timed out after {timeout:.0f} s") from None
    except BaseException:  # interrupted (SIGINT/SIGTERM): the worker must not outlive the mount
        process.kill()
        process.wait()
        raise
    if process.returncode != 0:
        lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        raise WorkerError(f"workload failed: {lines[-1].strip() if lines else process.returncode}")
    result: dict[str, Any] = json.loads(stdout)
    return result


def unavailable_impls(impls: list[str]) -> dict[str, str]:
    missing: dict[str, str] = {}
    if "fuse-overlayfs" in impls and not shutil.which("fuse-overlayfs"):
        missing["fuse-overlayfs"] = "fuse-overlayfs is not installed"
    unionfs = PERF_DIR.parent / ".venv/bin/unionfs"
    if "unionfs" in impls and not unionfs.exists():
        missing["unionfs"] = f"{unionfs} not found"
    return missing


def progress(
    rep: int, case: Case, impl: str, outcome: dict[str, tuple[float | None, str | None]], wall: float
) -> None:
    parts = []
    for variant, (seconds, problem) in outcome.items():
        parts.append(f"{variant} INVALID ({problem})" if problem else f"{variant} {seconds:.3f} s")
    line = f"  [rep {rep + 1}] {case.metric('')} {impl}: {', '.join(parts)} (case took {wall:.1f} s)"
    print(line, file=sys.stderr, flush=True)


# W9 ------------------------------------------------------------------------------------------------


def run_w9(quick: bool, timeout: float) -> tuple[dict[str, list[float]] | None, str]:
    """W9 from perf/launch_latency.py (the launcher's script): run it and read its table of medians.

    Returns {"<row> to exec": [seconds], "<row> total": [seconds]} for each row it measured, e.g.
    "unionfs run (fuse) to exec" and "unshare --root total"; or None and why not.
    """
    script = PERF_DIR / "launch_latency.py"
    if not script.exists():
        return None, "perf/launch_latency.py not present yet"
    command = [sys.executable, str(script), "--runs", "5" if quick else "20"]
    # Files, not pipes: daemons started by the launcher must not hold our read end open.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            code = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            return None, f"launch_latency timed out after {timeout:.0f} s"
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        return None, f"launch_latency failed: {lines[-1] if lines else code}"
    rows = parse_latency_table(stdout)
    return (rows, "") if rows else (None, "launch_latency printed no measurements")


LATENCY_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<exec>[\d.]+|-)\s+(?P<total>[\d.]+|-)\s*$")


def parse_latency_table(text: str) -> dict[str, list[float]]:
    """Rows of launch_latency's table ("name  to-exec-ms  total-ms", "-" when not measured) in seconds."""
    rows: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = LATENCY_ROW.match(line)
        if not match:
            continue
        for column in ("exec", "total"):
            if match[column] != "-":
                label = "to exec" if column == "exec" else "total"
                rows[f"{match['name']} {label}"] = [float(match[column]) / 1000]
    return rows


def print_profiles(directory: Path) -> None:
    report = []
    for path in sorted(directory.glob("*.txt")):
        if path.name == "summary.txt":
            continue
        report.append(f"{path.stem}:\n{profiling.summarise(profiling.read_stacks(path))}")
    text = "\n\n".join(report) or "no stacks recorded (the daemon's pid was not found, or py-spy is missing)"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.txt").write_text(text + "\n")
    print(f"\nunionfs daemon profile (py-spy):\n{text}")


# Main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 repetition (a smoke test)")
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help="workloads to run, e.g. W1,W3 (default all)"
    )
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="implementations, comma-separated")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, or 1 with --quick)")
    parser.add_argument("--out", type=Path, default=PERF_DIR / "results", help="where results are written")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample the unionfs daemon with py-spy into this directory (implies --impls unionfs, 1 rep)",
    )
    parser.add_argument(
        "--unionfs-options", default="", help="extra -o options for unionfs only, e.g. timeout=3600"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per workload run")
    args = parser.parse_args(argv)
    args.only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for name in args.only:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name}; choose from {', '.join(WORKLOADS)}")
    for impl in args.impls:
        if impl not in IMPLEMENTATIONS:
            parser.error(f"unknown implementation {impl}; choose from {', '.join(IMPLEMENTATIONS)}")
    if args.profile is not None:
        args.impls = ["unionfs"]
        args.reps = args.reps or 1
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.timeout is None:
        args.timeout = 120.0 if args.quick else 600.0
    return args


def cpu_stall_microseconds() -> int:
    """Total time some task waited for a CPU (Linux PSI), to show how busy the machine was; 0 if unknown."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return 0
    return int(some.rsplit("total=", 1)[1])


def machine_context(args: argparse.Namespace, layout: Layout) -> dict[str, Any]:
    def output(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": layout.sizes.name,
        "reps": args.reps,
        "machine": f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem_kib / 2**20:.0f} GiB",
        "kernel": platform.release(),
        "os": output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "fuse-overlayfs": output(["sh", "-c", "fuse-overlayfs --version 2>&1 | grep -m1 '^fuse-overlayfs'"]),
        "unionfs commit": output(["git", "-C", str(PERF_DIR.parent), "rev-parse", "--short", "HEAD"]),
        "unionfs extra options": args.unionfs_options,
        "sizes": layout.sizes.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("perf/bench.py needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every mount is unmounted in finally
    started = time.monotonic()
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    stall_at_start = cpu_stall_microseconds()
    stale = cleanup_stale_mounts()
    if stale:
        print(f"unmounted leftovers of an earlier run: {', '.join(stale)}", file=sys.stderr)
    layout = Layout(QUICK if args.quick else FULL)
    layers = ensure_layers(layout)
    restore_native(layers)
    bench = Bench(layers, args.impls, args.timeout, args.profile, args.unionfs_options)
    try:
        for rep in range(args.reps):
            bench.run_round(rep, [w for w in args.only if w != "W9"])
    finally:
        left = cleanup_stale_mounts()
        if left:
            print(f"WARNING: had to force-unmount {', '.join(left)}", file=sys.stderr)
    w9, w9_error = run_w9(args.quick, args.timeout) if "W9" in args.only else (None, "")
    if w9_error:
        print(f"W9: n/a ({w9_error})", file=sys.stderr)
    summary = summarise(bench.records, w9)
    context = machine_context(args, layout)
    context["elapsed seconds"] = round(time.monotonic() - started, 1)
    context["load average at start"] = load_at_start
    stall = cpu_stall_microseconds() - stall_at_start
    context["cpu pressure percent"] = round(100 * stall / 1e6 / context["elapsed seconds"], 1)
    context["load average at end"] = Path("/proc/loadavg").read_text().split()[0]
    heading = (
        f"unionfs perf, {context['mode']} mode, {args.reps} rep(s), {context['date']}\n"
        f"{context['machine']}, Linux {context['kernel']}, {context['os']}, {context['fuse-overlayfs']}\n"
        f"times are medians over repetitions; ratios are unionfs / reference within each repetition\n"
    )
    if args.unionfs_options:
        heading += f"unionfs mounted with extra options: {args.unionfs_options}\n"
    text = (
        heading + "\n" + table(summary, w9) + f"\n\nelapsed {context['elapsed seconds']:.0f} s; 1-min load "
        f"average {context['load average at start']} at start, {context['load average at end']} at end; "
        f"CPU pressure {context['cpu pressure percent']:.0f}% (share of the time some task waited for a CPU)"
    )
    print(text)
    written = write_outputs(
        args.out, time.strftime("%Y%m%d-%H%M%S", time.gmtime()), bench.records, summary, context, w9, text
    )
    print("wrote " + ", ".join(str(p) for p in written))
    if args.profile is not None:
        print_profiles(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
