"""Live statistics of a mount: the counters its daemon keeps, and the table `unionfs stats` prints.

Cheap enough to leave on: per request, `_handler` (operations.py) reads the clock twice and updates
one `Requests` record in place (a total, a maximum and one bucket of a coarse histogram),
and each lookup adds one to its branch's count; the other figures are counted where work is done
anyway (a system call, a copy, a listing built) or read only when a snapshot is taken (open
handles, fds, memory).  Requests the kernel or the libfuse shim answer without Python (cached
entries and attributes, cached listings, zero-message opendir) are not seen here.

A snapshot (`Operations.stats_snapshot`) is a JSON-serialisable dict, ``{"version": 1, ...}``;
`format_snapshot` renders one as text.  Durations are in nanoseconds; a histogram's bucket *b*
counts the requests that took [4^(b-1), 4^b) ns (bucket 0: none; bucket 5 ends at 1.02 µs, 6 at
4.1 µs, 7 at 16 µs...): powers of four, found with one `int.bit_length` (`bucket`).
"""
from __future__ import annotations

import os
import time
from typing import Any

#: The version of the snapshot's layout; a reader should refuse a newer one.
VERSION = 1
#: Histogram buckets: enough for any duration that fits 64 bits of nanoseconds (see `bucket`).
BUCKETS = 33
#: The request types, in the order their records are kept (`slot`).
NAMES: list[str] = []


def slot(name: str) -> int:
    """The index of request type *name*'s record in every `Stats` made from now on."""
    if name not in NAMES:
        NAMES.append(name)
    return NAMES.index(name)


def bucket(ns: int) -> int:
    """The histogram bucket of a duration of *ns* nanoseconds (as `_handler` computes it inline):
    the *b* with 4^(b-1) <= *ns* < 4^b."""
    return (ns.bit_length() + 1) >> 1


def bucket_bounds_ns() -> list[int]:
    """The (exclusive) upper bound of each bucket, in nanoseconds: 1, 4, 16, ..."""
    return [1 << 2 * b for b in range(BUCKETS)]


class Requests:
    """One request type: how many fell in each histogram bucket (their sum is the count; one
    counter less per request), *errors* of them answered with an error, their total and longest
    time."""

    __slots__ = ("errors", "total_ns", "max_ns", "hist")

    def __init__(self) -> None:
        self.errors = 0
        self.total_ns = 0
        self.max_ns = 0
        self.hist = [0] * BUCKETS

    @property
    def count(self) -> int:
        return sum(self.hist)

    def add(self, ns: int) -> None:
        """One more request that took *ns* (for handlers outside `_handler`)."""
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        self.hist[(ns.bit_length() + 1) >> 1] += 1

    def as_dict(self) -> dict[str, Any]:
        last = max((i for i, n in enumerate(self.hist) if n), default=-1)
        return {"count": self.count, "errors": self.errors, "total_ns": self.total_ns,
                "max_ns": self.max_ns, "hist": self.hist[:last + 1]}


class Stats:
    """The counters the server keeps itself: requests by type (`requests`, indexed by `slot`),
    lookups by the branch that served the name and negative ones, and the hits of the reply
    attributes it keeps.  The listing snapshots (`operations.Snapshots`) and the union (copy-ups, its
    caches) keep their own counts."""

    __slots__ = ("started", "started_mono", "requests", "lookups", "negative", "replies_hit",
                 "replies_built")

    def __init__(self, branches: int = 0) -> None:
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.requests = [Requests() for _ in NAMES]
        self.lookups = [0] * branches   # by branch index (grows if branches are added)
        self.negative = 0
        self.replies_hit = 0
        self.replies_built = 0

    def looked_up(self, layer: int) -> None:
        """A lookup answered with a name from branch *layer*."""
        try:
            self.lookups[layer] += 1
        except IndexError:
            self.lookups.extend([0] * (layer + 1 - len(self.lookups)))
            self.lookups[layer] += 1

    def requests_dict(self) -> dict[str, dict[str, Any]]:
        return {name: r.as_dict() for name, r in zip(NAMES, self.requests, strict=False) if r.count}


def process() -> dict[str, Any]:
    """What the daemon's process holds: its fds (all of them, from /proc) and its memory."""
    try:
        fds = len(os.listdir("/proc/self/fd")) - 1     # less the one that listed them
    except OSError:
        fds = -1
    # VmHWM, not getrusage's ru_maxrss, which a process keeps across exec from its parent's
    mem = {"VmRSS:": -1, "VmHWM:": -1}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                words = line.split()        # b"VmRSS:", b"28436", b"kB"
                key = words[0].decode("ascii", "replace") if words else ""
                if key in mem:
                    mem[key] = int(words[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"fds": fds, "rss_bytes": mem["VmRSS:"], "peak_rss_bytes": mem["VmHWM:"]}


# ---------------------------------------------------------------------- the table


def _dur(ns: float) -> str:
    """A duration in a few characters: 850ns, 12µs, 3.4ms, 2.1s, 5m3s."""
    if ns < 1_000:
        return f"{ns:.0f}ns"
    for unit, scale in (("µs", 1e3), ("ms", 1e6), ("s", 1e9)):
        v = ns / scale
        if v < 1000 or unit == "s":
            if unit == "s" and v >= 60:
                return _uptime(v)
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    raise AssertionError("unreachable")


def _uptime(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] * bool(d) + [f"{h}h"] * bool(h) + [f"{m}m"] * bool(m)
    return "".join(parts + [f"{s}s"] * (bool(s) or not parts))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def quantile_ns(hist: list[int], max_ns: int, q: float) -> int:
    """An upper bound on the *q* quantile from a histogram: the end of the bucket it falls in (but
    no more than the longest request)."""
    total = sum(hist)
    if not total:
        return 0
    need = q * total
    seen = 0
    for b, n in enumerate(hist):
        seen += n
        if seen >= need:
            return min(1 << 2 * b, max_ns)
    return max_ns


def _table(rows: list[list[str]], right_from: int = 1) -> list[str]:
    """*rows* in aligned columns, those from *right_from* on right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i < right_from else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]


def _n(count: int, what: str) -> str:
    """*count* *what*s: 1 file, 2 files, 1 directory, 0 directories."""
    if count == 1:
        return f"1 {what}"
    return f"{count} {what[:-1]}ies" if what.endswith("y") else f"{count} {what}s"


def _hit_rate(hits: int, misses: int) -> str:
    return f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"


def format_snapshot(snap: dict[str, Any]) -> str:
    """The text `unionfs stats MNT` prints for snapshot *snap*: the mount, then requests by total
    time (count, errors, total, mean, p50 and p99 as bucket bounds, max), copy-ups, lookups per
    branch, caches, handles, fds and memory."""
    if snap.get("version") != VERSION:
        raise ValueError(f"statistics of version {snap.get('version')!r}: "
                         f"this unionfs reads version {VERSION}")
    m = snap["mount"]
    out = [f"up {_uptime(snap['uptime_s'])}, {len(m['branches'])} branches, {m['whiteouts']} whiteouts, "
           f"{'read-only' if m['readonly'] else 'read-write'}, cache timeout {m['timeout']:g}s"]
    out += _table([[f"  {b['index']}", b["mode"], b["path"]] for b in m["branches"]], right_from=99)

    reqs = sorted(snap["requests"].items(), key=lambda kv: (-kv[1]["total_ns"], kv[0]))
    out.append("")
    if reqs:
        rows = [["request", "count", "errors", "total", "mean", "p50<=", "p99<=", "max"]]
        for name, r in reqs:
            rows.append([name, str(r["count"]), str(r["errors"]), _dur(r["total_ns"]),
                         _dur(r["total_ns"] / r["count"]), _dur(quantile_ns(r["hist"], r["max_ns"], 0.5)),
                         _dur(quantile_ns(r["hist"], r["max_ns"], 0.99)), _dur(r["max_ns"])])
        out += _table(rows)
    else:
        out.append("no requests yet")

    c = snap["copy_ups"]
    out.append("")
    if c["files"] or c["dirs"]:
        out.append(f"copy-ups: {_n(c['files'], 'file')}, {_n(c['dirs'], 'directory')}, "
                   f"{_size(c['bytes'])} in {_dur(c['total_ns'])} (longest {_dur(c['max_ns'])})")
    else:
        out.append("copy-ups: none")
    lk = snap["lookups"]
    by = "".join(f"branch {b['index']}: {b['count']}, " for b in lk["by_branch"])
    out.append(f"lookups answered: {by}negative: {lk['negative']}")

    k = snap["caches"]
    out.append("")
    rows = [["cache", "hits", "misses", "hit%", "kept", "ceiling"]]
    for label, key, kept, ceiling in (("stats", "stats", "kept", "ceiling"),
                                      ("listings", "listings", "entries", "ceiling"),
                                      ("reply attributes", "replies", "kept", "ceiling"),
                                      ("xattr names", "xattr_names", "", ""),
                                      ("branch dir fds", "dir_fds", "open", "ceiling")):
        e = k[key]
        hits = e["hits"]    # None: not counted (a hit costs nothing to count only where it is rare)
        rows.append([label, "-" if hits is None else str(hits), str(e["misses"]),
                     "-" if hits is None else _hit_rate(hits, e["misses"]),
                     str(e.get(kept, "")), str(e.get(ceiling, ""))])
    out += _table(rows)
    s = k["snapshots"]
    out.append(f"listing snapshots: {s['taken']} taken, {s['continued']} read on, kept for "
               f"{_n(s['dirs'], 'directory')}; listings dropped under the ceiling: "
               f"{k['listings']['dropped']}")

    h, f, mem = snap["handles"], snap["fds"], snap["memory"]
    out.append("")
    out.append(f"open: {_n(h['files'], 'file')}, {_n(h['dirs'], 'directory')}; nodes known: {snap['nodes']}")
    out.append(f"fds: {f['total']} ({_n(f['branch_dirs'], 'branch directory')} held, "
               f"{_n(f['files'], 'open file')})")
    out.append(f"memory: {_size(mem['rss_bytes'])} resident (peak {_size(mem['peak_rss_bytes'])})")
    return "\n".join(out) + "\n"
