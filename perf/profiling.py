"""Sample the unionfs daemon with py-spy while a workload runs, and summarise where its time goes.

Used by `bench.py --profile DIR`. Sampling slows the daemon a little, so profiled runs are for finding
hotspots, not for the table.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PY_SPY = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "py-spy"
ATTACH_SECONDS = 0.5
LINE_NUMBER = re.compile(r":\d+\)$")


@contextmanager
def sampled(pid: int | None, output: Path) -> Iterator[None]:
    """Record py-spy's raw (collapsed) stacks of `pid` into `output` for the duration of the block."""
    if pid is None or not PY_SPY.exists():
        yield
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(PY_SPY),
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        "250",
        "--nonblocking",
        "--output",
        str(output),
    ]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(ATTACH_SECONDS)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """Collapsed stacks ("outer;...;inner count"), frames without line numbers."""
    stacks: Counter[tuple[str, ...]] = Counter()
    if not path.exists():
        return stacks
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks[tuple(LINE_NUMBER.sub(")", f) for f in frames.split(";"))] += int(count)
    return stacks


AREAS = (
    ("unionfs/", "unionfs code (incl. the syscalls it makes)"),
    ("_pyfuse3", "pyfuse3 dispatch and replies"),
    ("trio/", "trio scheduler and epoll"),
)
OUTER_FRAMES = ("unionfs/server/daemon.py", "unionfs/cli.py")


def area_of(frame: str) -> str:
    return next((name for marker, name in AREAS if marker in frame), "other")


def summarise(stacks: Counter[tuple[str, ...]], top: int = 12) -> str:
    """Where the daemon's busy samples go: by area, by function (self), by unionfs function (inclusive)."""
    total = sum(stacks.values())
    if not total:
        return "  (no samples: the daemon was idle or py-spy could not attach)"
    areas: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks.items():
        areas[area_of(frames[-1])] += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "unionfs/" in frame and not any(outer in frame for outer in OUTER_FRAMES):
                inclusive[frame] += count
    lines = [
        f"  {total} samples; by area: "
        + ", ".join(f"{a} {100 * n / total:.0f}%" for a, n in areas.most_common())
    ]
    lines += ["  self time:"] + [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["  inclusive time in unionfs functions:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)
