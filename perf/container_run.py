"""``unionfs run --rm IMAGE`` beside ``podman run --rm IMAGE`` (podman with fuse-overlayfs as its mount
program, and with the kernel's overlay driver), on one busybox image imported into all three stores.

Two commands each way: ``true`` (the cost of a container's life: create, mount, start, stop, remove)
and a small workload (200 files written, read back and removed in the container's /srv). The runs
are interleaved (ours, podman fuse-overlayfs, podman overlay, ours, ...), so a drift of the
machine's speed touches all three alike; each figure is the median wall time of the whole command,
from outside, with min and max.

    sudo .venv/bin/python perf/container_run.py              # 10 runs each
    sudo .venv/bin/python perf/container_run.py --runs 20

podman runs with private stores under a temporary directory (tests/test_podman.Podman: the same
set-up the podman tests use), removed afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from containers_util import busybox_tar, image_archive  # noqa: E402
from test_podman import Podman  # noqa: E402

IMAGE = "localhost/perf-busybox:latest"
WORKLOAD = ("cd /srv && for i in $(seq 200); do echo $i > f$i; done && cat f* > /dev/null && rm f* && "
            "echo done")


def unionfs() -> str:
    return shutil.which("unionfs", path=str(Path(sys.executable).parent)) or "unionfs"


def timed(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    elapsed = (time.perf_counter() - start) * 1000
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perf-containers-"))
    pods: dict[str, Podman] = {}
    try:
        image_archive(work / "image.tar", [busybox_tar(work)], {"Cmd": ["sh"], "WorkingDir": "/srv"}, IMAGE)
        store = work / "store"
        subprocess.run([unionfs(), "image", "import", "--store", str(store), str(work / "image.tar")],
                       check=True, capture_output=True)
        pods["podman (fuse-overlayfs)"] = Podman(work / "pm-fuse", shutil.which("fuse-overlayfs"))
        pods["podman (kernel overlay)"] = Podman(work / "pm-kernel", None)
        for pm in pods.values():
            pm("load", "-i", str(work / "image.tar"))
        for label, cmd in (("true", ["true"]), ("200 files", ["sh", "-c", WORKLOAD])):
            rows: dict[str, list[float]] = {"unionfs run": []}
            rows.update({name: [] for name in pods})
            argv = {"unionfs run": ([unionfs(), "run", "--rm", "--store", str(store), IMAGE, *cmd], None)}
            podman = ["podman", "run", "--rm", "--pull=never", "--network=none", IMAGE, *cmd]
            argv.update({name: (podman, pm.env) for name, pm in pods.items()})
            for a, env in argv.values():     # warm-up
                timed(a, env)
            for _ in range(opts.runs):
                for name, (a, env) in argv.items():
                    rows[name].append(timed(a, env))
            base = statistics.median(rows["unionfs run"])
            print(f"\n{label} ({opts.runs} runs, wall ms: median [min-max], ratio to unionfs run)")
            for name, times in rows.items():
                med = statistics.median(times)
                print(f"  {name:26} {med:7.0f}  [{min(times):.0f}-{max(times):.0f}]  x{med / base:.2f}")
    finally:
        for pm in pods.values():
            pm.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
