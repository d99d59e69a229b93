"""Mount start-up: from the mount command's start to the mount usable, beside fuse-overlayfs.

Each row times, run by run, the mount command followed by ``cat MNT/file`` (the first request the
mount serves), as the user who mounts; the unmount that follows is not timed.  The unionfs command
(A) and fuse-overlayfs (B) run in turn, A B A B ..., and the ratio is taken pair by pair, so that a
machine whose speed drifts (other work on it) moves both sides alike.  Medians are printed.

    sudo .venv/bin/python perf/startup.py              # 20 pairs per row
    sudo .venv/bin/python perf/startup.py --runs 50 --no-rootless

Rows (A; B is the same mount by fuse-overlayfs):
  unionfs mount (C)       ``unionfs mount A:B MNT`` by the C client (unionfs/server/fastclient.c, as
                          /usr/local/bin has it after scripts/setup.sh) through the resident server
  unionfs mount (Python)  the same by the Python console script (its client: unionfs.server.fastmount)
  unionfs mount (off)     the same with ``UNIONFS_SERVER=off``: no server, the whole FUSE server started
  unionfs-overlay (...)   ``unionfs-overlay -o lowerdir=,upperdir=,workdir= MNT``, as podman calls it
  mount -t fuse (...)     mount(8) and mount.fuse3 running unionfs-overlay (``PROGRAM#SOURCE``)
  ... rootless            the same as a user made for the run (fusermount3; /dev/fuse 0666 meanwhile)
The server is started by the first (warm-up) mount.  ``--private-state`` runs the whole in a mount
namespace of its own with a tmpfs on /run/unionfs, so that root's server of another checkout (which
a mount of this one asks to give way) is not in the way.

The commands get a private bytecode cache (PYTHONPYCACHEPREFIX in the work dir, filled by warm-up
runs), as an installed unionfs has one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mount_loop import remove_user  # noqa: E402

BIN = Path(sys.executable).parent
WARMUP = 3


class Side:
    """One mount command: how to mount, and where."""

    def __init__(self, argv: list[str], mnt: Path, env: dict[str, str], user: int | None) -> None:
        self.argv, self.mnt, self.env, self.user = argv, mnt, env, user

    def once(self) -> float:
        """Seconds from the start of the mount command to the end of the first read."""
        kw: dict[str, object] = {"env": self.env, "stdin": subprocess.DEVNULL, "capture_output": True,
                                 "cwd": "/"}
        if self.user is not None:
            kw.update(user=self.user, group=pwd.getpwuid(self.user).pw_gid, extra_groups=[])
        t0 = time.monotonic()
        r = subprocess.run(self.argv, **kw)  # type: ignore[call-overload]
        c = subprocess.run(["cat", str(self.mnt / "f")], **kw)  # type: ignore[call-overload]
        t1 = time.monotonic()
        self.unmount()
        if r.returncode != 0 or c.returncode != 0:
            raise RuntimeError(f"{' '.join(self.argv)}: {(r.stderr or c.stderr).decode().strip()}")
        return t1 - t0

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


def pairs(a: Side, b: Side, runs: int) -> tuple[float, float, float]:
    """(median ms of A, median ms of B, median of the pairwise ratios A/B)."""
    for _ in range(WARMUP):
        a.once()
        b.once()
    ta, tb = [], []
    for _ in range(runs):
        ta.append(a.once())
        tb.append(b.once())
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return statistics.median(ta) * 1000, statistics.median(tb) * 1000, statistics.median(ratios)


def layout(base: Path, owner: int | None) -> dict[str, Path]:
    dirs = {n: base / n for n in ("lower", "upper", "work", "mnt", "upper2", "work2", "mnt2")}
    for d in dirs.values():
        d.mkdir(parents=True)
    (dirs["lower"] / "f").write_text("f\n")
    if owner is not None:
        for p in [base, *base.rglob("*")]:
            os.lchown(p, owner, owner)
    return dirs


def c_client(work: Path) -> Path | None:
    """A directory with ``unionfs`` and ``unionfs-overlay`` linked to the C client (built by
    scripts/setup.sh beside the Python commands), as /usr/local/bin has them; None without one."""
    binary = BIN / "unionfs-fastclient"
    if not binary.exists():
        return None
    links = work / "cbin"
    links.mkdir()
    for name in ("unionfs", "unionfs-overlay"):
        (links / name).symlink_to(binary)
    return links


def rows(d: dict[str, Path], env: dict[str, str], user: int | None, suffix: str,
         cbin: Path | None) -> list[tuple[str, Side, Side]]:
    off = dict(env, UNIONFS_SERVER="off")
    opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}"
    fopts = f"lowerdir={d['lower']},upperdir={d['upper2']},workdir={d['work2']}"
    fuse_overlayfs = Side(["fuse-overlayfs", "-o", fopts, str(d["mnt2"])], d["mnt2"], env, user)
    branches = [f"{d['upper']}=rw:{d['lower']}", str(d["mnt"])]
    mnt = d["mnt"]
    out: list[tuple[str, Side]] = []
    for kind, bindir in ([("C", cbin)] if cbin is not None else []) + [("Python", BIN)]:
        unionfs, overlay = str(bindir / "unionfs"), str(bindir / "unionfs-overlay")
        out += [(f"unionfs mount ({kind})", Side([unionfs, "mount", *branches], mnt, env, user)),
                (f"unionfs-overlay ({kind})", Side([overlay, "-o", opts, str(mnt)], mnt, env, user))]
        if user is None:   # mount(8) for a user needs an fstab entry
            m8 = Side(["mount", "-t", "fuse", f"{overlay}#overlay", "-o", opts, str(mnt)], mnt, env, None)
            out.append((f"mount -t fuse ({kind})", m8))
    unionfs, overlay = str(BIN / "unionfs"), str(BIN / "unionfs-overlay")
    out += [("unionfs mount (off)", Side([unionfs, "mount", *branches], mnt, off, user)),
            ("unionfs-overlay (off)", Side([overlay, "-o", opts, str(mnt)], mnt, off, user))]
    m8b = Side(["mount", "-t", "fuse.fuse-overlayfs", "-o", fopts, "overlay", str(d["mnt2"])], d["mnt2"], env,
               None)
    return [(name + suffix, a, m8b if name.startswith("mount") else fuse_overlayfs) for name, a in out]


@contextlib.contextmanager
def test_user() -> Iterator[int]:
    name = f"ufsperf{os.getpid() % 100000}"
    with contextlib.suppress(KeyError):    # left by a run that was killed
        remove_user(name, pwd.getpwnam(name).pw_uid)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    old = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    uid = pwd.getpwnam(name).pw_uid
    try:
        yield uid
    finally:
        os.chmod("/dev/fuse", old)
        remove_user(name, uid)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-rootless", action="store_true", help="skip the rows of a user other than root")
    ap.add_argument("--private-state", action="store_true",
                    help="in a mount namespace of its own, with a tmpfs on /run/unionfs")
    args = ap.parse_args(argv)
    if args.private_state:
        argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--private-state"]
        script = 'mkdir -p /run/unionfs && mount -t tmpfs -o mode=0700 tmpfs /run/unionfs && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", sys.executable,
               str(Path(__file__).resolve()), *argv]
        return subprocess.run(cmd).returncode
    if os.geteuid() != 0 or shutil.which("fuse-overlayfs") is None:
        print("startup: run as root, with fuse-overlayfs installed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="unionfs-startup-", dir="/tmp"))
    os.chmod(work, 0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "UNIONFS_SERVER")}
    cbin = c_client(work)
    print(f"{'mount command':30} {'unionfs ms':>10} {'fuse-overlayfs ms':>18} {'ratio':>7}")
    try:
        todo = [(None, "")] if args.no_rootless else [(None, ""), (-1, " rootless")]
        for user, suffix in todo:
            with contextlib.ExitStack() as stack:
                if user is not None:
                    user = stack.enter_context(test_user())
                base = work / (suffix.strip() or "root")
                d = layout(base, user)
                cache = base / "pycache"
                cache.mkdir()
                if user is not None:
                    os.chown(cache, user, user)
                e = dict(env, PYTHONPYCACHEPREFIX=str(cache), HOME="/")
                e.pop("XDG_RUNTIME_DIR", None)
                try:
                    for name, a, b in rows(d, e, user, suffix, cbin):
                        ma, mb, ratio = pairs(a, b, args.runs)
                        print(f"{name:30} {ma:10.1f} {mb:18.1f} {ratio:7.1f}x", flush=True)
                finally:
                    stop = [str(BIN / "unionfs"), "server", "stop"]
                    kw = {"user": user} if user is not None else {}
                    subprocess.run(stop, env=e, capture_output=True, **kw)  # type: ignore[call-overload]
                    if user is not None:
                        shutil.rmtree(f"/tmp/unionfs-{user}", ignore_errors=True)
    finally:
        for mp in sorted((ln.split()[4] for ln in open("/proc/self/mountinfo")), reverse=True):
            if mp.startswith(str(work)):
                subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
