"""``unionfs run --memory/--memory-swap/--pids-limit/--cpus``: a cgroup of the run's own, as docker run
and podman run make one, joined by the container's PID 1 before the command's first instruction and
removed when the run ends (or at the next start, after a SIGKILLed launcher)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from launcher_util import (
    build_busybox_layer,
    descendants_of,
    dev_fuse_mode,
    end_with_sigterm,
    once_ready,
    run_launcher,
    start_launcher,
    unprivileged_user,
    wait_for_comm,
    wait_gone,
    world_readable_tempdir,
)

from launcher import cgroups

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the launcher tests run as root (CI does)"),
    pytest.mark.usefixtures("need_fuse"),
]

FORKS_C = r"""
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {  /* fork children that wait, until fork fails or 60 are there; say how many */
    pid_t kids[60];
    int n = 0;
    while (n < 60) {
        pid_t pid = fork();
        if (pid < 0) break;
        if (pid == 0) { pause(); _exit(0); }
        kids[n++] = pid;
    }
    printf("forked %d\n", n);
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    return 0;
}
"""
ALLOC_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {  /* allocate and touch argv[1] MiB, one MiB at a time */
    int mib = atoi(argv[1]);
    for (int i = 0; i < mib; i++) {
        char *p = malloc(1 << 20);
        if (p == NULL) { printf("malloc failed after %d MiB\n", i); return 1; }
        memset(p, 1, 1 << 20);
    }
    printf("allocated %d MiB\n", mib);
    return 0;
}
"""


def _compile(source: str, dest: Path, workdir: Path) -> None:
    if shutil.which("cc") is None:
        pytest.fail("needs a C compiler (apt-get install gcc libc6-dev)")
    src = workdir / f"{dest.name}.c"
    src.write_text(source)
    subprocess.run(["cc", "-static", "-O2", "-o", str(dest), str(src)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    with world_readable_tempdir("unionfs-run-limits-") as base:
        img = base / "image"
        build_busybox_layer(img, base)
        (img / "usr" / "bin").mkdir(parents=True)
        _compile(FORKS_C, img / "usr" / "bin" / "forks", base)
        _compile(ALLOC_C, img / "usr" / "bin" / "alloc", base)
        yield img


def _run(image: Path, command: list[str], *options: str) -> subprocess.CompletedProcess[str]:
    return run_launcher(str(image), command, ("--tmp-upper", *options))


def _cgroup_dirs(proc_self_cgroup: str) -> dict[str, Path]:
    """Controller -> host directory of the run's cgroup, from the container's /proc/self/cgroup."""
    found = cgroups.hierarchies()
    paths: dict[str, Path] = {}
    for line in proc_self_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in cgroups.CONTROLLERS:
            h = found.get(c)
            if h is not None and (c in controllers.split(",") or (h.version == 2 and controllers == "")):
                assert "/unionfs/" in path, f"the container is not in a run cgroup: {line}"
                paths[c] = Path(h.mountpoint) / path.lstrip("/")
    assert set(paths) == set(cgroups.CONTROLLERS), proc_self_cgroup
    return paths


def test_pids_limit_stops_forks_past_the_limit(image: Path) -> None:
    unlimited = _run(image, ["forks"])
    assert (unlimited.returncode, unlimited.stdout) == (0, "forked 60\n"), unlimited.stderr
    limited = _run(image, ["forks"], "--pids-limit", "20")
    assert limited.returncode == 0, limited.stderr
    forked = int(limited.stdout.split()[1])
    assert 10 <= forked < 20, limited.stdout  # PID 1 itself is one of the 20


def test_memory_limit_oom_kills_a_large_allocation(image: Path) -> None:
    small = _run(image, ["alloc", "8"], "--memory", "32m")
    assert (small.returncode, small.stdout) == (0, "allocated 8 MiB\n"), small.stderr
    large = _run(image, ["alloc", "100"], "--memory", "32m")
    assert large.returncode == 128 + signal.SIGKILL, (large.stdout, large.stderr)
    assert "allocated" not in large.stdout
    unlimited = _run(image, ["alloc", "100"])
    assert (unlimited.returncode, unlimited.stdout) == (0, "allocated 100 MiB\n"), unlimited.stderr


def _start(image: Path, *options: str) -> subprocess.Popen[str]:
    """A container whose command sleeps, with *options*; it has printed "ready"."""
    return start_launcher(str(image), ["/bin/sh", "-c", "echo ready; sleep 60"], ("--tmp-upper", "--init", *options))


def _run_cgroups(proc: subprocess.Popen[str]) -> dict[str, Path]:
    """The run cgroups of the container's sleep, as the host sees them."""
    sleep = wait_for_comm(proc.pid, "sleep")
    return _cgroup_dirs(Path(f"/proc/{sleep}/cgroup").read_text())


def test_limits_are_written_and_the_cgroups_removed_after_the_run(image: Path) -> None:
    with once_ready(_start(image, "--memory", "48m", "--memory-swap", "64m", "--pids-limit", "30",
                           "--cpus", "0.5")) as proc:
        dirs = _run_cgroups(proc)
        mib = 1 << 20
        if (dirs["cpu"] / "cpu.max").exists():  # cgroup v2: one cgroup for all three
            assert (dirs["cpu"] / "cpu.max").read_text() == "50000 100000\n"
            assert (dirs["memory"] / "memory.max").read_text() == f"{48 * mib}\n"
            assert (dirs["memory"] / "memory.swap.max").read_text() == f"{16 * mib}\n"
        else:
            assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "50000\n"
            assert (dirs["cpu"] / "cpu.cfs_period_us").read_text() == "100000\n"
            assert (dirs["memory"] / "memory.limit_in_bytes").read_text() == f"{48 * mib}\n"
            memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
            assert not memsw.exists() or memsw.read_text() == f"{64 * mib}\n"
        assert (dirs["pids"] / "pids.max").read_text() == "30\n"
        end_with_sigterm(proc)
    for c, path in dirs.items():
        assert not path.exists(), f"the {c} cgroup {path} is left after the run"
        assert not path.parent.exists(), f"the empty {path.parent} is left after the run"


def test_cgroups_of_a_sigkilled_launcher_are_removed_at_the_next_start(image: Path) -> None:
    with once_ready(_start(image, "--pids-limit", "30", "--memory", "64m", "--cpus", "1")) as proc:
        dirs = _run_cgroups(proc)
        pids = descendants_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone(pids) == []
    assert all(path.is_dir() for path in dirs.values())  # nothing left to remove them: the launcher died
    after = _run(image, ["true"])
    assert after.returncode == 0, after.stderr
    for c, path in dirs.items():
        assert not path.exists(), f"the {c} cgroup {path} of the killed launcher is still there"


def test_limits_without_root_or_delegation_are_refused_in_one_line(image: Path) -> None:
    with unprivileged_user() as user, dev_fuse_mode(0o666), world_readable_tempdir("unionfs-run-lim-") as base:
        upper = base / "upper"
        upper.mkdir()
        os.chown(upper, user.uid, user.gid)
        r = run_launcher(f"{upper}:{image}", ["true"], ("--pids-limit", "20"), user=user)
        if any(h.version == 2 and os.access(h.own, os.W_OK) for h in cgroups.hierarchies().values()):
            pytest.skip("the host delegates a cgroup v2 subtree")  # not so on a v1 host, nor under root's
        assert r.returncode == 125, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert "--pids-limit: resource limits need root or a delegated cgroup v2 subtree" in r.stderr


@pytest.mark.parametrize(("options", "message"), [
    (("--memory", "lots"), "'lots' is not a size"),
    (("--memory", "1m"), "the minimum is 6m"),
    (("--memory-swap", "64m"), "--memory-swap needs --memory"),
    (("--memory", "64m", "--memory-swap", "32m"), "is less than --memory"),
    (("--cpus", "0"), "--cpus 0.0: the range is 0.01 to"),
    (("--cpus", "half"), "'half' is not a valid float"),
    (("--pids-limit", "x"), "'x' is not a valid integer"),
])
def test_bad_limits_are_usage_errors(image: Path, options: tuple[str, ...], message: str) -> None:
    r = _run(image, ["true"], *options)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert r.stderr.count("Error:") == 1


HYBRID_CGROUP = """9:name=systemd:/
8:pids:/
4:memory:/process_api/91c3
2:cpuacct:/
1:cpu:/
0::/
"""
HYBRID_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_CGROUP = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/term.scope\n"
V2_MOUNTINFO = "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
COMOUNTED_CGROUP = "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n3:pids:/docker/abc\n0::/\n"
COMOUNTED_MOUNTINFO = """\
40 30 0:40 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct
41 30 0:41 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory
42 30 0:42 /elsewhere /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids
"""


def test_hierarchies_of_a_hybrid_host_are_the_v1_ones_under_our_own_cgroup() -> None:
    found = cgroups.place(cgroups.parse_own(HYBRID_CGROUP), cgroups.parse_mounts(HYBRID_MOUNTINFO), ["hugetlb"])
    assert found == {
        "memory": cgroups.Hierarchy(1, "/sys/fs/cgroup/memory", "/sys/fs/cgroup/memory/process_api/91c3"),
        "pids": cgroups.Hierarchy(1, "/sys/fs/cgroup/pids", "/sys/fs/cgroup/pids"),
        "cpu": cgroups.Hierarchy(1, "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu"),
    }


def test_hierarchies_of_a_v2_host_are_one_unified_cgroup() -> None:
    v2 = cgroups.Hierarchy(2, "/sys/fs/cgroup", "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/"
                                                "app.slice/term.scope")
    found = cgroups.place(cgroups.parse_own(V2_CGROUP), cgroups.parse_mounts(V2_MOUNTINFO),
                          ["cpuset", "cpu", "io", "memory", "pids"])
    assert found == {"memory": v2, "pids": v2, "cpu": v2}
    assert cgroups.place(cgroups.parse_own(V2_CGROUP), cgroups.parse_mounts(V2_MOUNTINFO), ["memory"]) == {
        "memory": v2}


def test_hierarchies_mounted_from_a_subtree_map_our_path_below_their_root() -> None:
    found = cgroups.place(cgroups.parse_own(COMOUNTED_CGROUP), cgroups.parse_mounts(COMOUNTED_MOUNTINFO), [])
    assert found == {
        "cpu": cgroups.Hierarchy(1, "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
        "memory": cgroups.Hierarchy(1, "/sys/fs/cgroup/memory", "/sys/fs/cgroup/memory"),
        "pids": cgroups.Hierarchy(1, "/sys/fs/cgroup/pids", "/sys/fs/cgroup/pids"),
    }


def test_a_v2_run_goes_under_the_highest_cgroup_we_may_write(tmp_path: Path) -> None:
    """As systemd delegates user@UID.service: its cgroup.procs is the user's, those above are not."""
    own = tmp_path / "user.slice" / "user@1000.service" / "app.slice" / "term.scope"
    own.mkdir(parents=True)
    for d in (own, own.parent, own.parent.parent):
        (d / "cgroup.procs").write_text("")
    h = cgroups.Hierarchy(2, str(tmp_path), str(own))
    assert cgroups._delegated_base(h) == str(own.parent.parent)
    (tmp_path / "cgroup.procs").write_text("")
    assert cgroups._delegated_base(h) == str(tmp_path)  # root: the top
    assert cgroups._delegated_base(cgroups.Hierarchy(2, str(tmp_path), str(tmp_path / "nowhere"))) == str(tmp_path)


@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc (apt-get install runc)")
def test_limits_reach_an_oci_runtime(image: Path) -> None:
    """With --runtime runc the limits travel in config.json: the runtime's cgroup enforces them."""
    limited = _run(image, ["forks"], "--runtime", "runc", "--pids-limit", "20")
    assert limited.returncode == 0, limited.stderr
    forked = int(limited.stdout.split()[1])
    assert 10 <= forked < 20, limited.stdout
    small = _run(image, ["alloc", "8"], "--runtime", "runc", "--memory", "32m")
    assert (small.returncode, small.stdout) == (0, "allocated 8 MiB\n"), small.stderr
    large = _run(image, ["alloc", "100"], "--runtime", "runc", "--memory", "32m")
    assert large.returncode == 128 + signal.SIGKILL, (large.stdout, large.stderr)

