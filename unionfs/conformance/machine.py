"""Run a sequence on two implementations side by side, find the first difference, and shrink it.

A *case* is a layer spec plus a list of steps. :meth:`Runner.run` builds two identical copies of
the lower layers, mounts implementation A on one and B on the other, applies each step to both and
compares, after every step, the outcome (result and errno) and the visible tree; when the sequence
ends (and at every ``remount`` step) it compares the upper layers, and checks that no lower layer
was written. The first difference stops the run.

:func:`shrink` then minimises the failing case by replaying it: it drops runs of steps
(delta debugging), drops layer entries and whole layers, and simplifies arguments, keeping any
change that still fails the same way. Replays are deterministic: same case, same verdict.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .impls import ForegroundFuse, Impl, MountError, abort_fuse, is_mounted
from .layers import Fill, LayerEntry, Layers, LayerSpec, Oct, Rep, build_layers, finish_layers, random_layers
from .ops import Chooser, Op, Outcome, Session, execute
from .snapshot import Snapshot, diff, ino_changes, known_differences, tree_digest, upper_tree, visible_tree

log = logging.getLogger(__name__)

DEFAULT_BASE = "/var/tmp"
T = TypeVar("T")


@dataclass
class Failure:
    """The first difference: at which step (None: after the last one), of what kind, and the details."""

    step: int | None
    kind: str  # outcome, tree, upper, lower, mount
    lines: list[str]

    def __str__(self) -> str:
        where = "before any step" if self.step == -1 else (
            f"at step {self.step + 1}" if self.step is not None else "at the end")
        return f"{self.kind} difference {where}:\n  " + "\n  ".join(self.lines)


@dataclass
class Trace:
    """What ran: each step with the outcome on A and on B."""

    steps: list[tuple[Op, Outcome | None, Outcome | None]] = field(default_factory=list)

    @property
    def ops(self) -> list[Op]:
        return [op for op, _, _ in self.steps]


@dataclass
class Case:
    spec: LayerSpec
    ops: list[Op]


@dataclass
class ScriptCase:
    """A case as a repro script spells it: a layers(L) function and the steps."""

    n_layers: int
    layers: Callable[[Layers], None]
    ops: list[Op]

    def fill(self, L: Layers) -> None:
        self.layers(L)


class _Side:
    def __init__(self, impl: Impl, base: str) -> None:
        self.impl = impl
        self.base = base
        self.upper = os.path.join(base, "upper")
        self.work = os.path.join(base, "work")
        self.mnt = os.path.join(base, "mnt")
        self.lowers: Layers = Layers([])
        self.digests: list[str] = []
        self.session = Session(self.mnt)
        self.mounted = False
        self.hung = False

    def build(self, spec: Fill) -> None:
        os.mkdir(self.base)
        self.lowers = build_layers(spec, self.base, self.impl.dialect)
        for d in (self.upper, self.work, self.mnt):
            os.mkdir(d, 0o755)
        finish_layers(self.lowers, self.upper)
        self.digests = [tree_digest(root) for root in self.lowers]

    def mount(self) -> None:
        self.impl.mount(list(self.lowers), self.upper, self.work, self.mnt)
        self.mounted = True

    def umount(self) -> None:
        self.session.close_all()
        if self.mounted:
            self.mounted = False
            self.impl.umount(self.mnt)


def _touched(op: Op) -> tuple[str, ...]:
    """The paths a step names (its string arguments that are paths in the union)."""
    if op.name == "readdir_while":
        return (op.args[0], f"{op.args[0]}/{op.args[2]}" if op.args[0] else op.args[2])
    if op.name == "symlink":
        return (op.args[1],)
    if op.name.startswith("fd_") or op.name == "remount":
        return (op.args[1],) if op.name == "fd_open" else ()
    return tuple(a for a in op.args[:2] if isinstance(a, str) and a and not a.startswith(("O_", "RENAME_",
                                                                                         "XATTR_", "user.")))


def _copy_up_after_refused_setxattr(op: Op, outcome: Outcome, sides: tuple[_Side, ...]) -> None:
    """Normalisation 8 (README: setxattr with XATTR_CREATE/XATTR_REPLACE that fails).

    Kernel overlayfs copies the object up before the flag check refuses the call; unionfs (pyfuse3
    checks the flag before the handler runs) does not.  Exactly that is evened out: on a unionfs
    side, the object's own times are set to what they are, which copies it up there too.
    """
    refused_by_flag = {"XATTR_CREATE": errno.EEXIST, "XATTR_REPLACE": errno.ENODATA}
    if op.name != "setxattr" or not op.args[3] or outcome.errno != refused_by_flag[op.args[3]]:
        return
    for side in sides:
        if str(side.impl).startswith("unionfs"):
            path = side.session.path(op.args[0])
            try:
                st = os.lstat(path)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            except OSError:
                pass


def _forget_opaque_of_refused_moves(trace: Trace, uppers: tuple[Snapshot, ...]) -> None:
    """Normalisation 9 (README: a directory rename that fails with ENOTEMPTY over a name that exists
    below).

    Kernel overlayfs marks the directory it was about to move opaque before the target check
    refuses the move; unionfs checks first and leaves it as it was.  Nothing visible through the
    mount differs (the directory has no lower content of its own), so the opaque marker of such a
    directory is not compared in the upper layers.
    """
    refused = {op.args[0].strip("/") for op, out, _ in trace.steps
               if op.name == "rename" and out is not None and out.errno == errno.ENOTEMPTY}
    for upper in uppers:
        for path in refused:
            fields = upper.entries.get(path)
            if fields is not None:
                fields.pop("opaque", None)


class Hang(Exception):
    pass


class Runner:
    """Runs cases on implementation A (the reference) and B (under test) in scratch dirs.

    Every call into a mount runs on a worker thread with a deadline (``step_timeout``): a mount
    that stops answering is reported as a "hang" difference and its FUSE connection is aborted, so
    the oracle itself never hangs.
    """

    def __init__(self, impl_a: Impl, impl_b: Impl, base_dir: str = DEFAULT_BASE,
                 step_timeout: float = 30.0, ignore: frozenset[str] = frozenset()) -> None:
        self.impl_a = impl_a
        self.ignore = ignore
        self.impl_b = impl_b
        self.base_dir = base_dir
        self.step_timeout = step_timeout
        self.runs = 0
        self._pool: ThreadPoolExecutor | None = None

    def _guard(self, side: _Side, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conformance-step")
        future = self._pool.submit(fn, *args)
        try:
            return future.result(timeout=self.step_timeout)
        except FutureTimeout:
            side.hung = True
            if not abort_fuse(side.mnt) and isinstance(side.impl, ForegroundFuse):
                side.impl.kill(side.mnt)
            self._pool.shutdown(wait=False)
            self._pool = None  # the stuck thread is abandoned; it returns once the mount is aborted
            raise Hang(f"{side.impl}: no answer within {self.step_timeout:.0f}s") from None

    def _snap(self, a: _Side, b: _Side) -> tuple[Snapshot, Snapshot]:
        return self._guard(a, visible_tree, a.mnt), self._guard(b, visible_tree, b.mnt)

    def replay(self, case: Case | ScriptCase) -> tuple[Trace, Failure | None]:
        ops = case.ops
        spec = case if isinstance(case, ScriptCase) else case.spec
        return self.run(spec, lambda i, _snap: ops[i] if i < len(ops) else None)

    def run(self, spec: Fill,
            next_op: Callable[[int, Snapshot], Op | None]) -> tuple[Trace, Failure | None]:
        """Run one sequence; ``next_op(i, visible_tree_of_A)`` gives step i, or None to stop."""
        self.runs += 1
        ws = tempfile.mkdtemp(prefix="unionfs-conf-", dir=self.base_dir)
        a = _Side(self.impl_a, os.path.join(ws, "a"))
        b = _Side(self.impl_b, os.path.join(ws, "b"))
        trace = Trace()
        old_umask = os.umask(0o022)
        try:
            try:
                return trace, self._run(spec, next_op, a, b, trace)
            except Hang as e:
                step = len(trace.steps) - 1 if trace.steps else -1
                return trace, Failure(step, "hang", [str(e)])
        finally:
            os.umask(old_umask)
            errors = []
            for side in (a, b):
                try:
                    if side.hung and not abort_fuse(side.mnt) and isinstance(side.impl, ForegroundFuse):
                        side.impl.kill(side.mnt)
                    side.umount()
                except Exception as e:  # cleanup must go on; the mount check below decides
                    errors.append(e)
            if any(is_mounted(s.mnt) for s in (a, b)):
                raise RuntimeError(f"left a mount behind in {ws}: {errors}")
            shutil.rmtree(ws)

    def _run(self, spec: Fill, next_op: Callable[[int, Snapshot], Op | None], a: _Side, b: _Side,
             trace: Trace) -> Failure | None:
        a.build(spec)
        b.build(spec)
        a.mount()
        try:
            b.mount()
        except MountError as e:
            return Failure(-1, "mount", [str(e)])
        snap_a, snap_b = self._snap(a, b)
        if lines := diff(snap_a, snap_b, str(a.impl), str(b.impl), ignore=self.ignore):
            return Failure(-1, "tree", lines)
        i = 0
        while (op := next_op(i, snap_a)) is not None:
            if op.name == "remount":
                trace.steps.append((op, None, None))
                if failure := self._remount(i, a, b, trace):
                    return failure
            else:
                trace.steps.append((op, None, None))
                out_a = self._guard(a, execute, a.session, op)
                out_b = self._guard(b, execute, b.session, op)
                trace.steps[-1] = (op, out_a, out_b)
                if out_a != out_b:
                    return Failure(i, "outcome", [f"{op}: {a.impl} {out_a}, {b.impl} {out_b}"])
                _copy_up_after_refused_setxattr(op, out_a, (a, b))
            prev_a, prev_b = snap_a, snap_b
            snap_a, snap_b = self._snap(a, b)
            if lines := diff(snap_a, snap_b, str(a.impl), str(b.impl), ignore=self.ignore):
                return Failure(i, "tree", [f"after {op}:"] + lines)
            if op.name != "run" and not {"ino"} & (self.ignore | known_differences(a.impl, b.impl)):
                touched = _touched(op)
                changed_a = ino_changes(prev_a, snap_a, touched)
                changed_b = ino_changes(prev_b, snap_b, touched)
                if changed_a != changed_b:
                    return Failure(i, "tree", [f"after {op}: st_ino changed for paths the step did not name: "
                                               f"{a.impl} {sorted(changed_a)}, {b.impl} {sorted(changed_b)}"])
            i += 1
        return self._finish(None, a, b, trace, remount=False)

    def _remount(self, i: int, a: _Side, b: _Side, trace: Trace) -> Failure | None:
        return self._finish(i, a, b, trace, remount=True)

    def _finish(self, step: int | None, a: _Side, b: _Side, trace: Trace, remount: bool) -> Failure | None:
        """Unmount both; compare upper layers and check the lowers; mount again if ``remount``."""
        a.umount()
        try:
            b.umount()
        except MountError as e:
            return Failure(step, "mount", [str(e)])
        upper_a, upper_b = upper_tree(a.upper), upper_tree(b.upper)
        _forget_opaque_of_refused_moves(trace, (upper_a, upper_b))
        if lines := diff(upper_a, upper_b, str(a.impl), str(b.impl), ignore=self.ignore):
            return Failure(step, "upper", lines)
        for side in (a, b):
            pairs = zip(side.lowers, side.digests, strict=True)
            changed = [root for root, digest in pairs if tree_digest(root) != digest]
            if changed:
                return Failure(step, "lower", [f"{side.impl} wrote to lower layer(s) {changed}"])
        if remount:
            a.mount()
            try:
                b.mount()
            except MountError as e:
                return Failure(step, "mount", [str(e)])
        return None


# --------------------------------------------------------------------------- shrinking


def _simpler_values(value: Any) -> Iterator[Any]:
    """Simpler replacements for one argument, simplest first."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, Oct):
        if value != 0o644:
            yield Oct(0o644)
    elif isinstance(value, int):
        if value:
            yield 0
    elif isinstance(value, bytes):
        if len(value) > 1:
            yield b"w"
        if value:
            yield b""
    elif isinstance(value, str) and "|" in value:
        parts = value.split("|")
        for k in range(len(parts)):
            yield "|".join(parts[:k] + parts[k + 1:])
    elif isinstance(value, str) and value.startswith("RENAME_"):
        yield ""


def _simplified_ops(op: Op) -> Iterator[Op]:
    for k, arg in enumerate(op.args):
        for simpler in _simpler_values(arg):
            yield replace(op, args=op.args[:k] + (simpler,) + op.args[k + 1:])


def _simplified_entries(entry: LayerEntry) -> Iterator[LayerEntry]:
    """Plainer versions of a layer entry: no xattrs, owned by root, an ordinary mode, less data."""
    if entry.xattrs:
        yield replace(entry, xattrs=())
    if entry.owner != (0, 0):
        yield replace(entry, owner=(0, 0))
    plain = 0o755 if entry.kind in ("dir", "opaque") else 0o644
    if entry.kind not in ("symlink", "hardlink", "whiteout") and entry.mode != plain:
        yield replace(entry, mode=plain)
    if len(entry.data) > 1:
        yield replace(entry, data=b"x")


@dataclass
class ShrinkResult:
    case: Case
    trace: Trace
    failure: Failure
    runs: int
    seconds: float


def shrink(runner: Runner, case: Case, failure: Failure, trace: Trace, budget_runs: int = 400,
           budget_seconds: float = 300.0) -> ShrinkResult:
    """Minimise a failing case; any replay that fails with the same kind of difference is kept."""
    start = time.monotonic()
    runs = 0
    best = (case, trace, failure)

    def cut(c: Case, f: Failure) -> Case:
        if f.step is None or f.step < 0:
            return c if f.step is None else Case(c.spec, [])
        return Case(c.spec, c.ops[: f.step + 1])

    def attempt(c: Case) -> bool:
        nonlocal best, runs
        if runs >= budget_runs or time.monotonic() - start > budget_seconds:
            return False
        runs += 1
        t, f = runner.replay(c)
        if f is not None and f.kind == failure.kind:
            best = (cut(c, f), t, f)
            log.debug("shrink: %d steps, %d entries still fail", len(best[0].ops), len(c.spec.entries))
            return True
        return False

    best = (cut(case, failure), trace, failure)
    progress = True
    while progress:
        progress = False
        # 1. drop runs of steps, halving the run length (ddmin-style)
        chunk = max(1, len(best[0].ops) // 2)
        while chunk >= 1:
            i = 0
            while i < len(best[0].ops):
                c = best[0]
                if attempt(Case(c.spec, c.ops[:i] + c.ops[i + chunk:])):
                    progress = True
                else:
                    i += chunk
            chunk //= 2
        # 2. drop layer entries, then whole (bottom) layers
        i = 0
        while i < len(best[0].spec.entries):
            c = best[0]
            entries = c.spec.entries[:i] + c.spec.entries[i + 1:]
            if attempt(Case(LayerSpec(c.spec.n_layers, entries), c.ops)):
                progress = True
            else:
                i += 1
        for k in range(len(best[0].spec.entries)):
            for simpler_entry in _simplified_entries(best[0].spec.entries[k]):
                c = best[0]
                entries = c.spec.entries[:k] + [simpler_entry] + c.spec.entries[k + 1:]
                if attempt(Case(LayerSpec(c.spec.n_layers, entries), c.ops)):
                    progress = True
        k = 0
        while k < best[0].spec.n_layers and best[0].spec.n_layers > 1:
            # drop layer k: its entries go, the layers below move up
            c = best[0]
            entries = [e if e.layer < k else replace(e, layer=e.layer - 1)
                       for e in c.spec.entries if e.layer != k]
            if attempt(Case(LayerSpec(c.spec.n_layers - 1, entries), c.ops)):
                progress = True
            else:
                k += 1
        # 3. simplify arguments
        for k in range(len(best[0].ops)):
            for simpler in _simplified_ops(best[0].ops[k]) if k < len(best[0].ops) else ():
                c = best[0]
                if k < len(c.ops) and attempt(Case(c.spec, c.ops[:k] + [simpler] + c.ops[k + 1:])):
                    progress = True
                    break
        if runs >= budget_runs or time.monotonic() - start > budget_seconds:
            break
    case_, trace_, failure_ = best
    return ShrinkResult(case_, trace_, failure_, runs, time.monotonic() - start)


# --------------------------------------------------------------------------- campaigns


def parse_layers(text: str) -> tuple[int, int]:
    """'2' or '1-3': how many lower layers a sequence gets."""
    lo, _, hi = text.partition("-")
    low, high = int(lo), int(hi or lo)
    if not 1 <= low <= high:
        raise ValueError(f"bad layer count {text!r}")
    return low, high


@dataclass
class SequenceResult:
    index: int
    case: Case
    trace: Trace
    failure: Failure | None


def run_sequence(runner: Runner, seed: int, index: int, steps: int, layers: tuple[int, int],
                 allow: set[str] | None = None, entry_kinds: set[str] | None = None,
                 dir_renames: bool = False) -> SequenceResult:
    """Sequence ``index`` of campaign ``seed``: fully determined by (seed, index), the reference
    and *dir_renames* (`Chooser`)."""
    rng = random.Random(f"unionfs-conformance:{seed}:{index}")
    spec = random_layers(rng, rng.randint(*layers), entry_kinds, redirects=dir_renames)
    chooser = Chooser(rng, allow, dir_renames)

    def next_op(i: int, snap: Snapshot) -> Op | None:
        return chooser.next(snap.types()) if i < steps else None

    trace, failure = runner.run(spec, next_op)
    return SequenceResult(index, Case(spec, trace.ops), trace, failure)


__all__ = ["Case", "Failure", "Runner", "Trace", "Rep", "run_sequence", "shrink", "parse_layers"]
