"""Images: unionfs beside podman (fuse-overlayfs as its mount program, a private store).

(a) **import + first run**: an image of about 100 MB in about 10,000 files (a busybox layer and a
    data layer), from a docker-archive: ``unionfs image import`` then the first
    ``unionfs run --rm IMAGE true``, beside ``podman load`` then ``podman run --rm IMAGE true``; each
    repetition starts from an empty store.
(b) **diff + commit**: a container of an image of 20,000 files whose layer holds 1,000 changes (400
    files added, 300 changed, 300 deleted, across the tree): ``unionfs diff`` and ``unionfs commit``
    beside ``podman diff`` and ``podman commit``; then (b-small) the same 1,000 changes over an image of
    2,000 files. unionfs reads the container layer alone, so its cost should not move between the two;
    podman's diff over fuse-overlayfs walks the image too, so its cost follows the image's size.

Each figure is the wall time of the whole command from outside, median over ``--runs`` repetitions
[min-max], the two tools' runs interleaved; the ratio is podman / unionfs. The diff line counts are
printed too: podman's has one more, "C /etc", for the /etc/mtab link podman puts in every container.

    sudo .venv/bin/python perf/images.py               # 3 runs each
    sudo .venv/bin/python perf/images.py --runs 5

Needs root, podman, runc, fuse-overlayfs and a static busybox; podman's store is private and removed.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "images"))
sys.path.insert(0, str(REPO / "perf"))

from container_run import timed, unionfs  # noqa: E402
from containers_util import busybox_tar, image_archive  # noqa: E402
from test_podman import Podman  # noqa: E402

BIG = "localhost/perf-img-big:latest"
WIDE = "localhost/perf-img-wide:latest"
COMMITTED = "localhost/perf-img-committed:latest"
# 1,000 changes spread over the 20,000 files of WIDE (200 directories of 100): in each of the first
# 100 directories 4 files added, 3 changed (appended to) and 3 deleted.
CHANGES = ("for d in $(seq 0 99); do t=/data/d$d; for i in 0 1 2 3; do echo new > $t/new$i; done; "
           "for i in 4 5 6; do echo more >> $t/f$i; done; rm $t/f7 $t/f8 $t/f9; done")


def data_layer(dirs: int, per_dir: int, size: int) -> bytes:
    """A layer tar of /data/d<N>/f<M>: *dirs* x *per_dir* files of *size* bytes, each its own content."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ["data", *(f"data/d{d}" for d in range(dirs))]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for d in range(dirs):
            for f in range(per_dir):
                head = f"{d}/{f}\n".encode()
                payload = (head * (size // len(head) + 1))[:size]
                ti = tarfile.TarInfo(f"data/d{d}/f{f}")
                ti.size, ti.mode = size, 0o644
                tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def report(label: str, rows: dict[str, list[float]], pairs: list[tuple[str, str]]) -> None:
    """Each pair (unionfs row, podman row): medians [min-max] and podman's median / ours."""
    print(f"\n{label} (wall ms: median [min-max])")
    for ours, theirs in pairs:
        a, b = statistics.median(rows[ours]), statistics.median(rows[theirs])
        print(f"  {ours:26} {a:7.0f} [{min(rows[ours]):.0f}-{max(rows[ours]):.0f}]   "
              f"{theirs:24} {b:7.0f} [{min(rows[theirs]):.0f}-{max(rows[theirs]):.0f}]   "
              f"podman/unionfs x{b / a:.2f}")


def import_and_run(work: Path, runs: int, busybox: bytes) -> None:
    archive = work / "big.tar"
    image_archive(archive, [busybox, data_layer(100, 100, 10_000)], {"Cmd": ["sh"]}, BIG)
    print(f"image (a): {archive.stat().st_size / 1e6:.0f} MB archive, 10,000 data files")
    rows: dict[str, list[float]] = {k: [] for k in (
        "unionfs image import", "unionfs run --rm (first)", "unionfs import + run",
        "podman load", "podman run --rm (first)", "podman load + run")}
    for i in range(runs):
        store = work / f"store-a{i}"
        a = timed([unionfs(), "image", "import", "--store", str(store), str(archive)])
        b = timed([unionfs(), "run", "--rm", "--store", str(store), BIG, "true"])
        rows["unionfs image import"].append(a)
        rows["unionfs run --rm (first)"].append(b)
        rows["unionfs import + run"].append(a + b)
        shutil.rmtree(store)
        pm = Podman(work / f"pm-a{i}", shutil.which("fuse-overlayfs"))
        try:
            a = timed(["podman", "load", "-i", str(archive)], pm.env)
            b = timed(["podman", "run", "--rm", "--pull=never", "--network=none", BIG, "true"], pm.env)
        finally:
            pm.close()
            shutil.rmtree(pm.base, ignore_errors=True)
        rows["podman load"].append(a)
        rows["podman run --rm (first)"].append(b)
        rows["podman load + run"].append(a + b)
    report(f"(a) import + first run, {runs} runs", rows,
           [("unionfs image import", "podman load"), ("unionfs run --rm (first)", "podman run --rm (first)"),
            ("unionfs import + run", "podman load + run")])


def diff_and_commit(work: Path, runs: int, busybox: bytes, dirs: int = 200, per_dir: int = 100) -> None:
    archive = work / f"wide-{dirs}x{per_dir}.tar"
    image_archive(archive, [busybox, data_layer(dirs, per_dir, 1_000)], {"Cmd": ["sh"]}, WIDE)
    store = work / f"store-b-{dirs}x{per_dir}"
    subprocess.run([unionfs(), "image", "import", "--store", str(store), str(archive)], check=True,
                   capture_output=True)
    pm = Podman(work / f"pm-b-{dirs}x{per_dir}", shutil.which("fuse-overlayfs"))
    try:
        timed(["podman", "load", "-i", str(archive)], pm.env)
        rows: dict[str, list[float]] = {k: [] for k in (
            "unionfs diff", "unionfs commit", "podman diff", "podman commit")}
        lines: dict[str, int] = {}
        for i in range(runs):
            name = f"c{i}"
            timed([unionfs(), "run", "--store", str(store), "--name", name, WIDE, "sh", "-c", CHANGES])
            timed(["podman", "run", "--pull=never", "--network=none", "--name", name, WIDE,
                   "sh", "-c", CHANGES], pm.env)
            steps: list[tuple[str, list[str], dict[str, str] | None]] = [
                ("unionfs diff", [unionfs(), "diff", "--store", str(store), name], None),
                ("podman diff", ["podman", "diff", name], pm.env),
                ("unionfs commit", [unionfs(), "commit", "--store", str(store), name, f"{COMMITTED}{i}"],
                 None),
                ("podman commit", ["podman", "commit", "-q", name, f"{COMMITTED}{i}"], pm.env)]
            for label, argv, env in steps:
                rows[label].append(timed(argv, env))
            for label, argv, env in steps[:2]:
                out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
                lines[label] = len(out.splitlines())
        print(f"\n(b) diff lines: {lines}")
        report(f"(b) diff + commit, 1,000 changes over {dirs * per_dir:,} files, {runs} runs", rows,
               [("unionfs diff", "podman diff"), ("unionfs commit", "podman commit")])
    finally:
        pm.close()
        shutil.rmtree(pm.base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["a", "b", "b-small"])
    opts = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("perf/images.py needs root (podman's private store, mounts)")
    work = Path(tempfile.mkdtemp(prefix="perf-images-", dir="/var/tmp"))
    parts: dict[str, Callable[[Path, int, bytes], None]] = {
        "a": import_and_run,
        # the same changes over a tenth of the files: unionfs's cost should not move, podman's should
        "b": diff_and_commit, "b-small": lambda w, r, b: diff_and_commit(w, r, b, 100, 20)}
    try:
        busybox = busybox_tar(work)
        for key, part in parts.items():
            if opts.only in (None, key):
                part(work, opts.runs, busybox)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
