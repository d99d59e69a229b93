"""`unionfs pull` beside `podman pull` and `skopeo copy docker://... oci:DIR`, from a local registry.

A docker-registry on 127.0.0.1 (tests/registry_util.py) holds image A (~100 MB of gzip blobs in four
layers: incompressible data and text) and image B, which shares A's three lower layers and has a
top layer of its own.  Each tool, starting empty every run, pulls A ("first pull"), then B into the
same store ("second pull": only B's top layer is new).  unionfs and podman unpack the layers into
their stores; skopeo only writes the blobs into an OCI layout (no unpacking), the floor of the
transfer itself.  Medians of --runs runs; ratios are to unionfs.

    sudo .venv/bin/python perf/pull.py             # 3 runs each
    sudo .venv/bin/python perf/pull.py --runs 5
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from registry_util import running_registry  # noqa: E402

UNIONFS = str(Path(sys.executable).with_name("unionfs"))


def layer(seed: int, random_mb: int, text_files: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_600_000_000
            tf.addfile(ti, io.BytesIO(data))
        rnd = __import__("random").Random(seed)
        add(f"data{seed}/random.bin", rnd.randbytes(random_mb << 20))
        for i in range(text_files):
            text = f"line {i} of layer {seed}\n" * rnd.randint(20, 400)
            add(f"data{seed}/text/{i:05}.txt", text.encode())
    return gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)


def make_images(work: Path) -> None:
    """docker-archives a.tar and b.tar (B = A's three lower layers + another top)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import images_util

    lower = [layer(i, 22, 800) for i in range(3)]
    tops = {"a": layer(10, 22, 800), "b": layer(11, 22, 800)}
    for name, top in tops.items():
        tars = [gzip.decompress(b) for b in lower + [top]]
        images_util.docker_archive(work / f"{name}.tar", [(tars, [f"localhost/perf-{name}:latest"])], "gzip")


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pair(argv: Callable[[str], list[str]], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds to pull A, then B into the same place."""
    a, b = (timed(lambda n=n: sh(*argv(n), env=env)) for n in "ab")  # type: ignore[misc]
    return a, b


def sh(*argv: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("perf/pull.py runs as root (podman's private store)")
    from test_podman import Podman

    work = Path(tempfile.mkdtemp(prefix="unionfs-pull-"))
    try:
        make_images(work)
        with running_registry(work / "registry") as reg:
            refs = {n: f"{reg.host}/perf/{n}:1" for n in "ab"}
            seed = work / "seed-store"
            for n in "ab":
                sh(UNIONFS, "image", "import", "--store", str(seed), str(work / f"{n}.tar"))
                sh(UNIONFS, "push", "--store", str(seed), "--tls-verify=false", f"perf-{n}", refs[n])
            size = sum(int(x) for x in subprocess.run(
                ["du", "-sb", str(reg.storage)], capture_output=True, text=True).stdout.split()[:1])
            results: dict[str, list[tuple[float, float]]] = {"unionfs pull": [], "podman pull": [],
                                                              "skopeo copy (blobs only)": []}
            for run in range(args.runs):
                d = work / f"run{run}"
                d.mkdir()
                store, oci = d / "unionfs", d / "oci"
                results["unionfs pull"].append(pair(lambda n, store=store: [
                    UNIONFS, "pull", "--store", str(store), "--tls-verify=false", refs[n]]))
                pm = Podman(d / "podman", None)
                try:
                    results["podman pull"].append(pair(lambda n: [
                        "podman", "pull", "--tls-verify=false", f"docker://{refs[n]}"], pm.env))
                finally:
                    pm.close()
                results["skopeo copy (blobs only)"].append(pair(lambda n, oci=oci: [
                    "skopeo", "copy", "--src-tls-verify=false", f"docker://{refs[n]}", f"oci:{oci}:{n}"]))
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; registry holds "
          f"{size / 1e6:.0f} MB; medians of {args.runs} runs")
    base = [statistics.median(r[i] for r in results["unionfs pull"]) for i in (0, 1)]
    print(f"{'':28} {'first pull (A)':>16} {'second pull (B)':>16}")
    for name, rows in results.items():
        med = [statistics.median(r[i] for r in rows) for i in (0, 1)]
        cells = [f"{m:6.2f} s ({m / b:4.2f}x)" for m, b in zip(med, base, strict=True)]
        print(f"{name:28} {cells[0]:>16} {cells[1]:>16}")


if __name__ == "__main__":
    main()
