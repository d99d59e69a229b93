"""What a process inside ``unionfs run`` may do, as under ``docker run`` / ``podman run``: setuid
programs elevate (the union is mounted without nosuid, as podman mounts a container's root), and
``unionfs mount -o suid|nosuid|dev|nodev|exec|noexec`` is honoured as kernel overlayfs honours it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import util
from launcher_util import (
    UnprivUser,
    build_busybox_layer,
    dev_fuse_mode,
    run_launcher,
    unprivileged_user,
    world_readable_tempdir,
)

from launcher import namespaces

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the launcher tests run as root (CI does)"),
    pytest.mark.usefixtures("need_fuse"),
]

EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid()); return 0; }
"""
NOBODY = 65534


def _compile_euid(dest: Path, workdir: Path) -> None:
    """A static program that prints its real and effective uid (busybox drops a setuid bit itself)."""
    if shutil.which("cc") is None:
        pytest.fail("needs a C compiler (apt-get install gcc libc6-dev)")
    src = workdir / "euid.c"
    src.write_text(EUID_C)
    subprocess.run(["cc", "-static", "-O2", "-o", str(dest), str(src)], check=True, capture_output=True)


@dataclass
class Setup:
    """One way of launching: as root, or rootless with the image owned by the user (its uid 0)."""

    user: UnprivUser | None
    image: Path
    base: Path

    def upper(self) -> Path:
        up = Path(self.base / f"upper{len(list(self.base.iterdir()))}")
        up.mkdir()
        if self.user:
            os.chown(up, self.user.uid, self.user.gid)
        return up

    def run(self, script: str, *options: str) -> subprocess.CompletedProcess[str]:
        return run_launcher(f"{self.upper()}:{self.image}", ["/bin/sh", "-c", script], options, user=self.user)


def _build_image(base: Path, owner: tuple[int, int] | None) -> Path:
    image = base / "image"
    build_busybox_layer(image, base)
    (image / "usr" / "bin").mkdir(parents=True)
    _compile_euid(image / "usr" / "bin" / "euid", base)
    os.chmod(image / "usr" / "bin" / "euid", 0o4755)
    if owner:
        for dirpath, dirnames, filenames in os.walk(image):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, *owner)
        os.chmod(image / "usr" / "bin" / "euid", 0o4755)  # chown clears the setuid bit
    return image


@pytest.fixture(scope="module", params=["root", "rootless"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    if request.param == "root":
        with world_readable_tempdir("unionfs-run-iso-") as base:
            yield Setup(None, _build_image(base, None), base)
        return
    if shutil.which("newuidmap") is None:
        pytest.fail("needs newuidmap (apt-get install uidmap)")
    with unprivileged_user(subids=True) as user, dev_fuse_mode(0o666), \
            world_readable_tempdir("unionfs-run-iso-") as base:
        sub = namespaces.subordinate_range("/etc/subuid", user.uid)
        if sub is None or sub.length < 65536:
            pytest.skip("useradd gave the test user no 65536 subordinate ids")
        yield Setup(user, _build_image(base, (user.uid, user.gid)), base)


# -- setuid -------------------------------------------------------------------------------------------

def test_a_setuid_root_program_elevates_a_non_root_user(setup: Setup) -> None:
    """nobody runs a setuid-root program in the container: its effective uid is 0, as under podman."""
    r = setup.run("stat -c '%a %u' /usr/bin/euid; su -s /bin/sh nobody -c /usr/bin/euid")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"4755 0\nuid={NOBODY} euid=0\n"


# -- unionfs mount -o suid|nosuid|exec|noexec, against kernel overlayfs -------------------------------

@pytest.fixture(scope="module")
def suid_lower() -> Iterator[Path]:
    with world_readable_tempdir("unionfs-mount-flags-") as base:
        lower = base / "lower"
        lower.mkdir()
        _compile_euid(lower / "euid", base)
        os.chmod(lower / "euid", 0o4755)
        yield lower


def _flags_at(mnt: Path) -> set[str]:
    """The per-mount options of *mnt* in /proc/self/mountinfo (rw, nosuid, nodev, noexec, ...)."""
    want = os.fsencode(str(mnt))
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if util._unescape_mountinfo(fields[4]) == want:
                return set(fields[5].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def _run_as_nobody(program: Path) -> str:
    try:
        r = subprocess.run([str(program)], user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                           text=True, timeout=30)
    except PermissionError as exc:
        return f"exec refused: {exc.strerror}"
    return r.stdout.strip()


@pytest.mark.usefixtures("need_overlay")
@pytest.mark.parametrize("options", ["suid", "nosuid", "suid,noexec", "suid,dev", "suid,nodev", "suid,exec"])
def test_mount_flags_are_honoured_as_by_kernel_overlayfs(options: str, suid_lower: Path) -> None:
    """``unionfs mount -o OPTIONS`` puts each on the mount (mountinfo), and a setuid-root program run by
    nobody elevates, does not, or is refused exec, as on kernel overlayfs mounted with OPTIONS.
    (Without ``suid``, unionfs mounts nosuid,nodev, as libfuse does for every FUSE filesystem.)"""
    seen = {}
    for side in ("unionfs", "kernel"):
        up, work, mnt = (suid_lower.parent / f"{options.replace(',', '-')}-{side}-{n}" for n in ("upper", "work", "mnt"))
        for d in (up, work, mnt):
            d.mkdir()
        if side == "kernel":
            m = util.mount_kernel([suid_lower], up, work, mnt, [options])
        else:
            m = util.mount_impl("aufs", [suid_lower], up, None, mnt, [options])
        try:
            flags = _flags_at(mnt)
            seen[side] = _run_as_nobody(mnt / "euid")
            for flag in options.split(","):
                if flag.startswith("no"):
                    assert flag in flags, f"{side}: {sorted(flags)}"
                else:
                    assert "no" + flag not in flags, f"{side}: {sorted(flags)}"
        finally:
            if side == "kernel":
                util.umount(mnt)
            else:
                util.unmount(m)
    assert seen["unionfs"] == seen["kernel"]
    if "noexec" in options:
        assert seen["unionfs"] == "exec refused: Permission denied"
    else:
        assert seen["unionfs"] == f"uid={NOBODY} euid={0 if 'suid' in options.split(',') else NOBODY}"


def test_suid_or_dev_without_root_is_refused_in_one_line(suid_lower: Path) -> None:
    """As a user, fusermount3 forces nosuid,nodev: ``unionfs mount -o suid`` says so in one line."""
    with unprivileged_user() as user, dev_fuse_mode(0o666), world_readable_tempdir("unionfs-mount-user-") as base:
        mnt, up = base / "mnt", base / "up"
        for d in (mnt, up):
            d.mkdir()
            os.chown(d, user.uid, user.gid)
        from launcher_util import _env, python_for

        cmd = [python_for(user)[0], "-m", "unionfs", "mount", "-f", "-o", "suid", f"{up}:{suid_lower}", str(mnt)]
        proc = subprocess.Popen(cmd, user=user.uid, group=user.gid, extra_groups=[], env=_env(user, None),
                                cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            util.wait_for_mount(mnt, proc)  # type: ignore[arg-type]
            assert "nosuid" in _flags_at(mnt)
        finally:
            util.umount(mnt)
            _out, err = proc.communicate(timeout=30)
        warnings = [line for line in err.splitlines() if "suid" in line]
        assert len(warnings) == 1 and "fusermount3 mounts nosuid,nodev" in warnings[0], err
