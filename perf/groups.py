"""What the whole-workload groups (`podman_workloads.py`, `mount_loop.py`) share: one sample per
timed run, the interleaved order, medians and per-repetition ratios, targets, and the result files.

A repetition's value for an implementation is the median of its valid runs in that repetition; a ratio
is always taken within one repetition (both sides measured in the same interleaved round) and the
report shows every repetition's ratio beside their median.  A run that failed or did not validate is
kept with its error, shown as n/a, and never enters a median.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
T = TypeVar("T")


@dataclass
class Sample:
    """One timed run; `seconds` is None when it failed or its result was wrong (`error` says why)."""

    group: str
    impl: str
    rep: int
    seconds: float | None
    error: str = ""


@dataclass
class Target:
    """unionfs' median ratio against *against* must be at most *limit*."""

    ours: str
    against: str
    limit: float


def rotated(impls: Sequence[T], rep: int) -> list[T]:
    """The order of a repetition: rotates by one every repetition, so no implementation always runs
    right after the same other one."""
    k = rep % len(impls) if impls else 0
    return [*impls[k:], *impls[:k]]


def _median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def rep_value(samples: Sequence[Sample], group: str, impl: str, rep: int) -> float | None:
    return _median([s.seconds for s in samples if (s.group, s.impl, s.rep) == (group, impl, rep)])


def ratios(samples: Sequence[Sample], group: str, reps: int, ours: str, against: str) -> list[float]:
    out = []
    for rep in range(reps):
        a, b = rep_value(samples, group, ours, rep), rep_value(samples, group, against, rep)
        if a is not None and b:
            out.append(a / b)
    return out


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return f"{'n/a':>9s}"
    return f"{seconds * 1000:9.1f}" if seconds < 10 else f"{seconds * 1000:9.0f}"


def report(samples: Sequence[Sample], group: str, title: str, impls: Sequence[str], reps: int,
           targets: Sequence[Target]) -> tuple[str, list[tuple[str, bool | None]]]:
    """The group's table (ms: median over repetitions of each repetition's median, min and max of
    every valid run), its ratios and its targets with PASS/FAIL (None: not measured)."""
    lines = [f"{group}: {title}; ms, medians over {reps} repetitions",
             f"  {'implementation':28s} {'median':>9s} {'min':>9s} {'max':>9s}  runs"]
    for impl in impls:
        mine = [s for s in samples if (s.group, s.impl) == (group, impl)]
        ok = [s.seconds for s in mine if s.seconds is not None]
        errors = [s.error for s in mine if s.seconds is None]
        per_rep = [v for v in (rep_value(samples, group, impl, r) for r in range(reps)) if v is not None]
        if not per_rep:
            lines.append(f"  {impl:28s} n/a: {errors[0] if errors else 'not run'}")
            continue
        note = f"  ({len(errors)} invalid: {errors[0]})" if errors else ""
        lines.append(f"  {impl:28s} {_fmt(statistics.median(per_rep))} {_fmt(min(ok))} {_fmt(max(ok))}"
                     f"  {len(ok)}{note}")
    verdicts: list[tuple[str, bool | None]] = []
    shown: set[tuple[str, str]] = set()
    pairs = [(t.ours, t.against) for t in targets]
    pairs += [(o, a) for o in impls for a in impls  # like with like: "X rootless" beside "Y rootless"
              if o.startswith("unionfs") and not a.startswith("unionfs")
              and (a == "kernel" or o.partition(" ")[2] == a.partition(" ")[2])]
    for ours, against in pairs:
        if (ours, against) in shown or ours not in impls or against not in impls:
            continue
        shown.add((ours, against))
        rs = ratios(samples, group, reps, ours, against)
        if rs:
            lines.append(f"  {ours} / {against}: median {statistics.median(rs):.2f}x "
                         f"(per repetition {', '.join(f'{r:.2f}' for r in rs)})")
    for t in targets:
        rs = ratios(samples, group, reps, t.ours, t.against)
        met = statistics.median(rs) <= t.limit if rs else None
        name = f"{group}: {t.ours} <= {t.limit:.1f}x {t.against}"
        verdicts.append((name, met))
        lines.append(f"  target {name}: {'----' if met is None else 'PASS' if met else 'FAIL'}"
                     f"{f' ({statistics.median(rs):.2f}x)' if rs else ''}")
    return "\n".join(lines), verdicts


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """One run at a time of a script that owns a work directory (it cleans it up at start)."""
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another run holds {lock}: wait for it to finish") from None
        yield


def cpu_pressure_total() -> float | None:
    """Microseconds during which some task waited for a CPU (Linux PSI), since boot."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(first.rsplit("total=", 1)[1])
    return None


def machine() -> dict[str, object]:
    """The machine, the date, the load, the commit and the versions of the tools (run_workloads'), with
    the start time and the CPU pressure so far, for `header`."""
    import run_workloads

    info = run_workloads.machine()
    info.update(load_start=os.getloadavg()[0], started=time.monotonic(), pressure_start=cpu_pressure_total())
    return info


def header(info: dict[str, object]) -> str:
    """One paragraph: date, commit, machine, load at start and end, CPU pressure over the run."""
    info["load_end"] = os.getloadavg()[0]
    elapsed = time.monotonic() - float(info["started"])  # type: ignore[arg-type]
    p0, p1 = info.get("pressure_start"), cpu_pressure_total()
    pressure = (f", CPU pressure {100 * (p1 - float(p0)) / 1e6 / elapsed:.0f}%"  # type: ignore[arg-type]
                if p0 is not None and p1 is not None and elapsed > 0 else "")
    info["elapsed_s"] = round(elapsed, 1)
    versions = "; ".join(f"{v}" for v in info["versions"].values() if v)  # type: ignore[attr-defined]
    return (f"{info['date_utc']}, commit {info['commit']}, {info['nproc']} x {info['cpu']}, kernel "
            f"{info['kernel']}, Python {info['python']}; {versions}\nload average {info['load_start']:.2f} "
            f"at the start, {info['load_end']:.2f} at the end{pressure}; {elapsed:.0f} s")


def write_results(out: Path, name: str, text: str, payload: dict[str, object],
                  samples: Sequence[Sample]) -> Path:
    """`name-<UTC time>.txt` and `.json` under *out*; returns the .txt path."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    txt = out / f"{name}-{stamp}.txt"
    txt.write_text(text + "\n")
    (out / f"{name}-{stamp}.json").write_text(json.dumps(
        {**payload, "samples": [asdict(s) for s in samples]}, indent=1) + "\n")
    return txt
