"""Run one workload against one merged view and report its timings and what it observed.

The benchmark runs this as a child process (`python perf/worker.py < request.json`), so that a workload stuck
on a misbehaving FUSE mount can be timed out and killed without taking the benchmark down. Only the work a
user would wait for is inside a timed region; collecting the observations that the parent validates happens
after it. Output on stdout: {"times": {metric: seconds}, "obs": {metric: observation}}.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

C_LOCALE = {**os.environ, "LC_ALL": "C"}
READ_BUFFER = 1024 * 1024
WARM_RUNS = 3  # warm times are the median of up to this many runs: single short warm runs are noisy
WARM_BUDGET = 1.5  # seconds; no further warm run starts once the runs so far took this long
SAMPLE_LENGTH = 4096

Observation = Any
Result = dict[str, dict[str, Any]]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as knob:
        knob.write("3")


def timed(action: Callable[[], Observation]) -> tuple[float, Observation]:
    started = time.perf_counter()
    observed = action()
    return time.perf_counter() - started, observed


def warm_runs(action: Callable[[], tuple[float, Observation]]) -> tuple[float, dict[str, Observation]]:
    """Run `action` back to back up to WARM_RUNS times, stopping once WARM_BUDGET seconds are spent:
    the median time, and every run's observation (keys "warm", "warm#2", ...; the parent validates each).
    Short runs, the noisy ones, get repeated; long ones run once or twice."""
    times: list[float] = []
    observations: dict[str, Observation] = {}
    while len(times) < WARM_RUNS and (not times or sum(times) < WARM_BUDGET):
        seconds, observed = action()
        times.append(seconds)
        observations["warm" if len(times) == 1 else f"warm#{len(times)}"] = observed
    return statistics.median(times), observations


def run_captured(command: list[str]) -> bytes:
    return subprocess.run(command, stdout=subprocess.PIPE, check=True, env=C_LOCALE).stdout


# Observations --------------------------------------------------------------------------------------


def parse_find(output: bytes) -> dict[str, list[Any]]:
    """`find -printf '%y %s %P\\n'` output as {path: [type, size]}; directory sizes are not compared."""
    listing: dict[str, list[Any]] = {}
    for line in output.decode().splitlines():
        kind, size, path = line.split(" ", 2)
        if path:
            listing[path] = [kind, -1 if kind == "d" else int(size)]
    return listing


def find_listing(path: Path) -> tuple[float, dict[str, list[Any]]]:
    seconds, output = timed(lambda: run_captured(["find", str(path), "-printf", "%y %s %P\\n"]))
    return seconds, parse_find(output)


def sample_digest(path: Path, size: int) -> str:
    """A digest of a few spread-out pieces of a big file, to catch right-length wrong-content reads."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for offset in sample_offsets(size):
            f.seek(offset)
            digest.update(f.read(SAMPLE_LENGTH))
    return digest.hexdigest()


def sample_offsets(size: int) -> list[int]:
    return [0, size // 3 + 12_345, size // 2 + 777, max(0, size - SAMPLE_LENGTH)]


# Timed actions -------------------------------------------------------------------------------------


def read_all(path: Path) -> int:
    buffer = bytearray(READ_BUFFER)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def tar_create_bytes(root: Path, member: str) -> int:
    """Length of `tar cf - member` read from a pipe (tar skips reading data when writing to /dev/null)."""
    process = subprocess.Popen(
        ["tar", "cf", "-", "-C", str(root), member], stdout=subprocess.PIPE, env=C_LOCALE
    )
    stream = process.stdout
    assert isinstance(stream, io.BufferedReader)
    buffer = bytearray(READ_BUFFER)
    total = 0
    while n := stream.readinto(buffer):
        total += n
    if process.wait() != 0:
        raise RuntimeError(f"tar cf exited {process.returncode}")
    return total


def append_byte(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)


def create_files(directory: Path, count: int, size: int) -> None:
    data = b"c" * size
    for i in range(count):
        fd = os.open(directory / f"n{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def write_sequential(path: Path, total: int, chunk: int, block: bytes) -> None:
    """Write *total* bytes to the new file *path*, *chunk* bytes per write(2): *block* repeated."""
    data = memoryview(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for offset in range(0, total, chunk):
            start = offset % len(block)
            if os.write(fd, data[start : start + chunk]) != chunk:
                raise RuntimeError(f"short write at {offset}")
    finally:
        os.close(fd)


def read_random(path: Path, offsets: list[int], into: bytearray) -> int:
    """4 KiB preads at *offsets* into *into*, with the kernel told the access is random (as fio
    does): each one is a read request of its own, none read ahead."""
    view = memoryview(into)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for i, offset in enumerate(offsets):
            total += os.preadv(fd, [view[i * 4096 : (i + 1) * 4096]], offset)
    finally:
        os.close(fd)
    return total


def file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha1()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_BUFFER):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha1": digest.hexdigest()}


def delete_files(directory: Path, count: int) -> None:
    for i in range(count):
        os.unlink(directory / f"n{i:05d}")


# Workloads -----------------------------------------------------------------------------------------


def w1_find_stat(root: Path, params: dict[str, Any]) -> Result:
    drop_caches()
    cold, cold_obs = find_listing(root / "tree")
    warm, warm_obs = warm_runs(lambda: find_listing(root / "tree"))
    return {"times": {"cold": cold, "warm": warm}, "obs": {"cold": cold_obs, **warm_obs}}


def w2_big_read(root: Path, params: dict[str, Any]) -> Result:
    path, lower = root / "big/read.bin", Path(params["lower_file"])
    drop_caches()
    cold, cold_bytes = timed(lambda: read_all(path))
    drop_caches()
    read_all(lower)  # the lower file is now in the page cache, the merged view's cache is cold
    lower_warm, lower_bytes = timed(lambda: read_all(path))
    warm, warm_counts = warm_runs(lambda: timed(lambda: read_all(path)))
    sample = sample_digest(path, warm_counts["warm"])
    times = {"cold": cold, "lower-warm": lower_warm, "warm": warm}
    counts = {"cold": cold_bytes, "lower-warm": lower_bytes, **warm_counts}
    obs = {key: {"bytes": n, "sample": sample} for key, n in counts.items()}
    return {"times": times, "obs": obs}


def w3_tar(root: Path, params: dict[str, Any]) -> Result:
    drop_caches()
    cold, cold_bytes = timed(lambda: tar_create_bytes(root, "tree"))
    warm, warm_obs = warm_runs(lambda: timed(lambda: tar_create_bytes(root, "tree")))
    return {"times": {"cold": cold, "warm": warm}, "obs": {"cold": cold_bytes, **warm_obs}}


def w4_copy_up(root: Path, params: dict[str, Any]) -> Result:
    small = [root / "tree" / rel for rel in params["targets"]]
    big = root / "big/copyup.bin"
    drop_caches()
    small_time, _ = timed(lambda: append_byte(small))
    drop_caches()
    big_time, _ = timed(lambda: append_byte([big]))
    os.sync()
    small_obs = {
        "sizes": {rel: (root / "tree" / rel).stat().st_size for rel in params["targets"]},
        "tails_ok": all(_last_byte(p) == b"x" for p in small),
    }
    big_obs = {"size": big.stat().st_size, "tail_ok": _last_byte(big) == b"x"}
    return {"times": {"small": small_time, "big": big_time}, "obs": {"small": small_obs, "big": big_obs}}


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def w5_create_delete(root: Path, params: dict[str, Any]) -> Result:
    directory = root / "w5"
    directory.mkdir()
    count, size = params["count"], params["size"]
    os.sync()
    create, _ = timed(lambda: create_files(directory, count, size))
    entries = list(os.scandir(directory))
    created = {"count": len(entries), "bytes": sum(e.stat(follow_symlinks=False).st_size for e in entries)}
    os.sync()
    delete, _ = timed(lambda: delete_files(directory, count))
    remaining = len(os.listdir(directory))
    return {"times": {"create": create, "delete": delete}, "obs": {"create": created, "delete": remaining}}


def w6_ls(root: Path, params: dict[str, Any]) -> Result:
    command = ["ls", "-1", str(root / "wide")]
    drop_caches()
    cold, cold_names = timed(lambda: run_captured(command).decode().split())
    warm, warm_obs = warm_runs(lambda: timed(lambda: run_captured(command).decode().split()))
    return {"times": {"cold": cold, "warm": warm}, "obs": {"cold": cold_names, **warm_obs}}


def w7_untar(root: Path, params: dict[str, Any]) -> Result:
    directory = root / "w7"
    directory.mkdir()
    drop_caches()
    untar, _ = timed(lambda: run_captured(["tar", "xf", params["tarball"], "-C", str(directory)]))
    os.sync()
    _, listing = find_listing(directory)
    return {"times": {"untar": untar}, "obs": {"untar": listing}}


def w8_branches(root: Path, params: dict[str, Any]) -> Result:
    drop_caches()
    cold, cold_obs = find_listing(root)
    warm, warm_obs = warm_runs(lambda: find_listing(root))
    return {"times": {"cold": cold, "warm": warm}, "obs": {"cold": cold_obs, **warm_obs}}


def w10_small_io(root: Path, params: dict[str, Any]) -> Result:
    from spec import content_block, random_read_offsets

    directory = root / "w10"
    directory.mkdir()
    block = content_block()
    os.sync()
    small, _ = timed(lambda: write_sequential(directory / "small", params["small_writes"], 4096, block))
    big, _ = timed(lambda: write_sequential(directory / "big", params["big_write"], 1024 * 1024, block))
    os.sync()
    written = {"write 4k": file_digest(directory / "small"), "write 1m": file_digest(directory / "big")}
    path, lower = root / "big/read.bin", Path(params["lower_file"])
    offsets = random_read_offsets(params["big_read"], params["random_reads"])
    into = bytearray(4096 * len(offsets))
    drop_caches()
    read_all(lower)  # the lower file in the page cache, the merged view's cache cold (as W2 lower-warm)
    random_time, got = timed(lambda: read_random(path, offsets, into))
    read = {"bytes": got, "sha1": hashlib.sha1(into).hexdigest()}
    return {"times": {"write 4k": small, "write 1m": big, "read 4k random": random_time},
            "obs": {**written, "read 4k random": read}}


WORKLOADS: dict[str, Callable[[Path, dict[str, Any]], Result]] = {
    "W1": w1_find_stat,
    "W2": w2_big_read,
    "W3": w3_tar,
    "W4": w4_copy_up,
    "W5": w5_create_delete,
    "W6": w6_ls,
    "W7": w7_untar,
    "W8": w8_branches,
    "W10": w10_small_io,
}


def main() -> None:
    request = json.load(sys.stdin)
    result = WORKLOADS[request["workload"]](Path(request["root"]), request.get("params", {}))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
