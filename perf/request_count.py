"""How many FUSE requests of each kind a workload costs, unionfs beside fuse-overlayfs.

Mounts each implementation over the benchmark's layers (perf/bench.py's, cached under
/var/tmp/unionfs-perf), runs a workload on it once and counts what the kernel sent the server:
``perf record`` of the ``fuse:fuse_request_send`` tracepoint (Linux 6.14+), filtered on the mount's
connection (the minor number of its st_dev), so other FUSE mounts on the machine are not counted.
Requests the libfuse shim answers in C are counted too: each is still read from /dev/fuse.

Workloads: ``untar`` (W7: ``tar xf`` of the 5,000-entry tarball into a new directory) and
``appends`` (W4 small: one byte appended to each of the 1,000 copy-up targets, lower files).

    sudo .venv/bin/python perf/request_count.py                   # both workloads, both implementations
    sudo .venv/bin/python perf/request_count.py --only untar --impls unionfs

Needs root and perf (linux-perf).  docs/performance.md explains each difference.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layerset import LayerSet, ensure_layers  # noqa: E402
from mounts import mount  # noqa: E402
from spec import FULL, Layout  # noqa: E402

WORKLOADS = ("untar", "appends")
IMPLS = ("fuse-overlayfs", "unionfs")


def connection(root: Path) -> int:
    """The FUSE connection id the tracepoint names: the minor number of the mount's st_dev."""
    return os.minor(os.stat(root).st_dev)


def run_workload(name: str, root: Path, tarball: Path, targets: list[str]) -> None:
    if name == "untar":
        (root / "w7").mkdir()
        subprocess.run(["tar", "xf", str(tarball), "-C", str(root / "w7")], check=True)
    else:
        for rel in targets:
            fd = os.open(root / "tree" / rel, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
    os.sync()


def count(impl: str, name: str, layers: LayerSet, targets: list[str]) -> tuple[Counter[str], float]:
    """Requests by opcode and the workload's wall seconds for *impl*."""
    with tempfile.TemporaryDirectory(prefix="unionfs-reqcount-") as tmp:
        data = Path(tmp) / "perf.data"
        with mount(impl, layers.lowers, layers.upper_template, layers.native) as m:
            os.listdir(m.root)      # the mount is served before the count starts
            rec = subprocess.Popen(["perf", "record", "-q", "-o", str(data), "-e", "fuse:fuse_request_send",
                                    "--filter", f"connection == {connection(m.root)}", "-a"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)         # perf has opened its ring buffers
            started = time.monotonic()
            run_workload(name, m.root, layers.tarball, targets)
            took = time.monotonic() - started
            time.sleep(0.3)
            rec.send_signal(2)
            rec.wait(timeout=60)
        script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True,
                                check=True).stdout
    return Counter(m.group(1) for m in re.finditer(r"\(FUSE_([A-Z_0-9]+)\)", script)), took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads, comma-separated")
    ap.add_argument("--impls", default=",".join(IMPLS), help="implementations, comma-separated")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("perf") is None:
        print("request_count: needs root and perf (linux-perf)", file=sys.stderr)
        return 2
    if not Path("/sys/kernel/tracing/events/fuse/fuse_request_send").exists():
        print("request_count: this kernel has no fuse:fuse_request_send tracepoint (Linux 6.14+)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("UNIONFS_SERVER", "off")
    layout = Layout(FULL)
    layers = ensure_layers(layout)
    targets = [f.rel for f in layout.copyup_targets]
    impls = args.impls.split(",")
    for name in args.only.split(","):
        results = {impl: count(impl, name, layers, targets) for impl in impls}
        ops = sorted({op for counts, _ in results.values() for op in counts},
                     key=lambda op: -max(counts[op] for counts, _ in results.values()))
        print(f"\n{name}: requests by kind")
        print(f"{'request':<14}" + "".join(f"{impl:>16}" for impl in impls))
        for op in ops:
            print(f"{op:<14}" + "".join(f"{results[impl][0][op]:>16,}" for impl in impls))
        print(f"{'total':<14}" + "".join(f"{sum(results[impl][0].values()):>16,}" for impl in impls))
        print(f"{'seconds':<14}" + "".join(f"{results[impl][1]:>16.2f}" for impl in impls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
