"""A stock distribution image under ``unionfs run``: what apt and dpkg leave in the container layer is
what kernel overlayfs leaves for the same commands (run there with bwrap), as root and rootless.

The Debian tests fetch from Debian's mirror and run only with ``--network``::

    .venv/bin/pytest -q -p no:cacheprovider --network tests/launcher/test_run_debian.py

The busybox tests check the same rules offline: a non-root user writing /tmp, a sandbox user that a
root process drops to (as apt's ``_apt``), dpkg's way of replacing a file, a removal.

Rootless, the image is stored shifted into the user's subordinate ids, as rootless podman stores it:
the user unpacks it with ``unionfs unshare -- tar -x``, and removes the container layer with
``unionfs unshare rm -rf``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from launcher_util import (
    PYTHON,
    UnprivUser,
    _env,
    build_busybox_layer,
    dev_fuse_mode,
    python_for,
    run_launcher,
    unprivileged_user,
    world_readable_tempdir,
)

from launcher import namespaces

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the launcher tests run as root (CI does)"),
    pytest.mark.usefixtures("need_fuse", "need_overlay"),
]

CACHE = Path(os.environ.get("UNIONFS_TEST_CACHE", "/var/tmp/unionfs-test-cache"))
DEBIAN = CACHE / "bookworm-minbase"
APT_SCRIPT = ("apt-get update -q && apt-get install -q -y --no-install-recommends jq "
              "&& echo '{\"image\": \"bookworm\"}' | jq -r .image")

Entry = tuple[str, ...]


# -- helpers ------------------------------------------------------------------------------------------

def debian_rootfs() -> Path:
    """Debian bookworm, minbase variant, built once with mmdebstrap and kept in CACHE."""
    if DEBIAN.is_dir():
        return DEBIAN
    if shutil.which("mmdebstrap") is None:
        pytest.fail("needs mmdebstrap (apt-get install mmdebstrap; scripts/setup.sh installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"bookworm-minbase.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", "bookworm", str(tmp)], check=True,
                   timeout=900)
    tmp.rename(DEBIAN)
    return DEBIAN


def unionfs_argv(user: UnprivUser | None, *args: str) -> list[str]:
    return [python_for(user)[0] if user else PYTHON, "-m", "unionfs", *args]


def as_user(user: UnprivUser, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, user=user.uid, group=user.gid, extra_groups=[], env=_env(user, None),
                          cwd="/", capture_output=True, timeout=600, **kw)  # type: ignore[call-overload]


def unpack_shifted(src: Path, dest: Path, user: UnprivUser) -> None:
    """Copy the image *src* to *dest* as *user* stores it: ``unionfs unshare -- tar -x``, so that
    uid 0 becomes the user and uid N its N-th subordinate id (device nodes are left out)."""
    dest.mkdir()
    os.chown(dest, user.uid, user.gid)
    tar = subprocess.Popen(["tar", "-C", str(src), "--numeric-owner", "--xattrs", "-cf", "-", "."],
                           stdout=subprocess.PIPE)
    r = as_user(user, unionfs_argv(user, "unshare", "--", "tar", "-C", str(dest), "--numeric-owner",
                                   "--xattrs", "--exclude=./dev/*", "-xpf", "-"), stdin=tar.stdout)
    assert tar.stdout is not None
    tar.stdout.close()
    assert tar.wait() == 0
    assert r.returncode == 0, r.stderr.decode()


def remove_as(user: UnprivUser | None, path: Path) -> None:
    """Remove a tree the user's container wrote (its files belong to subordinate ids): ``unionfs
    unshare rm -rf``, which the user could not do without the mapping."""
    if user is None:
        shutil.rmtree(path)
        return
    r = as_user(user, unionfs_argv(user, "unshare", "rm", "-rf", str(path)))
    assert r.returncode == 0, r.stderr.decode()
    assert not path.exists()


def layer_snapshot(upper: Path, ids: dict[int, int] | None = None) -> dict[str, Entry]:
    """Path -> (type, mode, uid, gid) of what a container layer holds; whiteouts as ("whiteout",)
    whichever form they take (a 0/0 device or an AUFS ``.wh.`` file); opaque markers and times left
    out.  *ids* turns host ids into the container's (rootless); an id it lacks stays as it is."""
    ids = ids or {}
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, upper)
            st = os.lstat(path)
            if name.startswith(".wh..wh."):
                continue
            if name.startswith(".wh."):
                out[os.path.join(os.path.dirname(rel), name[4:])] = ("whiteout",)
            elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out[rel] = ("whiteout",)
            else:
                kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(
                    stat.S_IFMT(st.st_mode), oct(stat.S_IFMT(st.st_mode)))
                out[rel] = (kind, oct(stat.S_IMODE(st.st_mode)), str(ids.get(st.st_uid, st.st_uid)),
                            str(ids.get(st.st_gid, st.st_gid)))
    return out


def container_ids(user: UnprivUser) -> dict[int, int]:
    """Host id -> container id for a rootless user: its own id is 0, its N-th subordinate id is N."""
    sub = [namespaces.subordinate_range(f, user.uid) for f in ("/etc/subuid", "/etc/subgid")]
    assert sub[0] is not None and sub[1] is not None
    ids = {user.uid: 0, user.gid: 0}
    for rng in sub:
        ids.update({rng.start + i: i + 1 for i in range(min(rng.length, 65535))})
    return ids


def kernel_run(image: Path, upper: Path, work: Path, script: str) -> subprocess.CompletedProcess[str]:
    """*script* as root with kernel overlayfs (upper over *image*) as its root, through bwrap."""
    merged = work.parent / (work.name + "-merged")
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={image},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        return subprocess.run(
            ["bwrap", "--bind", str(merged), "/", "--proc", "/proc", "--dev", "/dev", "--unshare-pid",
             "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--clearenv",
             "--setenv", "PATH", "/usr/sbin:/usr/bin:/sbin:/bin", "--setenv", "HOME", "/root",
             "/bin/sh", "-c", script],
            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["umount", str(merged)], check=True)
        merged.rmdir()


@dataclass
class Side:
    """One way of launching: as root, or rootless with the image shifted into the user's ids."""

    user: UnprivUser | None
    base: Path

    def image(self, original: Path, name: str) -> Path:
        """The image as this side stores it: *original* itself as root, a shifted copy rootless."""
        if self.user is None:
            return original
        dest = self.base / f"{name}-shifted"
        if not dest.exists():
            unpack_shifted(original, dest, self.user)
        return dest

    def upper(self, name: str) -> Path:
        path = self.base / name
        path.mkdir()
        if self.user:
            os.chown(path, self.user.uid, self.user.gid)
        return path

    def ids(self) -> dict[int, int] | None:
        return container_ids(self.user) if self.user else None


@pytest.fixture(scope="module", params=["root", "rootless"])
def side(request: pytest.FixtureRequest) -> Iterator[Side]:
    if request.param == "root":
        with world_readable_tempdir("unionfs-run-debian-") as base:
            yield Side(None, base)
        return
    if shutil.which("newuidmap") is None:
        pytest.fail("needs newuidmap (apt-get install uidmap)")
    with unprivileged_user(subids=True) as user, dev_fuse_mode(0o666), \
            world_readable_tempdir("unionfs-run-debian-") as base:
        sub = namespaces.subordinate_range("/etc/subuid", user.uid)
        if sub is None or sub.length < 65536:
            pytest.skip("useradd gave the test user no 65536 subordinate ids")
        os.chown(base, user.uid, user.gid)
        try:
            yield Side(user, base)
        finally:
            for child in base.iterdir():
                remove_as(user, child)


def same_as_kernel(side: Side, original: Path, name: str, script: str, *options: str) -> tuple[str, str]:
    """Run *script* in a unionfs container over *original* (as *side* stores it) and with kernel
    overlayfs over *original*; assert both container layers hold the same; both outputs."""
    upper = side.upper(f"{name}-upper")
    image = side.image(original, name)
    start = time.monotonic()
    r = run_launcher(f"{upper}:{image}", ["/bin/sh", "-c", script], options,
                     user=side.user, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    kupper, kwork = side.base / f"{name}-kupper", side.base / f"{name}-kwork"
    kupper.mkdir()
    kwork.mkdir()
    middle = time.monotonic()
    k = kernel_run(original, kupper, kwork, script)
    print(f"{name} ({'rootless' if side.user else 'root'}): unionfs run {middle - start:.1f}s, "
          f"bwrap on kernel overlayfs {time.monotonic() - middle:.1f}s")
    assert k.returncode == 0, k.stdout + k.stderr
    ours, kernel = layer_snapshot(upper, side.ids()), layer_snapshot(kupper)
    diff = {p: (ours.get(p), kernel.get(p)) for p in sorted(set(ours) | set(kernel)) if ours.get(p) != kernel.get(p)}
    assert not diff, f"container layer differs from kernel overlayfs' (unionfs, kernel): {diff}"
    remove_as(side.user, upper)
    shutil.rmtree(kupper)
    shutil.rmtree(kwork)
    return r.stdout, k.stdout


# -- busybox, offline ---------------------------------------------------------------------------------

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "_apt:x:42:65534::/nonexistent:/bin/false\n"
          "app:x:1000:1000::/home/app:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = "root:x:0:\ntty:x:5:\napp:x:1000:\nnogroup:x:65534:\n"


@pytest.fixture(scope="module")
def busybox_image() -> Iterator[Path]:
    """busybox with the directories a distribution has: /tmp 1777, /var/lib, /usr/bin, /proc, /dev."""
    with world_readable_tempdir("unionfs-run-debian-bb-") as base:
        image = base / "image"
        build_busybox_layer(image, base)
        (image / "etc" / "passwd").write_text(PASSWD)
        (image / "etc" / "group").write_text(GROUP)
        (image / "etc" / "motd").write_text("image motd\n")
        (image / "etc" / "old.conf").write_text("old\n")
        for d in ("proc", "dev", "sys", "run", "var/lib/apt/lists", "var/cache", "usr/bin", "home/app"):
            (image / d).mkdir(parents=True)
        os.chown(image / "home" / "app", 1000, 1000)
        (image / "usr" / "bin" / "tool").write_text("#!/bin/sh\necho old tool\n")
        os.chmod(image / "usr" / "bin" / "tool", 0o755)
        (image / "tmp").mkdir()
        os.chmod(image / "tmp", 0o1777)
        yield image


APT_LIKE = """
set -e
# apt: a root process prepares a directory for its sandbox user, which downloads into it
mkdir -m 700 /var/lib/apt/lists/partial && chown _apt:root /var/lib/apt/lists/partial
su -s /bin/sh _apt -c 'echo index > /var/lib/apt/lists/partial/Release && echo t > /tmp/apt.tmp'
mv /var/lib/apt/lists/partial/Release /var/lib/apt/lists/Release
chown root:root /var/lib/apt/lists/Release
# dpkg: unpack to .dpkg-new, keep the old as a hard link, rename into place
cp /usr/bin/tool /usr/bin/tool.dpkg-new && chmod 4755 /usr/bin/tool.dpkg-new
ln /usr/bin/tool /usr/bin/tool.dpkg-tmp && mv /usr/bin/tool.dpkg-new /usr/bin/tool && rm /usr/bin/tool.dpkg-tmp
rm /etc/old.conf
# a non-root user writing /tmp and its home
su -s /bin/sh app -c 'echo hi > /tmp/f; mkdir -m 700 /tmp/d; echo x > /tmp/d/x; echo h > /home/app/.profile'
su -s /bin/sh nobody -c 'umask 077; echo n > /tmp/n'
stat -c '%a %u:%g %n' /tmp /tmp/f /tmp/d /usr/bin/tool /var/lib/apt/lists/partial
"""


def test_apt_and_dpkg_habits_leave_what_kernel_overlayfs_leaves(side: Side, busybox_image: Path) -> None:
    ours, kernel = same_as_kernel(side, busybox_image, "bb-apt", APT_LIKE)
    assert ours == kernel
    assert "4755 0:0 /usr/bin/tool" in ours


# -- Debian, with the network -------------------------------------------------------------------------

@pytest.mark.network
def test_debian_apt_get_install_jq_as_kernel_overlayfs(side: Side) -> None:
    """``apt-get update && apt-get install jq`` then ``jq`` in a stock Debian minbase rootfs; the
    container layer then holds the same paths, modes and owners as kernel overlayfs' does."""
    ours, kernel = same_as_kernel(side, debian_rootfs(), "debian", APT_SCRIPT)
    assert ours.splitlines()[-1] == "bookworm"
    assert kernel.splitlines()[-1] == "bookworm"
