"""Turn raw measurements into the table of medians and per-repetition ratios, the targets, and the files.

A ratio is always computed within one repetition (unionfs and the reference measured minutes apart at most,
in the same interleaved round), and the table shows each repetition's ratio beside their median.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMPLS = ("native", "kernel", "fuse-overlayfs", "unionfs")
HEADERS = {"native": "native", "kernel": "kernel", "fuse-overlayfs": "fuse-ovl", "unionfs": "unionfs"}
W9_TARGET_SECONDS = 0.150
VERDICTS = {True: "PASS", False: "FAIL", None: "----"}


@dataclass
class Record:
    """One measurement: `seconds` is None when the run failed or its output was wrong (see `error`)."""

    rep: int
    workload: str
    metric: str
    impl: str
    seconds: float | None
    error: str = ""


@dataclass
class Summary:
    metrics: list[str] = field(default_factory=list)
    medians: dict[str, dict[str, float | None]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    ratios_fuse: dict[str, list[float]] = field(default_factory=dict)
    ratios_kernel: dict[str, list[float]] = field(default_factory=dict)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarise(records: list[Record], w9: dict[str, list[float]] | None) -> Summary:
    summary = Summary()
    for record in records:
        if record.metric not in summary.metrics:
            summary.metrics.append(record.metric)
    for metric in summary.metrics:
        rows = [r for r in records if r.metric == metric]
        summary.medians[metric] = {
            impl: median_or_none([r.seconds for r in rows if r.impl == impl and r.seconds is not None])
            for impl in IMPLS
        }
        summary.errors[metric] = {r.impl: r.error for r in rows if r.error}
        summary.ratios_fuse[metric] = per_rep_ratios(rows, "fuse-overlayfs")
        summary.ratios_kernel[metric] = per_rep_ratios(rows, "kernel")
    summary.targets = evaluate_targets(summary, w9)
    return summary


def per_rep_ratios(rows: list[Record], reference: str) -> list[float]:
    by_rep: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.seconds is not None:
            by_rep.setdefault(r.rep, {})[r.impl] = r.seconds
    return [
        times["unionfs"] / times[reference]
        for _, times in sorted(by_rep.items())
        if "unionfs" in times and times.get(reference, 0) > 0
    ]


def median_ratio(summary: Summary, metric: str) -> float | None:
    return median_or_none(summary.ratios_fuse.get(metric, []))


def evaluate_targets(
    summary: Summary, w9: dict[str, list[float]] | None
) -> list[tuple[str, bool | None, str]]:
    targets: list[tuple[str, bool | None, str]] = []
    compared = [m for m in summary.metrics if _workload(m) in {*(f"W{i}" for i in range(1, 9)), "W10"}]
    if not compared:
        targets.append(("every workload <= 2.0x fuse-overlayfs", None, "not measured"))
        targets.append(("geomean W1-W7 <= 1.0x fuse-overlayfs", None, "not measured"))
        return targets + [io_target(summary), w8_target(summary), w9_target(w9)]
    missing = [m for m in compared if median_ratio(summary, m) is None]
    over = [f"{m} {median_ratio(summary, m):.2f}x" for m in compared if (median_ratio(summary, m) or 0) > 2.0]
    if missing and len(missing) == len(compared):
        detail = "n/a (no unionfs/fuse-overlayfs pair measured)"
    else:
        detail = "; ".join(over + [f"{m} n/a" for m in missing]) or "all within"
    targets.append(
        ("every workload <= 2.0x fuse-overlayfs", bool(compared) and not over and not missing, detail)
    )

    core = [median_ratio(summary, m) for m in compared if _workload(m) in {f"W{i}" for i in range(1, 8)}]
    if core and all(r is not None for r in core):
        g = geomean([r for r in core if r is not None])
        targets.append(
            ("geomean W1-W7 <= 1.0x fuse-overlayfs", g <= 1.0, f"{g:.2f}x over {len(core)} metrics")
        )
    elif not core:
        targets.append(("geomean W1-W7 <= 1.0x fuse-overlayfs", None, "not measured"))
    else:
        targets.append(
            ("geomean W1-W7 <= 1.0x fuse-overlayfs", False, "n/a (unionfs or fuse-overlayfs missing)")
        )

    targets.append(io_target(summary))
    targets.append(w8_target(summary))
    targets.append(w9_target(w9))
    return targets


def _workload(metric: str) -> str:
    return metric.split(" ", 1)[0]


IO_METRICS = ("W10 write 4k", "W10 read 4k random", "W7 untar", "W10 write 1m", "W2 read big cold",
              "W2 read big warm")


def io_target(summary: Summary) -> tuple[str, bool | None, str]:
    """4 KiB writes, 4 KiB random reads and untar at most fuse-overlayfs' time, big sequential
    writes and reads at least its throughput: judged only with all of them measured."""
    name = "small writes, random reads, untar, big reads and writes <= 1.0x fuse-overlayfs"
    ratios = {m: median_ratio(summary, m) for m in IO_METRICS if m in summary.metrics}
    if not ratios:
        return name, None, "not measured (W10 not run)"
    missing = [m for m in IO_METRICS if ratios.get(m) is None]
    over = [f"{m} {r:.2f}x" for m, r in ratios.items() if r is not None and r > 1.0]
    within = ", ".join(f"{m.split(' ', 1)[1]} {r:.2f}x" for m, r in ratios.items() if r is not None)
    detail = "; ".join(over + [f"{m} n/a" for m in missing]) or f"all within: {within}"
    return name, not over and not missing, detail


def w8_target(summary: Summary) -> tuple[str, bool | None, str]:
    name = "W8 sub-linear: max branches < 4x one branch (warm)"
    warm = [m for m in summary.metrics if m.startswith("W8 ") and m.endswith(" warm")]
    if len(warm) < 2:
        return name, None, "not measured (W8 not run with several branch counts)"
    first, last = summary.medians[warm[0]]["unionfs"], summary.medians[warm[-1]]["unionfs"]
    if not first or last is None:
        return name, False, "n/a (unionfs missing)"
    return name, last / first < 4.0, f"{last / first:.2f}x ({warm[-1]} / {warm[0]})"


def w9_target(w9: dict[str, list[float]] | None) -> tuple[str, bool | None, str]:
    name = "W9 unionfs run to exec of /bin/true, median < 150 ms"
    runs = (w9 or {}).get("unionfs run (fuse) to exec") or (w9 or {}).get("unionfs run (fuse) total")
    if w9 is None:
        return name, None, "not measured"
    if not runs:
        return name, False, "n/a (no unionfs run row from launch_latency.py)"
    med = statistics.median(runs)
    return name, med < W9_TARGET_SECONDS, f"{med * 1000:.0f} ms"


# Text ----------------------------------------------------------------------------------------------


def format_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.0f} ms" if value >= 0.01 else f"{value * 1000:.1f} ms"


def format_ratios(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "n/a"


def table(summary: Summary, w9: dict[str, list[float]] | None) -> str:
    header = ["workload", *[HEADERS[i] for i in IMPLS], "u/fuse per rep", "u/fuse", "u/kernel"]
    rows = [header]
    for metric in summary.metrics:
        med = summary.medians[metric]
        ratio_f, ratio_k = summary.ratios_fuse[metric], summary.ratios_kernel[metric]
        rows.append(
            [
                metric,
                *[format_seconds(med[i]) for i in IMPLS],
                format_ratios(ratio_f),
                f"{statistics.median(ratio_f):.2f}" if ratio_f else "n/a",
                f"{statistics.median(ratio_k):.2f}" if ratio_k else "n/a",
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += w9_lines(w9) + error_lines(summary) + target_lines(summary)
    return "\n".join(lines)


def w9_lines(w9: dict[str, list[float]] | None) -> list[str]:
    if not w9:
        return []
    return ["", "W9 launch latency (medians, from perf/launch_latency.py):"] + [
        f"  {name:40s} {statistics.median(v) * 1000:7.1f} ms" for name, v in w9.items() if v
    ]


def error_lines(summary: Summary) -> list[str]:
    seen: list[str] = []
    for metric in summary.metrics:
        for impl, error in summary.errors[metric].items():
            line = f"  {impl}: {error}"
            if line not in seen:
                seen.append(line)
    return ["", "Failed or invalid runs (n/a above):", *seen] if seen else []


def target_lines(summary: Summary) -> list[str]:
    return ["", "Targets:"] + [
        f"  {VERDICTS[ok]}  {name}: {detail}" for name, ok, detail in summary.targets
    ]


# Files ---------------------------------------------------------------------------------------------


def write_outputs(
    out: Path,
    stamp: str,
    records: list[Record],
    summary: Summary,
    context: dict[str, Any],
    w9: dict[str, list[float]] | None,
    text: str,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench-{stamp}"
    written = [base.with_suffix(".csv"), base.with_suffix(".json"), base.with_suffix(".txt")]
    with open(written[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(records[0]).keys()) if records else ["rep"])
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    document = {
        "context": context,
        "records": [asdict(r) for r in records],
        "w9": w9,
        "medians": summary.medians,
        "ratios_unionfs_over_fuse_overlayfs": summary.ratios_fuse,
        "ratios_unionfs_over_kernel": summary.ratios_kernel,
        "targets": [{"target": n, "pass": ok, "detail": d} for n, ok, d in summary.targets],
    }
    written[1].write_text(json.dumps(document, indent=1))
    written[2].write_text(text + "\n")
    chart = base.with_suffix(".png")
    if draw_chart(summary, chart, context):
        written.append(chart)
    for path in written:
        shutil.copyfile(path, out / f"latest{path.suffix}")
    return written


def draw_chart(summary: Summary, path: Path, context: dict[str, Any]) -> bool:
    """A bar chart of the median ratios; skipped (False) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [m for m in summary.metrics if summary.ratios_fuse[m] or summary.ratios_kernel[m]]
    if not metrics:
        return False
    fuse = [median_or_none(summary.ratios_fuse[m]) or 0 for m in metrics]
    kernel = [median_or_none(summary.ratios_kernel[m]) or 0 for m in metrics]
    xs = range(len(metrics))
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(metrics)), 5))
    ax.bar([x - 0.2 for x in xs], fuse, 0.4, label="unionfs / fuse-overlayfs")
    ax.bar([x + 0.2 for x in xs], kernel, 0.4, label="unionfs / kernel overlayfs")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(2.0, color="red", linewidth=0.8, linestyle="--", label="target: 2.0x fuse-overlayfs")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), metrics, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("time ratio (lower is better)")
    ax.set_title(
        f"unionfs time ratios, median of repetitions ({context.get('date', '')}, {context.get('mode', '')})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
