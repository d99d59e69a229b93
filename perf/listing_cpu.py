"""The unionfs daemon's CPU per name of a cold directory listing, optionally beside another checkout's.

Mounts W6's layers (perf/bench.py builds them under /var/tmp/unionfs-perf; the directory ``wide``:
9,502 merged names over three layers) with ``unionfs mount -f`` and ``UNIONFS_SERVER=off`` (so the
process serving is this command's child, running the code given), then, per listing: drops the
caches (the kernel forgets every node; the branches' metadata leaves the page cache), lists ``wide``
with ``os.listdir`` (READDIRPLUS: a node, an lstat and a reply per name) and reads the daemon's CPU
time from ``/proc/PID/task/*/schedstat`` (nanoseconds; user and system time from ``/proc/PID/stat``
in 10 ms ticks beside it). With ``--vs CHECKOUT`` the same runs with that checkout's code (put first
on PYTHONPATH, this venv's interpreter), in rounds interleaved with this one's.

    sudo .venv/bin/python perf/listing_cpu.py                       # 12 listings
    sudo .venv/bin/python perf/listing_cpu.py --vs /tmp/base --listings 12 --rounds 2

``/tmp/base`` may be ``git archive main | tar -x -C /tmp/base`` with this checkout's built
``unionfs/server/_fuse_shim.*.so`` copied beside its source (and ``unionfs/core/_native.*.so`` if it has one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent
LAYERS = Path("/var/tmp/unionfs-perf/layers-full")
TICK = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _cpu_ns(pid: int) -> int:
    return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir())


def listings(code: Path, count: int) -> list[tuple[float, float, float, float]]:
    """*count* cold listings of ``wide`` served by *code*: (CPU, user, system, wall) in us per name."""
    run = Path(tempfile.mkdtemp(prefix="listing-cpu-", dir="/var/tmp"))
    upper, work, mnt = run / "upper", run / "work", run / "mnt"
    subprocess.run(["cp", "-a", str(LAYERS / "upper"), str(upper)], check=True)
    work.mkdir()
    mnt.mkdir()
    env = dict(os.environ, UNIONFS_SERVER="off", PYTHONPATH=str(code))
    options = f"lowerdir={LAYERS / 'top'}:{LAYERS / 'bottom'},upperdir={upper},workdir={work}"
    with open(run / "log", "wb") as log:
        command = [str(REPO / ".venv" / "bin" / "unionfs"), "mount", "-f", "-o", options, str(mnt)]
        daemon = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    out = []
    try:
        for _ in range(200):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"not mounted: see {run / 'log'}")
        for _ in range(count):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            time.sleep(0.3)     # the kernel's FORGETs are served before the listing starts
            user0, sys0 = _ticks(daemon.pid)
            cpu0, started = _cpu_ns(daemon.pid), time.perf_counter()
            names = len(os.listdir(mnt / "wide"))
            wall = time.perf_counter() - started
            user1, sys1 = _ticks(daemon.pid)
            cpu = _cpu_ns(daemon.pid) - cpu0
            out.append((cpu / 1e3 / names, (user1 - user0) / TICK * 1e6 / names,
                        (sys1 - sys0) / TICK * 1e6 / names, wall * 1e6 / names))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        daemon.wait()
        shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", type=Path, help="another checkout to compare with (interleaved)")
    parser.add_argument("--listings", type=int, default=12, help="cold listings per mount (default 12)")
    parser.add_argument("--rounds", type=int, default=1, help="mounts per checkout (default 1)")
    args = parser.parse_args()
    if not (LAYERS / "bottom" / "wide").is_dir():
        raise SystemExit(f"no W6 layers in {LAYERS}: run perf/bench.py --only W6 once")
    codes = [REPO] + ([args.vs.resolve()] if args.vs else [])
    results: dict[Path, list[tuple[float, float, float, float]]] = {c: [] for c in codes}
    for _ in range(args.rounds):
        for code in codes:
            results[code] += listings(code, args.listings)
    for code, rows in results.items():
        cpu, user, system, wall = (sorted(column) for column in zip(*rows, strict=True))
        print(f"{code}: per name, CPU {median(cpu):.2f} us (min {cpu[0]:.2f}), user {median(user):.2f}, "
              f"system {median(system):.2f}, wall {median(wall):.2f} us (min {wall[0]:.2f}); "
              f"{len(rows)} listings")


if __name__ == "__main__":
    main()
