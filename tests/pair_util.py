"""The differential pair: the same layers built twice, kernel overlayfs mounted on one copy and the
implementation under test on the other, and what each shows compared.

Mounting and unmounting go through `unionfs.conformance.harness`, which the conformance oracle and
the benchmark use too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layers_util import Entry, layer_digest, normalise_upper, render_layer, snapshot
from mounts_util import IMPL, program, umount

from unionfs.conformance import harness

# --------------------------------------------------------------------------------------------------
# Errno capture


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn``; return its value or ``("errno", NAME)`` for an OSError, so results compare."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno or 0, str(e.errno)))


def err(name: str) -> tuple[str, str]:
    return ("errno", name)


# --------------------------------------------------------------------------------------------------
# Mounting


@dataclass
class Mounted:
    mnt: Path
    proc: subprocess.Popen[bytes] | None
    stderr_path: Path | None
    kernel: bool
    log_start: int = 0   # where this mount's output starts in stderr_path

    def stderr(self) -> str:
        """What the daemon of this mount wrote (its log: checked after the test, see conftest)."""
        return harness.read_log(self.stderr_path, self.log_start) if self.stderr_path else ""


KERNEL_OPTS = "redirect_dir=off,index=off,metacopy=off"


def mount_kernel(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                 extra: Sequence[str] = ()) -> Mounted:
    assert upper is None or work is not None
    harness.mount_overlay(lowers, upper, work, mnt, [KERNEL_OPTS, *extra])
    return Mounted(mnt, None, None, kernel=True)


def unionfs_cmd(style: str, lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                options: Sequence[str] = (), foreground: bool = True) -> list[str]:
    """The unionfs command line for a union of ``upper`` (may be None) over ``lowers``."""
    cmd = [program("unionfs"), "mount"]
    if foreground:
        cmd.append("-f")
    opts = list(options)
    if style == "overlay":
        cmd += ["-o", ",".join(harness.overlay_options(lowers, upper, work) + opts), str(mnt)]
    elif style in ("aufs", "aufs-modes"):
        if style == "aufs":
            branches = ([str(upper)] if upper is not None else []) + [str(p) for p in lowers]
            if upper is None:
                opts = ["ro", *opts]
        else:
            branches = ([f"{upper}=rw"] if upper is not None else []) + [f"{p}=ro" for p in lowers]
        if opts:
            cmd += ["-o", ",".join(opts)]
        cmd += [":".join(branches), str(mnt)]
    else:
        raise ValueError(style)
    return cmd


def mount_impl(style: str, lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
               options: Sequence[str] = (), logdir: Path | None = None) -> Mounted:
    """Mount the implementation under test in the foreground (so we hold its PID) and wait until
    the mount is ready."""
    logdir = logdir or mnt.parent
    errp = logdir / f"{mnt.name}.stderr"
    if IMPL in ("fuse-overlayfs", "unionfs-overlay"):
        if upper is not None and work is None:
            work = mnt.parent / (mnt.name + ".work")
            work.mkdir(exist_ok=True)
        o = harness.overlay_options(lowers, upper, work)
        o += [x for x in options if not x.startswith("whiteout=") and not x.startswith("timeout=")]
        prog = "fuse-overlayfs" if IMPL == "fuse-overlayfs" else program("unionfs-overlay")
        cmd = [prog, "-f", "-o", ",".join(o), str(mnt)]
    else:
        cmd = unionfs_cmd(style, lowers, upper, work, mnt, options)
    start = errp.stat().st_size if errp.exists() else 0
    proc = harness.start_daemon(cmd, mnt, errp)
    return Mounted(mnt, proc, errp, kernel=False, log_start=start)


def unmount(m: Mounted) -> None:
    rc = umount(m.mnt, m.proc)
    if m.proc is not None:   # its log is checked for warnings and tracebacks after the test
        err_text = m.stderr()
        assert rc == 0, f"daemon exited with {rc} after unmount:\n{err_text}"


# --------------------------------------------------------------------------------------------------
# The differential pair


class Side:
    """One copy of the layers and its mount."""

    def __init__(self, base: Path, name: str):
        self.base = base / name
        self.base.mkdir()
        self.lowers: list[Path] = []
        self.upper: Path | None = None
        self.work: Path | None = None
        self.mnt = self.base / "mnt"
        self.mnt.mkdir()
        self.mounted: Mounted | None = None

    def p(self, rel: str | bytes = b"") -> bytes:
        """Absolute path (bytes) of ``rel`` on this side's mount."""
        r = os.fsencode(rel)
        return os.path.join(os.fsencode(self.mnt), r) if r else os.fsencode(self.mnt)


class Pair:
    """The same layers built twice: ``k`` is mounted with kernel overlayfs, ``u`` with the
    implementation under test. Lower branches of both are digested at build time and checked at
    teardown."""

    def __init__(self, base: Path):
        self.base = base
        self.k = Side(base, "k")
        self.u = Side(base, "u")
        self.lower_digests: dict[Path, str] = {}
        self.style = "overlay"
        self.cleanup: list[Path] = []  # extra mounts (e.g. a small tmpfs) to unmount at the end

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.k, self.u)

    def build(self, lowers: Sequence[Sequence[Entry]], upper: Sequence[Entry] | None = (),
              *, dialect: str = "overlay", style: str = "overlay",
              options: Sequence[str] = (), kernel_options: Sequence[str] = (), mount: bool = True) -> Pair:
        """Render ``lowers`` (top first) and ``upper`` (None: a read-only union) on both sides —
        kernel side always in the overlay dialect, the other in ``dialect`` — and mount them.
        ``style`` is overlay (-o lowerdir=...), aufs (A:B:C) or aufs-modes (A=rw:B=ro)."""
        self.style = style
        self.options = list(options)
        self.kernel_options = list(kernel_options)
        for side, dia in ((self.k, "overlay"), (self.u, dialect)):
            for i, entries in enumerate(lowers):
                lp = side.base / f"l{i}"
                render_layer(lp, entries, dia)
                side.lowers.append(lp)
            if upper is not None:
                side.upper = side.base / "upper"
                render_layer(side.upper, upper, dia)
                if style == "overlay" or side is self.k or IMPL != "unionfs":
                    side.work = side.base / "work"
                    side.work.mkdir()
            for lp in side.lowers:
                self.lower_digests[lp] = layer_digest(lp)
        if mount:
            self.mount()
        return self

    def mount(self, options: Sequence[str] | None = None) -> None:
        opts = self.options if options is None else list(options)
        k, u = self.k, self.u
        if k.mounted is None:
            k.mounted = mount_kernel(k.lowers, k.upper, k.work, k.mnt, self.kernel_options)
        if u.mounted is None:
            u.mounted = mount_impl(self.style, u.lowers, u.upper, u.work, u.mnt, opts, logdir=self.u.base)

    def unmount(self, final: bool = False) -> None:
        """Unmount both sides; with ``final`` also the extra mounts in ``cleanup``."""
        errors = []
        for side in self.sides:
            if side.mounted is not None:
                m, side.mounted = side.mounted, None
                try:
                    unmount(m)
                except (AssertionError, RuntimeError) as e:
                    errors.append(str(e))
        while final and self.cleanup:
            umount(self.cleanup.pop())
        if errors:
            raise AssertionError("\n".join(errors))

    # -- running the same thing on both sides

    def both(self, fn: Callable[[Side], Any]) -> tuple[Any, Any]:
        """``fn(side)`` on each side, OSErrors turned into ("errno", NAME)."""
        return call(fn, self.k), call(fn, self.u)

    @contextlib.contextmanager
    def opened(self, *names: str, flags: int = os.O_RDONLY) -> Iterator[Callable[[Side, str], int]]:
        """Each of *names* opened on both sides for the length of the block, then closed: yields
        ``fd(side, name)``."""
        fds: dict[tuple[Path, str], int] = {}
        try:
            for side in self.sides:
                for name in names:
                    fds[side.base, name] = os.open(side.p(name), flags)
            yield lambda side, name: fds[side.base, name]
        finally:
            for fd in fds.values():
                os.close(fd)

    def same(self, fn: Callable[[Side], Any], what: str = "") -> Any:
        """Run ``fn`` on both sides and assert the results (values or errnos) are equal."""
        k, u = self.both(fn)
        if u != k:
            label = what or getattr(fn, "__name__", "op")
            raise AssertionError(f"{label}: {IMPL} gave {_short(u)}, kernel gave {_short(k)}{_diff(k, u)}")
        return k

    def visible(self, side: Side, rel: str | bytes = b"", **kw: Any) -> dict[bytes, dict[str, Any]]:
        return snapshot(side.p(rel), **kw)

    def assert_same_tree(self, rel: str | bytes = b"", **kw: Any) -> dict[bytes, dict[str, Any]]:
        kt = self.visible(self.k, rel, **kw)
        ut = self.visible(self.u, rel, **kw)
        assert_trees_equal(kt, ut)
        return kt

    def assert_same_upper(self, times: bool = False) -> dict[bytes, dict[str, Any]]:
        """Unmount both and compare the writable branches, whiteouts normalised."""
        self.unmount()
        assert self.k.upper is not None and self.u.upper is not None
        kt = normalise_upper(self.k.upper, times=times)
        ut = normalise_upper(self.u.upper, times=times)
        assert_trees_equal(kt, ut, what="upper layer")
        return kt

    def check_lowers(self) -> None:
        changed = [str(p) for p, dg in self.lower_digests.items() if layer_digest(p) != dg]
        assert not changed, f"lower branches changed: {changed}"


def _short(v: Any, limit: int = 300) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} chars)"


def _diff(k: Any, u: Any) -> str:
    """A line diff when both results are (or contain) long byte strings."""
    import difflib

    def text(v: Any) -> bytes | None:
        if isinstance(v, bytes):
            return v
        if isinstance(v, tuple):
            parts = [x for x in v if isinstance(x, bytes)]
            return b"\n".join(parts) if parts else None
        return None
    a, b = text(k), text(u)
    if a is None or b is None or (len(a) < 300 and len(b) < 300):
        return ""
    sep = b"\0" if b"\0" in a else b"\n"
    lines = list(difflib.unified_diff([repr(x)[2:-1] for x in a.split(sep)],
                                      [repr(x)[2:-1] for x in b.split(sep)],
                                      "kernel", IMPL, lineterm="", n=1))
    return "\n" + "\n".join(lines[:60])


def assert_trees_equal(kernel: dict[bytes, Any], impl: dict[bytes, Any], what: str = "visible tree") -> None:
    """Compare two snapshots and fail with a short, readable list of differences."""
    diffs = []
    for rel in sorted(set(kernel) | set(impl)):
        a, b = kernel.get(rel), impl.get(rel)
        if a != b:
            diffs.append(f"  {rel!r}:\n    kernel:  {a}\n    {IMPL}: {b}")
    if diffs:
        shown = "\n".join(diffs[:20])
        more = f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else ""
        raise AssertionError(f"{what} differs ({len(diffs)} paths):\n{shown}{more}")


def run_tool(args: Sequence[str], cwd: os.PathLike[str] | str | bytes | None = None) -> tuple[int, bytes, bytes]:
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, env={**os.environ, "LC_ALL": "C", "TZ": "UTC"})
    return r.returncode, r.stdout, r.stderr
