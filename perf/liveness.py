"""Liveness: does one long system call through the mount stall the requests of others?

Usage (as root):
    .venv/bin/python perf/liveness.py [--reps 3] [--impls kernel,fuse-overlayfs,unionfs]
                                      [--only fsync,read,copyup,punch,unlink] [--size-mib 1536] [--out DIR]

For each scenario, repetition and implementation (in an order that rotates every repetition) the layers
are mounted fresh (`mounts.mount`, as perf/bench.py does), and while one thread runs the long call a
prober thread stats a different file of the union every PROBE_INTERVAL and records each stat's
latency.  Every stat names a file not looked up before, so each one reaches the FUSE server.

  fsync   write SIZE to a new file through the mount (1 MiB writes, not counted), then at once fsync it
  read    `drop_caches`, then read a 1 GiB lower file through the mount in 1 MiB reads
  copyup  `drop_caches`, then open the 1 GiB lower file for appending: the open copies it up
  punch   write SIZE to a new file as for fsync, then at once punch a hole over all of it (fallocate
          PUNCH_HOLE|KEEP_SIZE): the blocks are freed, the dirty pages written back first
  unlink  write SIZE to a new file and fsync it (not counted), then unlink it: the blocks are freed

Reported per scenario and implementation (medians over repetitions): the long call's duration, the
worst and the 99th-percentile latency of the stats in progress at some time while it ran, and how
many there were; then unionfs / fuse-overlayfs and unionfs / kernel ratios of each (medians of
per-repetition ratios).  Everything lives under /var/tmp/unionfs-liveness, on the machine's disk
(where fsync really writes), apart from perf/bench.py's directory and its stale-mount sweep.
See perf/README.md, section "Liveness".
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mounts
from mounts import cleanup_stale_mounts, mount
from spec import GIB, MIB

PERF_DIR = Path(__file__).resolve().parent
LAYERS = Path("/var/tmp/unionfs-liveness")
# The mount helpers' run directories and stale-mount sweep: ours, not perf/bench.py's.
mounts.BASE_DIR = LAYERS
SCENARIOS = ("fsync", "read", "copyup", "punch", "unlink")
IMPLS = ("kernel", "fuse-overlayfs", "unionfs")
PROBE_FILES = 20_000
PROBE_INTERVAL = 0.002  # seconds between two stats
BIG_LOWER = 1 * GIB
CHUNK = 1 * MIB


@dataclass
class Run:
    """One scenario on one implementation: the long call and the stats made while it ran."""

    scenario: str
    impl: str
    rep: int
    duration: float  # seconds
    dirty_mib: float  # the machine's dirty page cache as the call began (what an fsync may write)
    latencies: list[float] = field(default_factory=list)  # seconds, of the stats overlapping the call

    # No stat in progress during the call (a call shorter than PROBE_INTERVAL): none waited.
    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    @property
    def p99(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as knob:
        knob.write("3")


def ensure_layers() -> Path:
    """The lower layer (built once): `probe/` with PROBE_FILES empty files, `big.bin` of BIG_LOWER bytes."""
    lower = LAYERS / "lower"
    stamp = LAYERS / f"stamp-{PROBE_FILES}-{BIG_LOWER}"
    if stamp.exists():
        return lower
    print(f"building the layers under {LAYERS} ...", flush=True)
    probe = lower / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    for i in range(PROBE_FILES):
        (probe / f"f{i:05d}").touch()
    block = os.urandom(CHUNK)
    with open(lower / "big.bin", "wb") as out:
        for _ in range(BIG_LOWER // CHUNK):
            out.write(block)
    os.sync()
    stamp.touch()
    return lower


class Prober:
    """Stats files of `root/probe` one after the other, each once, on its own thread, until stopped."""

    def __init__(self, root: Path) -> None:
        self.names = [os.fsencode(root / "probe" / f"f{i:05d}") for i in range(PROBE_FILES)]
        self.samples: list[tuple[float, float]] = []  # (start, latency)
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._parked = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prober", daemon=True)

    def _loop(self) -> None:
        for name in self.names:
            if not self._go.is_set():
                self._parked.set()
                self._go.wait()
            if self._stop.is_set():
                return
            start = time.perf_counter()
            os.stat(name)
            self.samples.append((start, time.perf_counter() - start))
            self._stop.wait(PROBE_INTERVAL)
        print("warning: the prober ran out of files", file=sys.stderr)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._go.set()
        self._thread.join()

    def pause(self) -> None:
        """Wait until the stat in progress (if any) has returned; stat no more until `resume`."""
        self._parked.clear()
        self._go.clear()
        if not self._parked.wait(600):
            raise RuntimeError("a stat did not return within 600 s")

    def resume(self) -> None:
        self._go.set()

    def during(self, start: float, end: float) -> list[float]:
        """Latencies of the stats that were in progress at some time between *start* and *end*."""
        return [lat for t, lat in self.samples if t < end and t + lat > start]


def dirty_mib() -> float:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) / 1024
    return float("nan")


Measured = tuple[float, float, list[float]]  # duration, dirty MiB at its start, stat latencies


def measure(root: Path, call: Callable[[], None], before: Callable[[], None] | None = None) -> Measured:
    """Run `call` while the prober stats; its duration, the dirty page cache as it began, and the
    latencies of the stats made meanwhile.  *before* runs first, with the prober going but not
    counted, so that `call` follows it at once (the machine's writeback drains dirty pages fast);
    a stat still waiting behind *before* is let finish first, so that it does not count for `call`."""
    with Prober(root) as prober:
        time.sleep(20 * PROBE_INTERVAL)  # the prober is going
        if before is not None:
            before()
            prober.pause()
            prober.resume()
        dirty = dirty_mib()
        start = time.perf_counter()
        call()
        end = time.perf_counter()
    return end - start, dirty, prober.during(start, end)


def write_fd(fd: int, size: int) -> None:
    block = os.urandom(CHUNK)
    for _ in range(size // CHUNK):
        os.write(fd, block)


def scenario_fsync(root: Path, size: int) -> Measured:
    fd = os.open(root / "dirty.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return measure(root, lambda: os.fsync(fd), before=lambda: write_fd(fd, size))
    finally:
        os.close(fd)


def scenario_read(root: Path, size: int) -> Measured:
    drop_caches()
    buf = bytearray(CHUNK)

    def read_all() -> None:
        with open(root / "big.bin", "rb", buffering=0) as f:
            total = 0
            while n := f.readinto(buf):
                total += n
        if total != BIG_LOWER:
            raise RuntimeError(f"read {total} bytes of {BIG_LOWER}")

    return measure(root, read_all)


def scenario_copyup(root: Path, size: int) -> Measured:
    drop_caches()

    def copy_up() -> None:
        os.close(os.open(root / "big.bin", os.O_WRONLY | os.O_APPEND))

    result = measure(root, copy_up)
    if os.stat(root / "big.bin").st_size != BIG_LOWER:
        raise RuntimeError("copy-up changed the size")
    return result


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def scenario_punch(root: Path, size: int) -> Measured:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(root / "dirty.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def punch() -> None:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")

    try:
        return measure(root, punch, before=lambda: write_fd(fd, size))
    finally:
        os.close(fd)


def scenario_unlink(root: Path, size: int) -> Measured:
    path = root / "dirty.bin"

    def write_and_sync() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_fd(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    return measure(root, lambda: os.unlink(path), before=write_and_sync)


SCENARIO_FN = {"fsync": scenario_fsync, "read": scenario_read, "copyup": scenario_copyup,
               "punch": scenario_punch, "unlink": scenario_unlink}


def run_one(scenario: str, impl: str, rep: int, lower: Path, size: int) -> Run:
    with mount(impl, [lower], None, lower) as view:
        duration, dirty, latencies = SCENARIO_FN[scenario](view.root, size)
    os.sync()  # the next run does not pay for this one's dirty pages
    return Run(scenario, impl, rep, duration, dirty, latencies)


def median_ratio(runs: list[Run], scenario: str, num: str, den: str, metric: Callable[[Run], float]) -> float:
    ratios = []
    for rep in sorted({r.rep for r in runs}):
        by = {r.impl: r for r in runs if r.scenario == scenario and r.rep == rep}
        if num in by and den in by and metric(by[den]) > 0:
            ratios.append(metric(by[num]) / metric(by[den]))
    return statistics.median(ratios) if ratios else float("nan")


METRICS: dict[str, Callable[[Run], float]] = {
    "call s": lambda r: r.duration,
    "worst stat ms": lambda r: r.worst * 1e3,
    "p99 stat ms": lambda r: r.p99 * 1e3,
}


def report(runs: list[Run], scenarios: list[str], impls: list[str]) -> str:
    head = f"{'scenario':<8} {'impl':<15} {'call s':>8} {'worst stat ms':>14} {'p99 stat ms':>12}"
    lines = [f"{head} {'stats':>6} {'dirty MiB':>9}"]
    for sc in scenarios:
        for impl in impls:
            mine = [r for r in runs if r.scenario == sc and r.impl == impl]
            if not mine:
                continue
            row = [statistics.median(m(r) for r in mine) for m in METRICS.values()]
            count = statistics.median(len(r.latencies) for r in mine)
            dirty = statistics.median(r.dirty_mib for r in mine)
            lines.append(f"{sc:<8} {impl:<15} {row[0]:>8.2f} {row[1]:>14.1f} {row[2]:>12.1f} {count:>6.0f}"
                         f" {dirty:>9.0f}")
        for den in ("fuse-overlayfs", "kernel"):
            if "unionfs" in impls and den in impls:
                ratios = [median_ratio(runs, sc, "unionfs", den, m) for m in METRICS.values()]
                label = f"unionfs/{'fuse-ovl' if den == 'fuse-overlayfs' else den}"
                cells = f"{ratios[0]:>7.2f}x {ratios[1]:>13.2f}x {ratios[2]:>11.2f}x"
                lines.append(f"{'':<8} {label:<15} {cells}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--size-mib", type=int, default=1536, help="bytes written before the fsync, MiB")
    parser.add_argument("--out", type=Path, default=PERF_DIR / "results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (mounts, drop_caches)")
    impls = args.impls.split(",")
    scenarios = args.only.split(",")
    for name in impls:
        if name not in IMPLS:
            parser.error(f"unknown implementation {name!r}")
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    cleanup_stale_mounts()
    lower = ensure_layers()
    runs: list[Run] = []
    for rep in range(args.reps):
        for sc in scenarios:
            order = impls[rep % len(impls):] + impls[: rep % len(impls)]
            for impl in order:
                r = run_one(sc, impl, rep, lower, args.size_mib * MIB)
                runs.append(r)
                print(f"rep {rep} {sc:<6} {impl:<15} call {r.duration:6.2f} s  worst stat "
                      f"{r.worst * 1e3:7.1f} ms  p99 {r.p99 * 1e3:6.1f} ms  ({len(r.latencies)} stats, "
                      f"{r.dirty_mib:.0f} MiB dirty)", flush=True)
    text = report(runs, scenarios, impls)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    head = (f"liveness {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
            f"{os.cpu_count()} CPUs, kernel {platform.release()}, load {os.getloadavg()[0]:.2f}, "
            f"fsync of {args.size_mib} MiB, {args.reps} repetitions")
    print("\n" + head + "\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"liveness-{stamp}.txt").write_text(head + "\n" + text + "\n")
    (args.out / f"liveness-{stamp}.json").write_text(json.dumps(
        [asdict(r) | {"worst": r.worst, "p99": r.p99} for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
