"""A mount / 10 operations / unmount loop: unionfs beside fuse-overlayfs and the kernel's overlay.

What a tool that mounts per step pays (podman per container and build step, a test suite per
test): each iteration runs the mount command, ten file operations on the merged view, and the
unmount command, on a fresh upper and work directory over one small lower layer; the whole
iteration is timed, and its three phases are reported too.

  unionfs          ``unionfs mount -o lowerdir=L,upperdir=U,workdir=W MNT`` ... ``unionfs umount MNT``
  fuse-overlayfs   ``fuse-overlayfs -o lowerdir=L,upperdir=U,workdir=W MNT`` ... ``fusermount3 -u MNT``
  kernel           ``mount -t overlay overlay -o ...`` ... ``umount MNT`` (root only)
  ... rootless     the two FUSE ones as a user made for the run (fusermount3; /dev/fuse is 0666
                   only while that user's iterations run, and put back after)

The ten operations: stat and read a lower file, list a lower directory, create and write a file,
append to a lower file (copy-up), mkdir, rename a lower file into the new directory, unlink a
lower file, symlink, chmod a lower file.  The reads and the listing are checked as they happen;
after the unmount the upper directory must hold exactly what the operations imply (the copied-up
and created files with their contents, the whiteouts, in overlay's form or ``.wh.`` files) and the
lower layer must be unchanged.  A wrong iteration is reported n/a with its reason, never in a median.

Each implementation runs its iterations in a child process of its own (as the user, for the
rootless rows), in an order that rotates every repetition; ratios are taken within a repetition.

    sudo .venv/bin/python perf/mount_loop.py                      # 3 repetitions of 10 iterations
    sudo .venv/bin/python perf/mount_loop.py --reps 5 --iterations 20 --no-rootless

Writes ``mount-loop-<UTC time>.{txt,json}`` under --out (default perf/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from groups import REPO, VENV_BIN, Sample, Target, exclusive, header, machine, report, rotated, write_results  # noqa: E402

BASE = Path("/var/tmp/unionfs-mountloop")
GROUP = "mount-loop"
ROOT_IMPLS = ("unionfs", "fuse-overlayfs", "kernel")
ROOTLESS_IMPLS = ("unionfs", "fuse-overlayfs")
LOWER = {"a.txt": "alpha\n", "b.txt": "bravo\n", "del.txt": "delete me\n", "ren.txt": "rename me\n",
         "dir/c.txt": "charlie\n"}
TIMEOUT = 60.0
TARGETS = [Target("unionfs", "fuse-overlayfs", 1.5),
           Target("unionfs rootless", "fuse-overlayfs rootless", 1.5)]


class LoopError(Exception):
    """An iteration failed or saw something wrong; one line for the report."""


# -- the child: iterations of one implementation --------------------------------------------------------

def commands(impl: str, lower: Path, upper: Path, work: Path, mnt: Path) -> tuple[list[str], list[str]]:
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if impl == "unionfs":
        unionfs = str(VENV_BIN / "unionfs")
        return [unionfs, "mount", "-o", opts, str(mnt)], [unionfs, "umount", str(mnt)]
    if impl == "fuse-overlayfs":
        return ["fuse-overlayfs", "-o", opts, str(mnt)], ["fusermount3", "-u", str(mnt)]
    return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], ["umount", str(mnt)]


def run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                       cwd="/")
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        raise LoopError(f"{Path(argv[0]).name} {argv[1]} exited {r.returncode}: {lines[-1] if lines else ''}")


def operations(mnt: Path) -> None:
    """The ten operations, the reads and the listing checked."""
    if os.stat(mnt / "a.txt").st_size != len(LOWER["a.txt"]):                       # 1 stat
        raise LoopError("stat a.txt: wrong size")
    if (mnt / "a.txt").read_text() != LOWER["a.txt"]:                                  # 2 read
        raise LoopError("read a.txt: wrong content")
    if os.listdir(mnt / "dir") != ["c.txt"]:                                            # 3 readdir
        raise LoopError(f"ls dir: {os.listdir(mnt / 'dir')}")
    (mnt / "new.txt").write_text("new\n")                                              # 4 create
    with open(mnt / "b.txt", "a") as f:                                                 # 5 copy-up
        f.write("more\n")
    os.mkdir(mnt / "newdir")                                                            # 6 mkdir
    os.rename(mnt / "ren.txt", mnt / "newdir" / "ren.txt")                              # 7 rename
    os.unlink(mnt / "del.txt")                                                          # 8 unlink
    os.symlink("a.txt", mnt / "link")                                                   # 9 symlink
    os.chmod(mnt / "dir" / "c.txt", 0o600)                                              # 10 chmod


def whiteout(upper: Path, name: str) -> bool:
    """*name* is hidden in *upper*: overlay's 0/0 character device or a ``.wh.`` file."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(upper / name)
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    return (upper / f".wh.{name}").exists()


def check_upper(lower: Path, upper: Path) -> None:
    """After the unmount: the upper layer holds what the operations imply; the lower is unchanged."""
    wrong = []
    for name, want in (("new.txt", "new\n"), ("b.txt", "bravo\nmore\n"), ("newdir/ren.txt", "rename me\n")):
        p = upper / name
        if not p.is_file() or p.read_text() != want:
            wrong.append(f"{name} not in the upper layer with its content")
    if not (upper / "link").is_symlink() or os.readlink(upper / "link") != "a.txt":
        wrong.append("no symlink link -> a.txt in the upper layer")
    c = upper / "dir" / "c.txt"
    if not c.is_file() or stat.S_IMODE(c.stat().st_mode) != 0o600 or c.read_text() != LOWER["dir/c.txt"]:
        wrong.append("dir/c.txt not copied up with mode 0600")
    for name in ("del.txt", "ren.txt"):
        if not whiteout(upper, name):
            wrong.append(f"no whiteout for {name}")
    for name, want in LOWER.items():
        if (lower / name).read_text() != want:
            wrong.append(f"the lower layer's {name} changed")
    if wrong:
        raise LoopError("; ".join(wrong))


def iteration(impl: str, base: Path) -> dict[str, float]:
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
    mount, umount = commands(impl, lower, upper, work, mnt)
    t0 = time.monotonic()
    run(mount)
    t1 = time.monotonic()
    try:
        operations(mnt)
        t2 = time.monotonic()
    finally:
        run(umount)
    t3 = time.monotonic()
    check_upper(lower, upper)
    return {"seconds": t3 - t0, "mount": t1 - t0, "ops": t2 - t1, "unmount": t3 - t2}


def worker(impl: str, base: Path, n: int) -> None:
    """N iterations; one JSON line each (the parent reads them)."""
    for _ in range(n):
        try:
            print(json.dumps(iteration(impl, base)), flush=True)
        except (LoopError, OSError, subprocess.TimeoutExpired) as e:
            print(json.dumps({"error": str(e).splitlines()[0] if str(e) else type(e).__name__}), flush=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True, timeout=TIMEOUT)


# -- the parent -----------------------------------------------------------------------------------------

def layout(base: Path, owner: int | None) -> None:
    for d in ("lower/dir", "upper", "work", "mnt"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for name, text in LOWER.items():
        (base / "lower" / name).write_text(text)
    if owner is not None:  # the user's own group too: a copy-up keeps the group, which must be theirs
        gid = pwd.getpwuid(owner).pw_gid
        for p in [base, *base.rglob("*")]:
            os.lchown(p, owner, gid)


@contextlib.contextmanager
def fuse_open_to_all() -> Iterator[None]:
    """/dev/fuse 0666 for as long as a rootless child runs, then its mode as before."""
    old = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", old)


def run_child(impl: str, base: Path, n: int, user: int | None,
              env: dict[str, str]) -> list[dict[str, object]]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, str(base), str(n)]
    kw: dict[str, object] = {}
    if user is not None:
        kw.update(user=user, group=pwd.getpwuid(user).pw_gid, extra_groups=[])
    with fuse_open_to_all() if user is not None else contextlib.nullcontext():
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", stdin=subprocess.DEVNULL,
                           timeout=TIMEOUT * 3 * n, **kw)  # type: ignore[call-overload]
    rows: list[dict[str, object]] = [json.loads(line) for line in r.stdout.splitlines()
                                     if line.startswith("{")]
    if r.returncode != 0 or len(rows) < n:
        tail = [line for line in r.stderr.splitlines() if line.strip()][-1:]
        rows.append({"error": f"the child exited {r.returncode}: {tail[0] if tail else ''}"})
    return rows


def cleanup_stale() -> None:
    prefix = str(BASE) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(BASE, ignore_errors=True)


def remove_user(name: str, uid: int) -> None:
    """userdel, once the user's processes (its resident server, which we started) are gone."""
    for _ in range(100):
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == uid]
        if not left:
            break
        if _ == 50:
            for p in left:
                with contextlib.suppress(OSError):
                    os.kill(int(p.name), 9)
        time.sleep(0.1)
    r = subprocess.run(["userdel", name], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"mount_loop: userdel {name}: {r.stderr.strip()}", file=sys.stderr)


def _owner(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None


def phase_table(phases: list[dict[str, object]], rows: Sequence[str]) -> str:
    lines = [f"  phases (ms, medians of valid iterations): {'mount':>8s} {'10 ops':>8s} {'unmount':>8s}"]
    for row in rows:
        mine = [p for p in phases if p["row"] == row and "error" not in p]
        if mine:
            med = [statistics.median(float(p[k]) for p in mine) * 1000  # type: ignore[arg-type]
                   for k in ("mount", "ops", "unmount")]
            lines.append(f"  {row:41s} {med[0]:8.1f} {med[1]:8.1f} {med[2]:8.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=10, help="iterations per row and repetition")
    ap.add_argument("--no-rootless", action="store_true", help="only the rows of root")
    ap.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "DIR", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), int(args.worker[2]))
        return 0
    if os.geteuid() != 0 or shutil.which("fuse-overlayfs") is None or shutil.which("fusermount3") is None:
        print("mount_loop: run as root, with fuse-overlayfs and fusermount3 installed", file=sys.stderr)
        return 2
    with exclusive(Path(f"{BASE}.lock")):
        return measure_all(args)


def measure_all(args: argparse.Namespace) -> int:
    info = machine()
    cleanup_stale()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "UNIONFS_SERVER",
                                                             "XDG_RUNTIME_DIR")}
    env["HOME"] = "/"
    samples: list[Sample] = []
    phases: list[dict[str, object]] = []
    user: int | None = None
    name = f"ufsloop{os.getpid() % 100000}"
    try:
        if not args.no_rootless:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                           check=True, capture_output=True)
            user = pwd.getpwnam(name).pw_uid
        rows: list[tuple[str, int | None]] = [(impl, None) for impl in ROOT_IMPLS]
        rows += [(impl, user) for impl in ROOTLESS_IMPLS if user is not None]
        labels = {(impl, u): impl + (" rootless" if u is not None else "") for impl, u in rows}
        for (impl, u), label in labels.items():
            layout(BASE / label.replace(" ", "-"), u)
            run_child(impl, BASE / label.replace(" ", "-"), 1, u, env)  # warm-up: caches, the resident server
        print(f"mount_loop: {info['date_utc']}, load {info['load_start']:.2f}", flush=True)
        for rep in range(args.reps):
            for impl, u in rotated(rows, rep):
                label = labels[(impl, u)]
                got = run_child(impl, BASE / label.replace(" ", "-"), args.iterations, u, env)
                for row in got:
                    seconds = row.get("seconds")
                    value = float(seconds) if isinstance(seconds, float) else None
                    samples.append(Sample(GROUP, label, rep, value, str(row.get("error", ""))))
                    phases.append({"row": label, "rep": rep, **row})
                ok = sorted(float(r["seconds"]) for r in got if "seconds" in r)  # type: ignore[arg-type]
                errors = [r["error"] for r in got if "error" in r]
                print(f"  rep {rep + 1} {label:24s} {ok[len(ok) // 2] * 1000 if ok else float('nan'):7.1f} ms"
                      f"{'  error: ' + str(errors[0]) if errors else ''}", flush=True)
    finally:
        cleanup_stale()
        if user is not None:
            subprocess.run([str(VENV_BIN / "unionfs"), "server", "stop"], env=env, capture_output=True,
                           user=user, cwd="/")
            shutil.rmtree(f"/tmp/unionfs-{user}", ignore_errors=True)
            remove_user(name, user)
    impls = list(dict.fromkeys(s.impl for s in samples))
    text, verdicts = report(samples, GROUP, "mount, 10 operations, unmount", impls, args.reps, TARGETS)
    text = "\n".join([header(info), "", text, phase_table(phases, impls)])
    print("\n" + text)
    txt = write_results(args.out, "mount-loop", text, {"machine": info, "reps": args.reps,
                                                        "iterations": args.iterations, "targets": verdicts,
                                                        "phases": phases}, samples)
    print(f"wrote {txt} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
