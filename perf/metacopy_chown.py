"""``chown -R`` over a tree of big lower files: unionfs with and without ``-o metacopy=on``, beside
kernel overlayfs with metacopy=on (and off, for scale).

Builds FILES files of SIZE MiB (random data, in directories of 50) once under
/var/tmp/unionfs-perf/metacopy/, then for each repetition and implementation (the order rotating
every repetition) mounts a fresh upper, drops the caches, times ``chown -R 1:1 MNT``, and records
how much data the upper holds afterwards (st_blocks of its files).

    sudo .venv/bin/python perf/metacopy_chown.py                 # 1,000 files of 1 MiB, 3 repetitions
    sudo .venv/bin/python perf/metacopy_chown.py --files 200 --reps 5

Prints the median seconds, the upper's data, and the ratios of the medians per repetition
(unionfs ÷ kernel, both with metacopy=on; unionfs metacopy=on ÷ unionfs without).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from unionfs.conformance import harness

ROOT = Path("/var/tmp/unionfs-perf/metacopy")
UNIONFS = str(Path(sys.executable).with_name("unionfs"))
IMPLS = {
    "kernel metacopy=on": ("kernel", ["index=off", "redirect_dir=on", "metacopy=on"]),
    "kernel metacopy=off": ("kernel", ["index=off", "redirect_dir=off", "metacopy=off"]),
    "unionfs metacopy=on": ("unionfs", ["metacopy=on"]),
    "unionfs": ("unionfs", []),
}


def build(files: int, size_mib: int) -> Path:
    lower = ROOT / f"lower-{files}x{size_mib}"
    stamp = lower / ".complete"
    if stamp.exists():
        return lower
    shutil.rmtree(lower, ignore_errors=True)
    chunk = os.urandom(size_mib << 20)
    for i in range(files):
        d = lower / f"d{i // 50:03d}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:05d}", "wb") as f:
            f.write(chunk[i % 4096:] + chunk[:i % 4096])   # each file its own content
    stamp.touch()
    return lower


def upper_bytes(upper: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(upper):
        for n in names:
            total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def one(impl: str, lower: Path) -> tuple[float, int]:
    kind, options = IMPLS[impl]
    run = ROOT / "run"
    shutil.rmtree(run, ignore_errors=True)
    upper, work, mnt = run / "upper", run / "work", run / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    proc = None
    if kind == "kernel":
        harness.mount_overlay([lower], upper, work, mnt, options)
    else:
        opts = ",".join(harness.overlay_options([lower], upper, work) + options)
        cmd = [UNIONFS, "mount", "-f", "-o", opts, str(mnt)]
        proc = harness.start_daemon(cmd, mnt, run.parent / "daemon.log")
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        start = time.perf_counter()
        subprocess.run(["chown", "-R", "1:1", str(mnt)], check=True)
        seconds = time.perf_counter() - start
    finally:
        if kind == "kernel":
            harness.run_helper(["umount", str(mnt)])
        else:
            harness.unmount(mnt, proc)
    return seconds, upper_bytes(upper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1, help="MiB per file")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (mounts, drop_caches)")
    os.environ.setdefault("UNIONFS_SERVER", "off")
    lower = build(args.files, args.size)
    names = list(IMPLS)
    times: dict[str, list[float]] = {n: [] for n in names}
    data: dict[str, int] = {}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for impl in order:
            seconds, used = one(impl, lower)
            times[impl].append(seconds)
            data[impl] = used
            print(f"rep {rep + 1} {impl:22} {seconds:7.3f} s  upper {used / (1 << 20):9.1f} MiB", flush=True)
    print(f"\nchown -R over {args.files} files of {args.size} MiB, median of {args.reps}:")
    for impl in names:
        mib = data[impl] / (1 << 20)
        print(f"  {impl:22} {statistics.median(times[impl]):7.3f} s   upper data {mib:9.1f} MiB")

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    for a, b in (("unionfs metacopy=on", "kernel metacopy=on"), ("unionfs metacopy=on", "unionfs"),
                 ("unionfs", "kernel metacopy=off")):
        print(f"  {a} / {b}: {ratio(a, b):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
