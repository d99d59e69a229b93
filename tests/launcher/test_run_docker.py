"""``unionfs run`` as a docker/podman user expects it: the init layer, one launch per container layer,
no leftovers, and the flags spelled as docker run spells them.  Each test runs as root and rootless
(a user with subordinate ids, as a rootless podman user has)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from launcher_util import (
    UnprivUser,
    build_busybox_layer,
    dev_fuse_mode,
    end_with_sigterm,
    kill_tree,
    mounts_mentioning,
    once_ready,
    run_launcher,
    start_launcher,
    unprivileged_user,
    wait_for_comm,
    world_readable_tempdir,
)

from launcher import namespaces

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the launcher tests run as root (CI does)"),
    pytest.mark.usefixtures("need_fuse"),
]

ETC_MTIME = 1_000_000_000
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\ntty:x:5:\nstaff:x:50:nobody\nnogroup:x:65534:\n"


@dataclass
class Setup:
    """One way of launching: as root, or as a rootless user whose ids map through newuidmap."""

    user: UnprivUser | None
    image: Path
    base: Path
    tmp_owner: tuple[int, int]  # the host's owner of the image's /tmp: uid 1 inside the container

    def upper(self, name: str = "upper") -> Path:
        up = self.base / name
        up.mkdir()
        if self.user:
            os.chown(up, self.user.uid, self.user.gid)
        return up

    def branches(self, upper: Path) -> str:
        return f"{upper}:{self.image}"

    def run(self, upper: Path, script: str, *options: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_launcher(self.branches(upper), ["/bin/sh", "-c", script], options, user=self.user, env=env)

    def start(self, upper: Path, script: str, *options: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return start_launcher(self.branches(upper), ["/bin/sh", "-c", script], options, user=self.user, env=env)

    def own(self, path: Path) -> None:
        if self.user:
            os.chown(path, self.user.uid, self.user.gid)


def _build_image(base: Path, owner: tuple[int, int] | None, tmp_owner: tuple[int, int]) -> Path:
    """busybox with /tmp 1777 owned by uid 1 of the container, /etc 0751 with an old mtime, /var/run a
    symlink; with *owner*, everything else belongs to it (a rootless user's unpacked image)."""
    image = base / "image"
    build_busybox_layer(image, base)
    (image / "etc" / "passwd").write_text(PASSWD)
    (image / "etc" / "group").write_text(GROUP)
    (image / "etc" / "motd").write_text("image motd\n")
    (image / "var").mkdir()
    (image / "run").mkdir()
    (image / "var" / "run").symlink_to("../run")
    (image / "tmp").mkdir()
    if owner:
        for dirpath, dirnames, filenames in os.walk(image):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, *owner)
    os.chown(image / "tmp", *tmp_owner)
    os.chmod(image / "tmp", 0o1777)
    os.chmod(image / "etc", 0o751)
    os.utime(image / "etc", (ETC_MTIME, ETC_MTIME))
    return image


def _subordinate(user: UnprivUser) -> tuple[int, int]:
    ranges = [namespaces.subordinate_range(f, user.uid) for f in ("/etc/subuid", "/etc/subgid")]
    if ranges[0] is None or ranges[1] is None or min(ranges[0].length, ranges[1].length) < 65536:
        pytest.skip("useradd gave the test user no 65536 subordinate ids")
    return ranges[0].start, ranges[1].start


@pytest.fixture(scope="module", params=["root", "rootless"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    if request.param == "root":
        with world_readable_tempdir("unionfs-run-docker-") as base:
            yield Setup(None, _build_image(base, None, (1, 1)), base, (1, 1))
        return
    if shutil.which("newuidmap") is None:
        pytest.skip("needs newuidmap (apt-get install uidmap)")
    with unprivileged_user(subids=True) as user, dev_fuse_mode(0o666), \
            world_readable_tempdir("unionfs-run-docker-") as base:
        tmp_owner = _subordinate(user)  # uid and gid 1 inside
        yield Setup(user, _build_image(base, (user.uid, user.gid), tmp_owner), base, tmp_owner)


@pytest.fixture
def upper(setup: Setup) -> Iterator[Path]:
    up = setup.upper()
    before = mounts_mentioning(str(setup.base), ".unionfs-run-")
    yield up
    assert mounts_mentioning(str(setup.base), ".unionfs-run-") == before, "a mount was left behind"
    shutil.rmtree(up)


def _stat(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, int(st.st_mtime)


# -- the init layer ---------------------------------------------------------------------------------

def test_tmp_keeps_the_images_mode_and_owner(setup: Setup, upper: Path) -> None:
    """A non-root user creates a file in /tmp (apt's sandbox user does); the copy-up of /tmp into the
    container layer keeps 1777 and the image's owner; /etc shows the image's mode and mtime."""
    script = ('stat -c "%a %u %g %Y" /tmp /etc; su -s /bin/sh nobody -c "echo hi > /tmp/f" && echo created; '
              "echo x > /etc/motd")
    r = setup.run(upper, script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1777 1 1 " + str(int((setup.image / "tmp").stat().st_mtime)),
                                     f"751 0 0 {ETC_MTIME}", "created"]
    assert _stat(upper / "tmp")[:3] == ("0o1777", *setup.tmp_owner)
    assert (upper / "tmp" / "f").read_text() == "hi\n"
    assert _stat(upper / "etc")[:3] == _stat(setup.image / "etc")[:3]  # /etc copied up with the image's mode


def test_nothing_of_the_init_layer_lands_in_the_container_layer(setup: Setup, upper: Path) -> None:
    script = ("cat /etc/hostname; echo '1.2.3.4 extra' >> /etc/hosts; echo changed > /etc/motd; "
              "test -d /proc/self && test -d /sys && echo ok")
    r = setup.run(upper, script, "--hostname", "docker1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "docker1\nok\n"
    assert sorted(p.name for p in upper.iterdir()) == ["etc"]
    assert sorted(p.name for p in (upper / "etc").iterdir()) == ["motd"]
    assert _stat(upper / "etc")[0] == "0o751"  # the copy-up of /etc took the image's metadata


def test_the_images_symlinks_stay_symlinks(setup: Setup, upper: Path) -> None:
    """/var/run -> ../run in the image: no directory of the launcher's shadows it (nor /tmp's)."""
    link_tmp = setup.upper("linkimage")
    (link_tmp / "tmp").symlink_to("var/tmp")
    (link_tmp / "var").mkdir()
    (link_tmp / "var" / "tmp").mkdir(mode=0o1777)
    os.chmod(link_tmp / "var" / "tmp", 0o1777)
    for p in (link_tmp / "tmp", link_tmp / "var", link_tmp / "var" / "tmp"):
        if setup.user:
            os.lchown(p, setup.user.uid, setup.user.gid)
    try:
        script = "readlink /var/run; readlink /tmp; echo x > /tmp/f; cat /var/tmp/f"
        r = run_launcher(f"{upper}:{link_tmp}:{setup.image}", ["/bin/sh", "-c", script], user=setup.user)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "../run\nvar/tmp\nx\n"
        assert (upper / "var" / "tmp" / "f").read_text() == "x\n"
        assert not (upper / "tmp").exists()
    finally:
        shutil.rmtree(link_tmp)


# -- one launch per container layer, nothing left behind ----------------------------------------------

def test_a_second_launch_on_the_same_container_layer_is_refused(setup: Setup, upper: Path) -> None:
    proc = setup.start(upper, "echo ready; sleep 30", "--stop-timeout", "0")
    with once_ready(proc):
        before = sorted(upper.iterdir())  # the running union's work directory
        r = setup.run(upper, "echo second > /second")
        assert r.returncode == 125
        assert r.stderr.count("\n") == 1 and "in use by another unionfs run" in r.stderr, r.stderr
        assert sorted(upper.iterdir()) == before
        other = setup.upper("other")
        assert setup.run(other, "true").returncode == 0  # another container layer is free
        end_with_sigterm(proc, 128 + signal.SIGKILL)
    assert setup.run(upper, "true").returncode == 0  # free again once the first has ended


def test_no_run_directory_outlives_a_killed_launcher(setup: Setup, upper: Path) -> None:
    """After SIGKILL the per-run directory stays (empty) on the host; the next launch removes it, and
    a launch that ends normally removes its own.  The container layer's lock goes with the launcher."""
    tmpdir = setup.base / "tmpdir"
    tmpdir.mkdir()
    setup.own(tmpdir)
    env = {"TMPDIR": str(tmpdir)}
    proc = setup.start(upper, "echo ready; sleep 30", env=env)
    with once_ready(proc):
        assert len(list(tmpdir.iterdir())) == 1
        kill_tree(proc)
    r = setup.run(upper, "echo after", env=env)
    assert r.returncode == 0 and r.stdout == "after\n", r.stderr
    assert list(tmpdir.iterdir()) == []
    shutil.rmtree(tmpdir)


# -- flags as docker run spells them -------------------------------------------------------------------

def test_volumes_files_and_directories_read_only_or_not(setup: Setup, upper: Path) -> None:
    host_dir = setup.base / "vol"
    host_dir.mkdir()
    host_file = setup.base / "cfg"
    host_file.write_text("config\n")
    for p in (host_dir, host_file):
        setup.own(p)
    try:
        script = ("echo into > /data/new; cat /etc/app/cfg; echo x > /etc/app/cfg 2>/dev/null || echo ro; "
                  "ls -d /etc/app")
        r = setup.run(upper, script, "-v", f"{host_dir}:/data", "--volume", f"{host_file}:/etc/app/cfg:ro")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "config\nro\n/etc/app\n"
        assert (host_dir / "new").read_text() == "into\n"
        assert list(upper.iterdir()) == []  # the mount points were made in the init layer
    finally:
        shutil.rmtree(host_dir)
        host_file.unlink()


def test_tmpfs_and_read_only(setup: Setup, upper: Path) -> None:
    script = ("stat -f -c %T /scratch; echo s > /scratch/s; touch /x 2>/dev/null || echo root-ro; "
              "for d in /tmp /var/tmp /run; do echo t > $d/t && stat -f -c %T $d; done; stat -c %a /tmp")
    r = setup.run(upper, script, "--tmpfs", "/scratch", "--read-only")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["tmpfs", "root-ro", "tmpfs", "tmpfs", "tmpfs", "1777"]
    assert list(upper.iterdir()) == []


def test_user_by_name_and_number(setup: Setup, upper: Path) -> None:
    r = setup.run(upper, 'id -u; id -g; id -G; echo "$HOME"; touch /tmp/mine; stat -c %u /tmp/mine',
                  "-u", "nobody")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["65534", "65534", "65534", "50", "/nonexistent", "65534"]
    r = setup.run(upper, "id -u; id -g; echo $HOME", "--user", "1234")  # not in /etc/passwd: gid 0, HOME /
    assert r.stdout.split() == ["1234", "0", "/"], r.stderr
    r = setup.run(upper, "id -u; id -g", "--user", "daemon:staff")
    assert r.stdout.split() == ["1", "50"], r.stderr
    r = setup.run(upper, "true", "-u", "nosuchuser")
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "nosuchuser" in r.stderr, r.stderr


def test_user_names_are_read_without_following_symlinks_out_of_the_image(setup: Setup, upper: Path) -> None:
    """An image whose /etc/passwd is a symlink to the host's: the host's users are not looked up."""
    layer = setup.upper("passwdlink")
    (layer / "etc").mkdir()
    (layer / "etc" / "passwd").symlink_to("/etc/passwd")
    for p in (layer / "etc", layer / "etc" / "passwd"):
        if setup.user:
            os.lchown(p, setup.user.uid, setup.user.gid)
    try:
        r = run_launcher(f"{upper}:{layer}:{setup.image}", ["/bin/true"], ["-u", "daemon"], user=setup.user)
        assert r.returncode == 125 and "daemon" in r.stderr, r.stderr
    finally:
        shutil.rmtree(layer)


def test_workdir_is_made_when_missing(setup: Setup, upper: Path) -> None:
    r = setup.run(upper, "pwd; stat -c %a .", "-w", "/srv/app")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "/srv/app\n755\n"
    assert list(upper.iterdir()) == []


def test_docker_habits_are_accepted(setup: Setup, upper: Path) -> None:
    r = setup.run(upper, "echo fine", "-it", "--rm", "--name", "web")
    assert r.returncode == 0 and r.stdout == "fine\n", r.stderr


def test_verbose_is_long_only(setup: Setup, upper: Path) -> None:
    r = setup.run(upper, "true", "--verbose")
    assert r.returncode == 0 and "setup" in r.stderr, r.stderr
    r = setup.run(upper, "true", "-v")  # -v is --volume now: BRANCHES would be its value
    assert r.returncode == 2


def test_stop_timeout_sigterm_first_then_sigkill(setup: Setup, upper: Path) -> None:
    """A PID 1 that handles SIGTERM but does not exit gets SIGTERM at once and SIGKILL after the timeout."""
    script = 'trap "echo term" TERM; echo ready; while :; do sleep 0.05; done'
    proc = setup.start(upper, script, "--stop-timeout", "1")
    with once_ready(proc):
        wait_for_comm(proc.pid, "sleep")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None and proc.stdout.readline() == "term\n"
        assert proc.wait(timeout=10) == 128 + signal.SIGKILL
        assert time.monotonic() - start >= 1.0


def test_a_handled_sigterm_ends_the_container_before_the_timeout(setup: Setup, upper: Path) -> None:
    proc = setup.start(upper, 'trap "exit 7" TERM; echo ready; while :; do sleep 0.05; done')
    with once_ready(proc):
        wait_for_comm(proc.pid, "sleep")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 7
        assert time.monotonic() - start < 5


# -- rootless: the unmapped-owner warning only when creating really fails ------------------------------

def test_no_false_warning_when_the_upper_group_is_unmapped_but_creating_works(setup: Setup,
                                                                              upper: Path) -> None:
    if setup.user is None:
        pytest.skip("a rootless question")
    os.chown(upper, setup.user.uid, 0)  # gid 0 is outside the user's ids; the union shows 65534, mapped
    r = setup.run(upper, "touch /k && echo created")
    assert r.returncode == 0 and r.stdout == "created\n", r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    assert sorted(p.name for p in upper.iterdir()) == ["k"]
