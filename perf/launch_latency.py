"""Launch latency of ``unionfs run`` beside ``unshare --root`` and bubblewrap.

Measures, on one busybox root filesystem, the time from starting the launcher to the exec of
``/bin/true`` inside the container ("to exec"), and to the launcher's exit once everything is
unmounted ("total").  The unionfs launcher reports the moment of exec on stderr when
UNIONFS_RUN_TIMING is set (the parent sees its close-on-exec pipe reach EOF); for unshare and
bubblewrap only the total is measured, which bounds their time to exec from above.

    sudo .venv/bin/python perf/launch_latency.py            # 20 runs each
    sudo .venv/bin/python perf/launch_latency.py --runs 50 --no-fuse
    sudo .venv/bin/python perf/launch_latency.py --phases   # where the time goes, milestone by milestone

The launches get a private bytecode cache (PYTHONPYCACHEPREFIX in the work dir, filled by the
warm-up runs), as an installed unionfs has one; ``--compile`` measures them compiling the
checkout's modules at every launch instead, as under PYTHONDONTWRITEBYTECODE=1.

The launches run the ``unionfs`` console script installed beside this interpreter (``unionfs run``
as typed), or ``python -m launcher`` where there is none.

Rows:
  python -c pass          the floor: starting this interpreter and nothing else
  unionfs run (fuse)      the launcher with the unionfs FUSE server as the union (the default),
                          the server forked as the launcher starts and calling the core's serve()
  unionfs run (overlay)   the same launcher over kernel overlayfs: the launcher's own cost
  unionfs run --rootless  FUSE union mounted inside a user namespace
  unshare --root          util-linux unshare with new mount/PID/UTS/IPC namespaces, rootfs = the image dir
  bwrap                   bubblewrap with the image dir bound as / plus /proc and /dev, --unshare-all
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from launcher_util import build_busybox_layer  # noqa: E402


def measure(
    argv: Sequence[str], env: dict[str, str], runs: int, phases: dict[str, list[float]] | None = None
) -> tuple[list[float], list[float], str]:
    """(times to exec, total times, first error) over *runs*; times in milliseconds.

    With *phases*, every milestone the launcher reports (``unionfs-run-timing NAME=T``) is
    appended to ``phases[NAME]``, in milliseconds since the start.
    """
    to_exec: list[float] = []
    total: list[float] = []
    for _ in range(runs):
        t0 = time.monotonic()
        r = subprocess.run(
            list(argv), env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd="/"
        )
        t1 = time.monotonic()
        if r.returncode != 0:
            return [], [], (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        total.append((t1 - t0) * 1000)
        for line in r.stderr.splitlines():
            if not line.startswith("unionfs-run-timing "):
                continue
            name, _, value = line.removeprefix("unionfs-run-timing ").partition("=")
            ms = (float(value) - t0) * 1000
            if name == "exec":
                to_exec.append(ms)
            if phases is not None:
                phases.setdefault(name, []).append(ms)
    return to_exec, total, ""


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f}" if values else "       -"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-fuse", action="store_true", help="skip the rows that need the unionfs FUSE server")
    ap.add_argument("--phases", action="store_true",
                    help="under each unionfs row, the median time of each milestone the launcher reports")
    ap.add_argument("--compile", action="store_true",
                    help="no bytecode cache for the checkout: every launch compiles its modules again "
                         "(PYTHONDONTWRITEBYTECODE=1, as some CI environments set)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("launch_latency: run as root (the rootless row makes its own user namespace)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="unionfs-launch-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        image = work / "image"
        build_busybox_layer(image, work)
        upper = work / "upper"
        upper.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
        env["PYTHONPATH"] = str(REPO)
        env["UNIONFS_RUN_TIMING"] = "1"
        if args.compile:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            # As an installed unionfs runs: compiled modules cached after the first launch.  The
            # cache is private (under *work*), so neither the checkout nor the venv gets files,
            # and an inherited PYTHONDONTWRITEBYTECODE=1 does not make every launch compile
            # the checkout's modules again (20-35 ms here).
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        py = sys.executable
        # `unionfs run` as a user types it: the console script installed beside this interpreter
        # (for this checkout: scripts/setup.sh installs it editable), else the launcher module.
        script = Path(py).parent / "unionfs"
        launcher = [str(script), "run"] if script.exists() else [py, "-m", "launcher"]
        branches = f"{upper}:{image}"
        rows: list[tuple[str, list[str]]] = [("python -c pass", [py, "-c", "pass"])]
        if not args.no_fuse:
            rows.append(("unionfs run (fuse)", [*launcher, "--backend", "fuse", branches, "--", "/bin/true"]))
        rows.append(
            ("unionfs run (overlay)", [*launcher, "--backend", "overlay", branches, "--", "/bin/true"])
        )
        if not args.no_fuse:
            rows.append(
                (
                    "unionfs run --rootless (fuse)",
                    [*launcher, "--rootless", "--backend", "fuse", branches, "--", "/bin/true"],
                )
            )
        if shutil.which("unshare"):
            rows.append(
                (
                    "unshare --root",
                    [
                        "unshare",
                        "--mount",
                        "--pid",
                        "--fork",
                        "--uts",
                        "--ipc",
                        f"--root={image}",
                        "/bin/true",
                    ],
                )
            )
        if shutil.which("bwrap"):
            rows.append(
                (
                    "bwrap",
                    [
                        "bwrap",
                        "--bind",
                        str(image),
                        "/",
                        "--proc",
                        "/proc",
                        "--dev",
                        "/dev",
                        "--unshare-all",
                        "--die-with-parent",
                        "/bin/true",
                    ],
                )
            )
        else:
            print(
                "launch_latency: bwrap not found (apt-get install bubblewrap); its row is skipped",
                file=sys.stderr,
            )
        print(
            f"launch latency, median of {args.runs} runs, milliseconds ({os.uname().release}, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
            f"{'modules compiled at each launch' if args.compile else 'bytecode cached'})"
        )
        print(f"{'':34s} {'to exec':>8s} {'total':>8s}")
        for name, cmd in rows:
            measure(cmd, env, 2)  # warm the page cache
            phases: dict[str, list[float]] = {}
            to_exec, total, error = measure(cmd, env, args.runs, phases)
            if error:
                print(f"{name:34s}  failed: {error}")
            else:
                print(f"{name:34s} {fmt(to_exec)} {fmt(total)}")
            if args.phases and not error:
                for phase, times in sorted(phases.items(), key=lambda kv: statistics.median(kv[1])):
                    print(f"    {phase:30s} {fmt(times)}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
