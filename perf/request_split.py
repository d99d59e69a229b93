"""Where one FUSE request's cost goes in the unionfs server: kernel, libfuse, pyfuse3, trio, union logic.

Mounts unionfs (the normal path, ``UNIONFS_SERVER=off``, so that the serving process is the one whose
command line names the mount point: the same serving code as a resident server's worker) over a small
lower layer, and runs a workload on it three times:

  1. plain: the server's CPU time (/proc/PID/stat) and its number of replies (``perf stat`` of
     ``writev`` on the server's threads: one per answered request), hence CPU microseconds per request;
     the same for fuse-overlayfs on the same layers, for comparison;
  2. under ``perf record`` (cpu-clock samples of the server): the share of each shared object — the
     kernel, libfuse3, pyfuse3's extension, the libfuse shim, the interpreter (libpython), libc —
     and the kernel's busiest functions;
  3. under ``py-spy`` (``perf/profiling.py``): the share of the interpreter's time in trio's loop,
     pyfuse3's Python-level dispatch, unionfs' own code, and other.

Workloads: ``writes`` (the build group's RUN step: 2,000 files of 4 KiB, then 32 MiB in 4 KiB writes:
perf/containerfiles/build/files/small-writes.sh with its paths moved into the mount) and ``walk``
(``test -e`` of 2,000 lower files by path after a fresh mount: one LOOKUP each).

    sudo .venv/bin/python perf/request_split.py                 # both workloads
    sudo .venv/bin/python perf/request_split.py --only writes

Needs root, perf (linux-perf) for step 2, py-spy (the perf extra) for step 3; a step whose tool is
missing is skipped and said so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import profiling  # noqa: E402
from groups import REPO, VENV_BIN  # noqa: E402

WRITES = REPO / "perf" / "containerfiles" / "build" / "files" / "small-writes.sh"
TICK = os.sysconf("SC_CLK_TCK")
DSO_AREAS = (("kernel", "kernel"), ("libfuse3", "libfuse"), ("pyfuse3", "pyfuse3 (Cython)"),
             ("__init__.cpython", "pyfuse3 (Cython)"),
             ("_fuse_shim", "libfuse shim"), ("python3", "interpreter"), ("libpython", "interpreter"),
             ("libc", "libc"))


def cpu_seconds(pid: int) -> float:
    """user+sys of every thread of *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def workload(name: str, mnt: Path) -> list[str]:
    if name == "writes":
        script = WRITES.read_text().replace("/srv/data", str(mnt / "data"))
        return ["sh", "-c", script]
    names = " ".join(f"{mnt}/tree/d{d}/f{f}" for d in range(40) for f in range(50))
    return ["sh", "-c", f"for p in {names}; do [ -e $p ] || exit 1; done"]


def make_lower(lower: Path) -> None:
    for d in range(40):
        sub = lower / "tree" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(50):
            (sub / f"f{f}").write_bytes(b"x" * 100)


@contextlib.contextmanager
def mounted(impl: str, lower: Path, work: Path) -> Iterator[tuple[Path, int]]:
    """A fresh mount of *impl* over *lower*; yields (mount point, server pid)."""
    upper, wdir, mnt = work / f"{impl}-upper", work / f"{impl}-work", work / f"{impl}-mnt"
    for d in (upper, wdir, mnt):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={wdir}"
    proc: subprocess.Popen[bytes] | None = None
    if impl == "unionfs":
        env = dict(os.environ, UNIONFS_SERVER="off")
        subprocess.run([str(VENV_BIN / "unionfs"), "mount", "-o", opts, str(mnt)], check=True, env=env)
        pid = find_server(mnt)
    else:
        proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", opts, str(mnt)])
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)
        pid = proc.pid
    try:
        yield mnt, pid
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if proc is not None:
            proc.wait(timeout=30)


def find_server(mnt: Path) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if os.fsencode(mnt) in argv and any(b"unionfs" in a for a in argv[:3]):
                    return int(entry.name)
    raise SystemExit(f"no unionfs server found for {mnt}")


def counted(pid: int, argv: list[str]) -> tuple[float, float, int | None]:
    """(wall seconds, server CPU seconds, replies) of one run of *argv*."""
    stat: subprocess.Popen[str] | None = None
    if shutil.which("perf"):
        stat = subprocess.Popen(["perf", "stat", "-x,", "--no-big-num", "-e", "syscalls:sys_enter_writev",
                                 "-p", str(pid)], stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    t1, cpu1 = time.monotonic(), cpu_seconds(pid)
    replies = None
    if stat is not None:
        stat.send_signal(2)
        _, err = stat.communicate(timeout=30)
        for line in err.splitlines():
            if "sys_enter_writev" in line and line.split(",")[0].isdigit():
                replies = int(line.split(",")[0])
    return t1 - t0, cpu1 - cpu0, replies


def dso_split(pid: int, argv: list[str], out: Path) -> tuple[dict[str, float], list[str]]:
    data = out / "perf.data"
    rec = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(pid), "-o", str(data)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    rec.send_signal(2)
    rec.wait(timeout=60)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso",
                          "--percent-limit", "0"],
                         capture_output=True, text=True)
    split: dict[str, float] = {}  # percent of the samples
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if m:
            dso = m.group(2)
            area = next((name for marker, name in DSO_AREAS if marker in dso), dso)
            split[area] = split.get(area, 0.0) + float(m.group(1))
    syms = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "sym", "--dsos",
                           "[kernel.kallsyms]", "--percent-limit", "1.5"], capture_output=True, text=True)
    kernel = [" ".join(line.split()[0:1] + line.split()[2:]) for line in syms.stdout.splitlines()
              if re.match(r"\s*[\d.]+%", line)]
    return split, kernel[:10]


def python_split(pid: int, argv: list[str], out: Path) -> str:
    raw = out / "pyspy.txt"
    with profiling.sampled(pid, raw):
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return profiling.summarise(profiling.read_stacks(raw), top=8)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="writes,walk")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("request_split: run as root", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="unionfs-split-", dir="/var/tmp"))
    try:
        lower = work / "lower"
        make_lower(lower)
        print(f"request_split: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load "
              f"{os.getloadavg()[0]:.2f}")
        for name in [w for w in args.only.split(",") if w]:
            print(f"\n{name}:")
            for impl in ("fuse-overlayfs", "unionfs"):
                with mounted(impl, lower, work) as (mnt, pid):
                    wall, cpu, replies = counted(pid, workload(name, mnt))
                per = f", {cpu / replies * 1e6:.1f} us CPU per request" if replies else ""
                print(f"  {impl:15s} wall {wall:6.2f} s, server CPU {cpu:5.2f} s, {replies} replies{per}")
            if shutil.which("perf"):
                with mounted("unionfs", lower, work) as (mnt, pid):
                    split, kernel = dso_split(pid, workload(name, mnt), work)
                print("  unionfs server by shared object: " + ", ".join(
                    f"{area} {pct:.0f}%" for area, pct in sorted(split.items(), key=lambda kv: -kv[1])))
                print("  the busiest kernel functions (% of all its samples): " + ", ".join(kernel))
            else:
                print("  (perf not installed: no split by shared object)")
            if profiling.PY_SPY.exists():
                with mounted("unionfs", lower, work) as (mnt, pid):
                    print("  unionfs server, py-spy (interpreter frames):")
                    print(python_split(pid, workload(name, mnt), work))
            else:
                print("  (py-spy not installed: no split of the interpreter's time)")
    finally:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith(str(work) + "/"):
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
