"""``unionfs run`` where container users spend time, beside bubblewrap and podman, on one Debian root.

Two workloads on a Debian bookworm minbase root filesystem (the one ``tests/launcher/test_run_debian.py``
builds with mmdebstrap and caches under /var/tmp/unionfs-test-cache; built here when missing):

  launch   the time from starting the launcher to its exit, running ``/bin/true`` with a fresh,
           empty container layer: for the bubblewrap and podman rows this includes mounting the
           union before and unmounting it after, as ``unionfs run`` does both.  unionfs also
           reports the moment of exec (``UNIONFS_RUN_TIMING``), shown as "to exec".
  apt      ``apt-get update && apt-get install -y --no-install-recommends jq file`` in a fresh
           container layer, with the host's network.  A run counts only if it exits 0, ran jq and
           file, and left /usr/bin/jq in the container layer.

Implementations, each as a user would start it (the union mounted by this script, where it is
not the launcher's own):

  unionfs               .venv/bin/unionfs run UPPER:ROOTFS -- CMD (its FUSE server, host network)
  kernel+bwrap          mount -t overlay; bwrap --bind MERGED / --proc /proc --dev /dev
                        --unshare-pid --unshare-ipc --unshare-uts CMD; umount
  fuse-overlayfs+bwrap  fuse-overlayfs -f (our child); the same bwrap; fusermount3 -u
  podman                mount -t overlay; podman run --rm --network host --rootfs MERGED CMD; umount
                        (runc; skipped with its error line when podman cannot run here)

Repetitions are interleaved: in every repetition each implementation runs once (apt) or
``--launch-runs`` times (launch), in an order that rotates from one repetition to the next.
Reported: medians over repetitions, and the ratios unionfs / fuse-overlayfs+bwrap and unionfs /
kernel+bwrap computed within each repetition (their median, and every repetition's).  For apt
also the two phases (update, install: timed inside the container), the CPU time of the whole
run (every process of it is in one cgroup, podman's conmon and container included), and that
of the FUSE server alone (sampled from /proc every 50 ms).  Podman runs with ``--ulimit`` flags
no higher than our own limits when its defaults fail (runc cannot raise RLIMIT_NOFILE without
CAP_SYS_RESOURCE); the flags used are printed and kept in the JSON.

    sudo .venv/bin/python perf/run_workloads.py                  # 3 repetitions, about 2 minutes
    sudo .venv/bin/python perf/run_workloads.py --reps 5 --only apt --impls unionfs,kernel+bwrap

Writes ``run-workloads-<UTC time>.json`` and ``.txt`` under --out (default perf/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unionfs.core import mountinfo

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
CACHE = Path(os.environ.get("UNIONFS_TEST_CACHE", "/var/tmp/unionfs-test-cache"))
ROOTFS = CACHE / "bookworm-minbase"
BASE = Path("/var/tmp/unionfs-runperf")
IMPLS = ("unionfs", "kernel+bwrap", "fuse-overlayfs+bwrap", "podman")
WORKLOADS = ("launch", "apt")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APT_SCRIPT = """set -e
t0=$(date +%s.%N)
apt-get update -q
t1=$(date +%s.%N)
apt-get install -q -y --no-install-recommends jq file
t2=$(date +%s.%N)
echo '{"ok": 1}' | jq -e .ok >/dev/null
file -L /usr/bin/jq
echo "runperf-phases $t0 $t1 $t2"
"""
MOUNT_TIMEOUT = 30.0
APT_TIMEOUT = 900.0


class RunError(Exception):
    """One run failed or did not validate; the message is one line for the report."""


@dataclass
class Sample:
    """One measured run."""

    workload: str
    impl: str
    rep: int
    seconds: float | None = None  # launcher start to exit, union mounted and unmounted
    to_exec: float | None = None  # unionfs only: start to the exec of the command
    phases: dict[str, float] = field(default_factory=dict)  # apt: update, install (in the container)
    cpu: float | None = None  # CPU seconds of every process of the run (its cgroup)
    server_cpu: float | None = None  # the FUSE server's user+sys (sampled)
    error: str = ""


# -- the root filesystem --------------------------------------------------------------------------------

def debian_rootfs() -> Path:
    """Debian bookworm minbase, as tests/launcher/test_run_debian.py builds and caches it."""
    if ROOTFS.is_dir():
        return ROOTFS
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "launcher")]
    import test_run_debian

    return Path(test_run_debian.debian_rootfs())


# -- mounts ---------------------------------------------------------------------------------------------

def mounted_under(prefix: Path) -> list[str]:
    inside = os.fsencode(str(prefix)) + b"/"
    return [os.fsdecode(m.point) for m in mountinfo.mounts() if m.point.startswith(inside)]


def is_mounted(path: Path) -> bool:
    return mountinfo.mount_at(os.fsencode(str(path))) is not None


def cleanup_stale() -> None:
    """Unmount what an interrupted run left under BASE, and remove its directories."""
    for point in sorted(mounted_under(BASE), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(BASE, ignore_errors=True)


@dataclass
class Layer:
    """A fresh container layer: upper and work directories and a mount point."""

    root: Path

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def options(self, rootfs: Path) -> str:
        return f"lowerdir={rootfs},upperdir={self.upper},workdir={self.work}"


@contextlib.contextmanager
def fresh_layer(impl: str) -> Iterator[Layer]:
    """Empty upper, work and merged directories; removed afterwards (their removal is not timed)."""
    root = BASE / impl
    shutil.rmtree(root, ignore_errors=True)
    layer = Layer(root)
    for d in (layer.upper, layer.work, layer.merged):
        d.mkdir(parents=True)
    try:
        yield layer
    finally:
        if is_mounted(layer.merged):
            subprocess.run(["umount", "-l", str(layer.merged)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def kernel_overlay(layer: Layer, rootfs: Path, group: CpuGroup | None = None) -> Iterator[None]:
    join = group.join if group else None
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", layer.options(rootfs), str(layer.merged)],
                   check=True, capture_output=True, preexec_fn=join)
    try:
        yield
    finally:
        subprocess.run(["umount", str(layer.merged)], check=True, capture_output=True, preexec_fn=join)


@contextlib.contextmanager
def fuse_overlayfs(layer: Layer, rootfs: Path, daemons: list[int], group: CpuGroup) -> Iterator[None]:
    """fuse-overlayfs in the foreground as our child: we know its pid and wait for it."""
    proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", layer.options(rootfs), str(layer.merged)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=group.join)
    try:
        try:
            mountinfo.wait_for_mount(layer.merged, MOUNT_TIMEOUT, exited=proc.poll)
        except ChildProcessError:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise RunError(f"fuse-overlayfs exited {proc.returncode}: {err}") from None
        except TimeoutError:
            raise RunError("fuse-overlayfs did not mount") from None
        daemons.append(proc.pid)
        yield
    finally:
        if is_mounted(layer.merged):
            subprocess.run(["fusermount3", "-u", str(layer.merged)], capture_output=True,
                           preexec_fn=group.join)
        try:
            proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


# -- the commands ---------------------------------------------------------------------------------------

def bwrap_argv(merged: Path, command: Sequence[str]) -> list[str]:
    """bubblewrap with the namespaces ``unionfs run`` makes (not the network: host network)."""
    return ["bwrap", "--bind", str(merged), "/", "--proc", "/proc", "--dev", "/dev", "--unshare-pid",
            "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--clearenv", "--setenv", "PATH", PATH,
            "--setenv", "HOME", "/root", *command]


def podman_argv(merged: Path, ulimits: Sequence[str], command: Sequence[str]) -> list[str]:
    return ["podman", "run", "--rm", "--network", "host", *ulimits, "--rootfs", str(merged), *command]


def unionfs_argv(layer: Layer, rootfs: Path, command: Sequence[str]) -> list[str]:
    return [str(VENV_BIN / "unionfs"), "run", "--net", "host", f"{layer.upper}:{rootfs}", "--", *command]


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "PYTHONDONTWRITEBYTECODE")}
    env["UNIONFS_RUN_TIMING"] = "1"
    env["PATH"] = PATH
    return env


def podman_ulimits(rootfs: Path) -> tuple[list[str], str]:
    """Flags with which ``podman run`` starts a container here, or ([], the reason it cannot).

    runc raises RLIMIT_NOFILE (podman's default 1048576) and RLIMIT_NPROC in the container, which
    fails without CAP_SYS_RESOURCE ("error setting rlimit type 7"); limits no higher than ours do.
    """
    if shutil.which("podman") is None:
        return [], "podman not installed"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    candidates: list[list[str]] = [[], ["--ulimit", "host"], ["--ulimit", f"nofile={nofile}:{nofile}"]]
    for n in (nproc, 32768, 4096):
        candidates.append(["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={n}:{n}"])
    reason = ""
    for flags in candidates:
        # podman writes mount targets (/etc/hosts, /run/.containerenv) into its --rootfs: never the image
        with fresh_layer("podman-probe") as layer, kernel_overlay(layer, rootfs):
            r = subprocess.run(podman_argv(layer.merged, flags, ["/bin/true"]), capture_output=True,
                               text=True, timeout=120, stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            return flags, ""
        reason = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return [], reason


# -- CPU accounting -------------------------------------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, parent pid, user+sys seconds) of *pid*."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICK


class ServerSampler:
    """Samples the CPU time of the FUSE server while a run goes on: the unionfs server (the
    launcher's child whose command line is the launcher's) or a fuse-overlayfs daemon of ours."""

    def __init__(self, launcher: int | None, daemons: list[int]) -> None:
        self.launcher = launcher
        self.daemons = daemons
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _servers(self) -> list[int]:
        pids = list(self.daemons)
        if self.launcher is not None:
            try:
                children = Path(f"/proc/{self.launcher}/task/{self.launcher}/children").read_text().split()
            except OSError:
                children = []
            pids += [int(c) for c in children if _stat(int(c)) and _stat(int(c))[0] == "unionfs"]  # type: ignore[index]
        return pids

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self._servers():
                st = _stat(pid)
                if st is not None:
                    self.cpu[pid] = max(self.cpu.get(pid, 0.0), st[2])

    @property
    def total(self) -> float | None:
        return sum(self.cpu.values()) if self.cpu else None


class CpuGroup:
    """A cgroup (v1 cpuacct, or v2) that every process of a run joins: the mount and unmount
    commands, the launcher, the FUSE server, the container, and podman's conmon and container
    (``--cgroup-parent``), so that ``usage()`` is the CPU time the whole run took on any core.
    Daemonized processes escape ``RUSAGE_CHILDREN``; they do not escape their cgroup."""

    V1 = Path("/sys/fs/cgroup/cpuacct")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, name: str) -> None:
        self.name = name
        self.v1 = (self.V1 / "cpuacct.usage").exists()
        root = self.V1 if self.v1 else self.V2
        self.path: Path | None = root / name
        try:
            if not self.v1 and not (self.V2 / "cgroup.controllers").exists():
                raise OSError("no cpuacct cgroup hierarchy")
            self.path.mkdir(exist_ok=True)
        except OSError as exc:
            print(f"run_workloads: no CPU accounting ({exc})", file=sys.stderr)
            self.path = None

    def join(self) -> None:
        """Move the calling process into the group (a child's preexec_fn)."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def usage(self) -> float | None:
        if self.path is None:
            return None
        if self.v1:
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        for line in (self.path / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
        return None

    def podman_flags(self) -> list[str]:
        """podman puts conmon and the container in cgroups of its own: under ours, with this."""
        return [f"--cgroup-parent=/{self.name}"] if self.path is not None else []

    def remove(self) -> None:
        """Remove the group and what podman made under it, once they are empty."""
        if self.path is None:
            return
        for dirpath, _dirs, _files in sorted(os.walk(self.path), key=lambda e: -len(e[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


# -- one run --------------------------------------------------------------------------------------------

def run_once(impl: str, workload: str, rep: int, rootfs: Path, podman_flags: Sequence[str],
             group: CpuGroup) -> Sample:
    """One launch of *impl* on a fresh container layer, timed from before the union is mounted to
    after it is unmounted; validated; a failure becomes the sample's error."""
    sample = Sample(workload, impl, rep)
    command = ["/bin/true"] if workload == "launch" else ["/bin/sh", "-c", APT_SCRIPT]
    timeout = 60.0 if workload == "launch" else APT_TIMEOUT
    daemons: list[int] = []
    with fresh_layer(impl) as layer:
        cpu0 = group.usage()
        try:
            t0 = time.monotonic()
            if impl == "unionfs":
                out, err, sampler = _launch(unionfs_argv(layer, rootfs, command), timeout, daemons, group,
                                            own_server=True, sample_cpu=workload == "apt")
            else:
                mount = (fuse_overlayfs(layer, rootfs, daemons, group) if impl == "fuse-overlayfs+bwrap"
                         else kernel_overlay(layer, rootfs, group))
                argv = (podman_argv(layer.merged, [*podman_flags, *group.podman_flags()], command)
                        if impl == "podman" else bwrap_argv(layer.merged, command))
                with mount:
                    out, err, sampler = _launch(argv, timeout, daemons, group, own_server=False,
                                                sample_cpu=workload == "apt")
            t1 = time.monotonic()
            sample.seconds = t1 - t0
            cpu1 = group.usage()
            sample.cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
            sample.server_cpu = sampler.total if sampler else None
            for line in err.splitlines():
                if line.startswith("unionfs-run-timing exec="):
                    sample.to_exec = float(line.partition("=")[2]) - t0
            if workload == "apt":
                sample.phases = _validate_apt(out, layer.upper)
        except (RunError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            sample.error = _one_line(exc)
    return sample


def _launch(argv: list[str], timeout: float, daemons: list[int], group: CpuGroup, own_server: bool,
            sample_cpu: bool) -> tuple[str, str, ServerSampler | None]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd="/", env=run_env(), preexec_fn=group.join)
    sampler = ServerSampler(proc.pid if own_server else None, daemons) if sample_cpu else None
    with sampler if sampler else contextlib.nullcontext():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child; its container dies with it (PDEATHSIG / --die-with-parent)
            proc.communicate()
            raise
    if proc.returncode != 0:
        lines = [line for line in err.splitlines()
                 if line.strip() and not line.startswith("unionfs-run-timing")]
        raise RunError(f"{Path(argv[0]).name} exited {proc.returncode}: {lines[-1] if lines else ''}")
    return out, err, sampler


def _validate_apt(out: str, upper: Path) -> dict[str, float]:
    marks = [line.split()[1:] for line in out.splitlines() if line.startswith("runperf-phases ")]
    if not marks:
        raise RunError("the apt script did not finish (no phase marks in its output)")
    if "ELF" not in out:
        raise RunError("file did not describe /usr/bin/jq as ELF")
    jq = upper / "usr" / "bin" / "jq"
    if not jq.is_file() or jq.is_symlink():
        raise RunError(f"no regular file usr/bin/jq in the container layer {upper}")
    t0, t1, t2 = (float(x) for x in marks[-1])
    return {"update": t1 - t0, "install": t2 - t1}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        return f"{Path(str(exc.cmd[0])).name} exited {exc.returncode}: {err.strip().splitlines()[-1:] or ''}"
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"timed out after {exc.timeout:.0f} s"
    return str(exc)


# -- the report -----------------------------------------------------------------------------------------

def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "load_start": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
            "python": platform.python_version(),
            "versions": {tool: _version(tool, needle) for tool, needle in (
                ("bwrap", "bubblewrap"), ("fuse-overlayfs", "fuse-overlayfs"), ("podman", "podman"),
                ("runc", "runc"))}}


def _version(tool: str, needle: str) -> str:
    """The line of ``TOOL --version`` that names it (fuse-overlayfs also names fusermount3's)."""
    try:
        r = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return "not installed"
    lines = [line.strip() for line in (r.stdout + r.stderr).splitlines() if needle in line]
    return lines[0] if lines else ""


def _median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _fmt(value: float | None, unit: str = "", width: int = 9) -> str:
    if value is None:
        return f"{'-':>{width}s}"
    return f"{value:{width}.{3 if unit == 's' and value < 10 else 1}f}"


def rep_value(samples: list[Sample], workload: str, impl: str, rep: int) -> float | None:
    """The repetition's time for *impl*: its median over the repetition's launches."""
    return _median([s.seconds for s in samples if (s.workload, s.impl, s.rep) == (workload, impl, rep)
                    and not s.error])


def ratios(samples: list[Sample], workload: str, reps: int, against: str) -> list[float]:
    out = []
    for rep in range(reps):
        ours = rep_value(samples, workload, "unionfs", rep)
        theirs = rep_value(samples, workload, against, rep)
        if ours is not None and theirs:
            out.append(ours / theirs)
    return out


def report(samples: list[Sample], impls: Sequence[str], workloads: Sequence[str], reps: int,
           skipped: dict[str, str]) -> str:
    lines = []
    for workload in workloads:
        what = ("launch to exit of /bin/true, mount and unmount included; ms" if workload == "launch"
                else "apt-get update && apt-get install jq file; seconds")
        lines.append(f"{workload}: {what}; medians over {reps} repetitions")
        unit = 1000.0 if workload == "launch" else 1.0
        if workload == "launch":
            lines.append(f"  {'implementation':24s} {'total':>9s} {'to exec':>9s} {'min':>9s} {'max':>9s}")
        else:
            lines.append(f"  {'implementation':24s} {'total':>9s} {'update':>9s} {'install':>9s} "
                         f"{'CPU':>9s} {'server':>9s}")
        for impl in impls:
            if impl in skipped:
                lines.append(f"  {impl:24s} n/a: {skipped[impl]}")
                continue
            mine = [s for s in samples if (s.workload, s.impl) == (workload, impl)]
            errors = [s.error for s in mine if s.error]
            per_rep = [v for v in (rep_value(samples, workload, impl, r) for r in range(reps))
                       if v is not None]
            if not per_rep:
                lines.append(f"  {impl:24s} n/a: {errors[0] if errors else 'no run'}")
                continue
            ok = [s for s in mine if not s.error]
            total = statistics.median(per_rep) * unit
            note = f"  ({len(errors)} failed: {errors[0]})" if errors else ""
            if workload == "launch":
                to_exec = _median([s.to_exec for s in ok])
                lines.append(f"  {impl:24s} {_fmt(total)} {_fmt(to_exec * unit if to_exec else None)} "
                             f"{_fmt(min(s.seconds or 0 for s in ok) * unit)} "
                             f"{_fmt(max(s.seconds or 0 for s in ok) * unit)}{note}")
            else:
                columns = [_median([s.phases.get("update") for s in ok]),
                           _median([s.phases.get("install") for s in ok]),
                           _median([s.cpu for s in ok]), _median([s.server_cpu for s in ok])]
                lines.append(f"  {impl:24s} {_fmt(total)} {' '.join(_fmt(c) for c in columns)}{note}")
        for against in ("fuse-overlayfs+bwrap", "kernel+bwrap"):
            rs = ratios(samples, workload, reps, against)
            if rs:
                lines.append(f"  unionfs / {against:24s} median {statistics.median(rs):.2f}x "
                             f"(per repetition {', '.join(f'{r:.2f}' for r in rs)})")
        lines.append("")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--launch-runs", type=int, default=10, help="launches per implementation and repetition")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="launch,apt")
    ap.add_argument("--impls", default=",".join(IMPLS), help=",".join(IMPLS))
    ap.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    args = ap.parse_args(argv)
    workloads = [w for w in args.only.split(",") if w]
    impls = [i for i in args.impls.split(",") if i]
    unknown = [w for w in workloads if w not in WORKLOADS] + [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("run_workloads: run as root (it mounts overlayfs and starts containers)", file=sys.stderr)
        return 2
    info = machine()
    rootfs = debian_rootfs()
    cleanup_stale()
    skipped: dict[str, str] = {}
    podman_flags: list[str] = []
    for tool, impl in (("bwrap", "kernel+bwrap"), ("fuse-overlayfs", "fuse-overlayfs+bwrap")):
        if impl in impls and shutil.which(tool) is None:
            skipped[impl] = f"{tool} not installed"
    if "podman" in impls:
        podman_flags, reason = podman_ulimits(rootfs)
        if reason:
            skipped["podman"] = reason
    info["podman_flags"] = podman_flags
    running = [i for i in impls if i not in skipped]
    print(f"run_workloads: {info['date_utc']}, {info['nproc']} x {info['cpu']}, kernel {info['kernel']}, "
          f"load {info['load_start'][0]:.2f}, root {rootfs}; podman {podman_flags or skipped.get('podman')}",  # type: ignore[index]
          flush=True)
    samples: list[Sample] = []
    groups = {impl: CpuGroup(f"unionfs-runperf-{impl.replace('+', '-')}") for impl in running}
    try:
        if "launch" in workloads:
            for impl in running:  # warm the page cache and the bytecode cache
                for _ in range(2):
                    run_once(impl, "launch", -1, rootfs, podman_flags, groups[impl])
        for rep in range(args.reps):
            order = running[rep % len(running):] + running[:rep % len(running)]
            for workload in workloads:
                for impl in order:
                    runs = args.launch_runs if workload == "launch" else 1
                    for _ in range(runs):
                        s = run_once(impl, workload, rep, rootfs, podman_flags, groups[impl])
                        samples.append(s)
                    last = samples[-1]
                    value = rep_value(samples, workload, impl, rep)
                    shown = _fmt(value * 1000 if value and workload == "launch" else value, width=1)
                    unit = "ms" if workload == "launch" else "s"
                    print(f"  rep {rep + 1} {workload:6s} {impl:22s} {shown} {unit}"
                          f"{' ' + str(last.phases) if last.phases else ''}"
                          f"{' error: ' + last.error if last.error else ''}", flush=True)
    finally:
        cleanup_stale()
        for group in groups.values():
            group.remove()
    info["load_end"] = os.getloadavg()
    text = report(samples, impls, workloads, args.reps, skipped)
    header = (f"{info['date_utc']}, commit {info['commit']}, {info['nproc']} x {info['cpu']}, "
              f"kernel {info['kernel']}, load average at start {info['load_start'][0]:.2f} "  # type: ignore[index]
              f"(end {info['load_end'][0]:.2f})")  # type: ignore[index]
    print("\n" + header + "\n\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"run-workloads-{stamp}.txt").write_text(header + "\n\n" + text + "\n")
    (args.out / f"run-workloads-{stamp}.json").write_text(json.dumps(
        {"machine": info, "reps": args.reps, "launch_runs": args.launch_runs, "skipped": skipped,
         "samples": [asdict(s) for s in samples]}, indent=1) + "\n")
    print(f"wrote {args.out}/run-workloads-{stamp}.{{txt,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
