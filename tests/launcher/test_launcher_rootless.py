"""``unionfs run`` as an unprivileged user made for the test: a user namespace with the union inside."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from launcher_util import (
    Image,
    UnprivUser,
    descendants_of,
    dev_fuse_mode,
    end_with_sigterm,
    mounts_mentioning,
    once_ready,
    run_launcher,
    start_launcher,
    unprivileged_user,
    wait_for_comm,
    wait_gone,
    world_readable_tempdir,
)

from launcher import namespaces

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="making the test user needs root (CI runs as root)"),
    pytest.mark.usefixtures("need_fuse"),
]


@pytest.fixture(scope="module")
def user() -> Iterator[UnprivUser]:
    with unprivileged_user() as u, dev_fuse_mode(0o666):
        yield u


@pytest.fixture(scope="module")
def image(user: UnprivUser) -> Iterator[Image]:
    """The image layers belong to the user, as images a rootless user unpacked do."""
    with world_readable_tempdir("unionfs-run-image-") as base:
        img = Image(base)
        for layer in (img.l1, img.l2):
            for dirpath, dirnames, filenames in os.walk(layer):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.lchown(name, user.uid, user.gid)
        img.snapshot = img.take_snapshot()
        yield img
        assert img.take_snapshot() == img.snapshot, "an image layer changed"


@pytest.fixture
def upper(user: UnprivUser) -> Iterator[Path]:
    with world_readable_tempdir("unionfs-run-upper-") as base:
        os.chown(base, user.uid, user.gid)
        up = base / "upper"
        up.mkdir()
        os.chown(up, user.uid, user.gid)
        before = mounts_mentioning(str(base), ".unionfs-run-")
        yield up
        assert mounts_mentioning(str(base), ".unionfs-run-") == before, "a mount was left behind"


def test_rootless_container_basics(image: Image, upper: Path, user: UnprivUser) -> None:
    script = (
        'echo "pid=$$"; id -u; hostname; cat /etc/hostname; test -e /work; echo "work=$?"; '
        "for p in /proc/[0-9]*; do cat $p/comm; done | sort -u | tr '\\n' ' '; echo"
    )
    r = run_launcher(image.branches(upper), ["/bin/sh", "-c", script], ["--hostname", "rl"], user=user)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:5] == ["pid=1", "0", "rl", "rl", "work=1"]
    assert set(lines[5].split()) <= {"sh", "cat", "sort", "tr"}


def test_rootless_writes_land_in_upper_owned_by_the_user(image: Image, upper: Path, user: UnprivUser) -> None:
    r = run_launcher(
        image.branches(upper),
        ["/bin/sh", "-c", "echo new > /newfile && echo changed > /etc/motd && rm /app/greeting && echo ok"],
        user=user,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
    assert (upper / "newfile").read_text() == "new\n"
    assert (upper / "newfile").stat().st_uid == user.uid
    assert (upper / "etc" / "motd").read_text() == "changed\n"
    assert not (upper / "etc" / "hostname").exists()
    r = run_launcher(image.branches(upper), ["/bin/sh", "-c", "test -e /app/greeting; echo $?"], user=user)
    assert r.stdout == "1\n"
    assert (image.l2 / "app" / "greeting").exists()


def test_rootless_exit_status_and_signals(image: Image, upper: Path, user: UnprivUser) -> None:
    r = run_launcher(image.branches(upper), ["/bin/sh", "-c", "exit 5"], user=user)
    assert r.returncode == 5, r.stderr
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; exec sleep 30"],
                          ["--stop-timeout", "0"], user=user)
    with once_ready(proc):
        wait_for_comm(proc.pid, "sleep")
        end_with_sigterm(proc, 128 + signal.SIGKILL)


def test_rootless_sigkill_of_the_launcher_leaves_nothing(image: Image, upper: Path, user: UnprivUser) -> None:
    proc = start_launcher(image.branches(upper), ["/bin/sh", "-c", "echo ready; sleep 30"], user=user)
    with once_ready(proc):
        started = descendants_of(proc.pid)
        assert started
        proc.kill()
        proc.wait(timeout=10)
        assert wait_gone(started) == [], "a process outlived the launcher"


def test_rootless_tmp_upper_and_no_network(image: Image, upper: Path, user: UnprivUser) -> None:
    script = "echo x > /f && cat /f && tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
    r = run_launcher(f"{image.l2}:{image.l1}", ["/bin/sh", "-c", script], ["--tmp-upper", "--net", "none"],
                     user=user)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x\nlo\n"


def test_rootless_without_dev_fuse_says_how_to_fix(image: Image, upper: Path, user: UnprivUser) -> None:
    with dev_fuse_mode(0o600):
        r = run_launcher(image.branches(upper), ["/bin/true"], ["--backend", "fuse"], user=user)
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and "chmod 666 /dev/fuse" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("newuidmap") is None, reason="needs newuidmap (apt-get install uidmap)")
def test_rootless_maps_the_subuid_range_through_newuidmap(image: Image, upper: Path) -> None:
    with unprivileged_user(subids=True) as sub:
        ranges = [namespaces.subordinate_range(f, sub.uid) for f in ("/etc/subuid", "/etc/subgid")]
        if None in ranges:
            pytest.skip("useradd gave the test user no subordinate ids")
        os.chown(upper.parent, sub.uid, sub.gid)
        os.chown(upper, sub.uid, sub.gid)
        script = "cat /proc/self/uid_map; touch /f && chown 1000:1000 /f && echo ok"
        r = run_launcher(f"{upper}:{image.l1}", ["/bin/sh", "-c", script], user=sub)
        assert r.returncode == 0, r.stderr
        rows = [line.split() for line in r.stdout.splitlines()[:-1]]
        assert rows == [["0", str(sub.uid), "1"], ["1", str(ranges[0].start), str(ranges[0].length)]]
        assert (upper / "f").stat().st_uid == ranges[0].start + 999


def test_no_rootless_as_a_user_is_a_usage_error(image: Image, upper: Path, user: UnprivUser) -> None:
    r = run_launcher(image.branches(upper), ["/bin/true"], ["--no-rootless"], user=user)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs root" in r.stderr, r.stderr


def test_rootless_warns_about_an_unmapped_upper(image: Image, upper: Path, user: UnprivUser) -> None:
    """The kernel refuses writes into an inode whose owner it cannot map; say so, and how to fix it."""
    os.chown(upper, user.uid, 0)
    r = run_launcher(image.branches(upper), ["/bin/sh", "-c", "touch /k"], user=user)
    assert r.returncode == 1
    warning = [line for line in r.stderr.splitlines() if line.startswith("unionfs run: WARNING")]
    assert len(warning) == 1 and f"chown {user.uid}:{user.gid} {upper}" in warning[0], r.stderr
