"""podman with ``unionfs-overlay`` as its overlay ``mount_program``.

What a podman user sees, end to end, with every container and build step running on a unionfs
mount (the tests check that the container's root really is ``fuse.unionfs``, so a podman that
silently fell back to kernel overlayfs fails them):

- ``podman build`` of a Containerfile whose RUN steps delete a file of the base image, replace a
  base-image directory that has content (``rm -rf d && mkdir d``), rename a file and chmod one
  produces an image in which ``podman run`` sees every change and none of the removed content;
- ``podman commit`` of a container that deleted files gives an image without them;
- an image whose layers carry registry-style whiteouts (``.wh.NAME``, ``.wh..wh..opq``) runs right;
- the image built on unionfs shows the same tree as the same build on kernel overlayfs.

podman runs as root against a private store (its own storage.conf, containers.conf, graph root,
run root, tmp dir, file locks and network config dir, all in temporary directories), so nothing
else on the machine is touched (podman's blob-info cache in /var/lib/containers/cache is removed
afterwards when it was not there before); the store is reset and removed at the end and no mount
may remain.
No image is pulled: the base image is imported from a busybox-static rootfs made here.

Needs root, podman, runc and a static busybox (``apt-get install podman runc busybox-static``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import util

pytestmark = pytest.mark.fuse

BUSYBOX = "/bin/busybox"
BASE_IMAGE = "localhost/unionfs-test-base:latest"
BUILT_IMAGE = "localhost/unionfs-test-built:latest"
COMMITTED_IMAGE = "localhost/unionfs-test-committed:latest"
# The mount program under test and the fstype its mounts show (fuse-overlayfs validates the harness).
if util.IMPL == "fuse-overlayfs":
    MOUNT_PROGRAM, FSTYPE = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs", "fuse.fuse-overlayfs"
else:
    MOUNT_PROGRAM, FSTYPE = util.program("unionfs-overlay"), "fuse.unionfs"
TIMEOUT = 150  # seconds for one podman command
BLOB_CACHE_DIR = Path("/var/lib/containers/cache")

# --------------------------------------------------------------------------------------------------
# The base image: /base holds what the build and the container change.

BASE_FILES: dict[str, tuple[str, int, str]] = {
    # path: (type, mode, content or link target)
    "/base": ("dir", 0o755, ""),
    "/base/del.txt": ("file", 0o644, "delete me\n"),
    "/base/keep.txt": ("file", 0o644, "kept\n"),
    "/base/src.txt": ("file", 0o644, "renamed content\n"),
    "/base/mod.txt": ("file", 0o644, "chmod me\n"),
    "/base/victim.txt": ("file", 0o644, "the container deletes me\n"),
    "/base/link": ("symlink", 0o777, "keep.txt"),
    "/base/d": ("dir", 0o755, ""),
    "/base/d/old1": ("file", 0o644, "old 1\n"),
    "/base/d/old2": ("file", 0o600, "old 2\n"),
    "/base/d/sub": ("dir", 0o711, ""),
    "/base/d/sub/deep": ("file", 0o644, "old deep\n"),
    "/base/tree": ("dir", 0o755, ""),
    "/base/tree/inner": ("dir", 0o755, ""),
    "/base/tree/inner/t": ("file", 0o644, "in a tree\n"),
    "/base/gone": ("dir", 0o755, ""),
    "/base/gone/g": ("file", 0o644, "whole dir removed\n"),
}

# Prints what a user of the container sees: the fstype of /, then one line per object below /base
# (name|type|octal mode|owner|link target) and the content of every regular file.
SNAPSHOT = textwrap.dedent(r"""
    set -e
    grep ' / / ' /proc/self/mountinfo | sed 's/.* - //' | cut -d' ' -f1 | sed 's/^/FSTYPE /'
    find /base | sort | while read -r p; do
        t=$(stat -c %F "$p")
        case "$t" in
            directory) echo "OBJ $p|dir|$(stat -c %a "$p")|$(stat -c %u:%g "$p")|" ;;
            symbolic\ link) echo "OBJ $p|symlink|777|$(stat -c %u:%g "$p")|$(readlink "$p")" ;;
            regular*) echo "OBJ $p|file|$(stat -c %a "$p")|$(stat -c %u:%g "$p")|"
                      echo "DATA $p|$(od -An -v -tx1 "$p" | tr -d ' \n')" ;;
            *) echo "OBJ $p|$t|$(stat -c %a "$p")|$(stat -c %u:%g "$p")|" ;;
        esac
    done
    """)

# Each change in a RUN step of its own, so each is its own container, unionfs mount and layer.
CONTAINERFILE = textwrap.dedent(f"""\
    FROM {BASE_IMAGE}
    RUN grep ' / / ' /proc/self/mountinfo | grep -q ' - {FSTYPE} '
    RUN rm /base/del.txt
    RUN rm -rf /base/d && mkdir /base/d && echo fresh > /base/d/fresh
    RUN mv /base/src.txt /base/dst.txt
    RUN chmod 0700 /base/mod.txt
    RUN echo later > /base/d/later && rm /base/d/fresh && chmod 0750 /base/d
    RUN rm -rf /base/gone && mv /base/tree /base/tree2 && echo more >> /base/keep.txt
    """)


def _expected_after_build() -> dict[str, tuple[str, int, str]]:
    exp = dict(BASE_FILES)
    del exp["/base/del.txt"]
    for p in ("/base/d/old1", "/base/d/old2", "/base/d/sub", "/base/d/sub/deep"):
        del exp[p]
    exp["/base/d"] = ("dir", 0o750, "")
    exp["/base/d/later"] = ("file", 0o644, "later\n")
    exp["/base/dst.txt"] = exp.pop("/base/src.txt")
    exp["/base/mod.txt"] = ("file", 0o700, "chmod me\n")
    del exp["/base/gone"], exp["/base/gone/g"]
    for p in ("/base/tree", "/base/tree/inner", "/base/tree/inner/t"):
        exp[p.replace("/base/tree", "/base/tree2")] = exp.pop(p)
    exp["/base/keep.txt"] = ("file", 0o644, "kept\nmore\n")
    return exp


# --------------------------------------------------------------------------------------------------
# A podman with a store of its own


class Podman:
    """podman (as root) with a private store below ``base``; ``mount_program`` None = kernel overlay."""

    def __init__(self, base: Path, mount_program: str | None):
        self.base = base
        self.mount_program = mount_program
        for d in ("root", "tmp", "net"):
            (base / d).mkdir(parents=True, exist_ok=True)
        # The run root must have a short path: with a long one (pytest's tmp dirs are), every
        # `podman run` waits 20 s for conmon ("Exceeded conmon timeout"), kernel overlay or not.
        self.runroot = Path(tempfile.mkdtemp(prefix="upm-", dir="/run"))
        storage = ['[storage]', 'driver = "overlay"', f'graphroot = "{base}/root"',
                   f'runroot = "{self.runroot}"', '[storage.options.overlay]']
        if mount_program:
            storage.append(f'mount_program = "{mount_program}"')
        (base / "storage.conf").write_text("\n".join(storage) + "\n")
        # No CAP_SYS_RESOURCE may be had here (podman 4.3 ignores --ulimit host for root and asks
        # for nofile=1048576): ask for limits no higher than ours, in every container and RUN step.
        nofile = min(4096, *(v for v in resource.getrlimit(resource.RLIMIT_NOFILE) if v >= 0))
        nproc = min(4096, *(v for v in resource.getrlimit(resource.RLIMIT_NPROC) if v >= 0))
        (base / "containers.conf").write_text(textwrap.dedent(f"""\
            [containers]
            netns = "none"
            log_driver = "k8s-file"
            default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
            [network]
            network_backend = "cni"
            network_config_dir = "{base}/net"
            [engine]
            cgroup_manager = "cgroupfs"
            events_logger = "file"
            runtime = "runc"
            lock_type = "file"
            tmp_dir = "{base}/tmp"
            image_copy_tmp_dir = "{base}/tmp"
            """))
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
                        CONTAINERS_CONF=str(base / "containers.conf"), TMPDIR=str(base / "tmp"))

    def __call__(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        cmd = ["podman", *args]
        try:
            r = subprocess.run(cmd, input=input, capture_output=True, env=self.env, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{' '.join(cmd)} took over {TIMEOUT}s; stderr: {e.stderr!r}") from None
        out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\nstdout: {out}\nstderr: {err}")
        return out

    def graph_options(self) -> dict[str, object]:
        info = json.loads(self("info", "--format", "json"))
        assert info["store"]["graphRoot"] == str(self.base / "root"), info["store"]
        opts: dict[str, object] = info["store"]["graphOptions"] or {}
        return opts

    def import_base(self) -> None:
        self("import", "-", BASE_IMAGE, input=self.rootfs_tar())

    def rootfs_tar(self) -> bytes:
        rootfs = self.base / "rootfs"
        if not rootfs.exists():
            make_rootfs(rootfs)
        return subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."],
                              capture_output=True, check=True).stdout

    def snapshot(self, image: str) -> tuple[str, dict[str, tuple[str, int, str]]]:
        """(fstype of the container's /, {path: (type, mode, content or link target)}) as
        `podman run` of ``image`` shows them."""
        out = self("run", "--rm", "--pull=never", "--network=none", image, "sh", "-c", SNAPSHOT)
        return parse_snapshot(out)

    def close(self) -> list[str]:
        """Remove everything: containers, images, the store. Returns what was wrong."""
        problems = []
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("system", "reset", "--force", check=False)
        for top in (self.base, self.runroot):
            marker = str(top) + "/"
            left = [mp for mp, _t, _s in util.mounts() if os.fsdecode(mp).startswith(marker)]
            if left:
                problems.append(f"mounts left under {top}: {left}")
                util.abort_fuse_under(top)
                for mp in reversed(left):
                    util.umount(os.fsdecode(mp))
            daemons = util.wait_daemons_gone(marker, timeout=15)
            if daemons:
                problems.append(f"processes still naming {top}: {daemons}")
        shutil.rmtree(self.runroot, ignore_errors=True)
        return problems


def make_rootfs(root: Path) -> None:
    """A minimal rootfs: a static busybox with all its applets, and BASE_FILES."""
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", root / "bin" / a)
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    for path, (kind, _mode, data) in BASE_FILES.items():
        p = root / path.lstrip("/")
        if kind == "dir":
            p.mkdir(exist_ok=True)
        elif kind == "file":
            p.write_text(data)
        else:
            os.symlink(data, p)
    for path, (kind, mode, _data) in BASE_FILES.items():
        if kind != "symlink":
            os.chmod(root / path.lstrip("/"), mode)


def parse_snapshot(out: str) -> tuple[str, dict[str, tuple[str, int, str]]]:
    fstype = ""
    objs: dict[str, tuple[str, int, str]] = {}
    data: dict[str, str] = {}
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "FSTYPE":
            fstype = rest
        elif tag == "OBJ":
            path, kind, octal, owner, target = rest.split("|", 4)
            assert owner == "0:0", line
            objs[path] = (kind, int(octal, 8), target)
        elif tag == "DATA":
            path, _, text = rest.partition("|")
            data[path] = text
    for path, (kind, perm, _t) in list(objs.items()):
        if kind == "file":
            objs[path] = (kind, perm, bytes.fromhex(data[path]).decode(errors="replace"))
    return fstype, objs


def static_busybox_problem() -> str | None:
    try:
        with open(BUSYBOX, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return f"{BUSYBOX} is not a 64-bit ELF binary"
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as e:
        return f"{BUSYBOX}: {e.strerror} (apt-get install busybox-static)"
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == 3:  # PT_INTERP: dynamically linked
            return f"{BUSYBOX} is dynamically linked (apt-get install busybox-static)"
    return None


def requirement_problem(mount_program: str | None = MOUNT_PROGRAM) -> str | None:
    if os.geteuid() != 0:
        return "the podman tests run as root (CI does)"
    missing = [p for p in ("podman", "runc", "tar") if shutil.which(p) is None]
    if missing:
        return f"needs podman: {' '.join(missing)} not on PATH (apt-get install podman runc)"
    if mount_program is not None and not os.access(mount_program, os.X_OK):
        return f"needs FUSE: mount program {mount_program} is missing"
    return util.fuse_problem() or static_busybox_problem()


@contextlib.contextmanager
def private_podman(base: Path, mount_program: str | None, what: str) -> Iterator[Podman]:
    """podman with a store of its own under *base* (and *mount_program* as its overlay mount
    program, or the kernel's overlay), skipped where the machine lacks what it needs (a failure
    under CI); everything it made is gone afterwards, and the test fails if it left anything."""
    why = requirement_problem(mount_program)
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {what} cannot run: {why}")
        pytest.skip(why)
    # podman as root keeps a blob-info cache in /var/lib/containers/cache whatever the store; when
    # that directory is not there before, it goes again afterwards.
    made = [d for d in (Path("/var/lib/containers"), BLOB_CACHE_DIR) if not d.exists()]
    pm = Podman(base, mount_program)
    try:
        yield pm
    finally:
        problems = pm.close()
        shutil.rmtree(base, ignore_errors=True)
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        assert not problems, problems


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    with private_podman(tmp_path_factory.mktemp("podman-unionfs"), MOUNT_PROGRAM, "the podman tests") as pm:
        opts = pm.graph_options()
        prog = opts.get("overlay.mount_program")
        assert isinstance(prog, dict) and prog.get("Executable") == MOUNT_PROGRAM, (
            f"podman does not use {MOUNT_PROGRAM} as its overlay mount_program: {opts}")
        pm.import_base()
        yield pm


@pytest.fixture(scope="module")
def built(podman: Podman) -> Path:
    """BUILT_IMAGE, built from CONTAINERFILE on unionfs; returns the build context."""
    ctx = podman.base / "context"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    podman("build", "--pull=never", "--network=none", "--layers", "-t", BUILT_IMAGE, str(ctx))
    return ctx


# --------------------------------------------------------------------------------------------------
# Tests


def test_base_image_runs_on_unionfs(podman: Podman) -> None:
    fstype, tree = podman.snapshot(BASE_IMAGE)
    assert fstype == FSTYPE, f"the container's / is {fstype!r}, not {FSTYPE} (kernel overlay used?)"
    assert tree == BASE_FILES


def test_build_shows_deletes_replaced_dir_renames_chmods(podman: Podman, built: Path) -> None:
    fstype, tree = podman.snapshot(BUILT_IMAGE)
    assert fstype == FSTYPE
    # The changes the RUN steps made, one by one, as a user of the image sees them.
    assert "/base/del.txt" not in tree, "RUN rm of a base-image file did not stick"
    assert tree["/base/d"] == ("dir", 0o750, ""), "the replaced directory is missing or has the old mode"
    assert sorted(p for p in tree if p.startswith("/base/d/")) == ["/base/d/later"], (
        "rm -rf d && mkdir d: the old content of d shows through, or a later layer's changes are lost")
    assert "/base/src.txt" not in tree and tree["/base/dst.txt"] == ("file", 0o644, "renamed content\n")
    assert tree["/base/mod.txt"] == ("file", 0o700, "chmod me\n")
    assert "/base/gone" not in tree and "/base/gone/g" not in tree
    assert "/base/tree" not in tree and tree["/base/tree2/inner/t"] == ("file", 0o644, "in a tree\n")
    assert tree["/base/keep.txt"] == ("file", 0o644, "kept\nmore\n")
    # ...and nothing else changed.
    assert tree == _expected_after_build()
    # The base image itself is untouched by the build.
    assert podman.snapshot(BASE_IMAGE)[1] == BASE_FILES


def test_commit_of_container_that_deleted_files(podman: Podman) -> None:
    name = "unionfs-test-deleter"
    podman("run", "--pull=never", "--network=none", "--name", name, BASE_IMAGE, "sh", "-c",
           "rm /base/victim.txt && rm -rf /base/d/sub && echo added > /base/added")
    try:
        diff = podman("diff", name).split()
        assert "/base/victim.txt" in diff and "/base/d/sub" in diff and "/base/added" in diff, diff
        podman("commit", name, COMMITTED_IMAGE)
    finally:
        podman("rm", "--force", name)
    fstype, tree = podman.snapshot(COMMITTED_IMAGE)
    assert fstype == FSTYPE
    assert "/base/victim.txt" not in tree, "the committed image still has the deleted file"
    assert "/base/d/sub" not in tree and "/base/d/sub/deep" not in tree
    exp = dict(BASE_FILES)
    del exp["/base/victim.txt"], exp["/base/d/sub"], exp["/base/d/sub/deep"]
    exp["/base/added"] = ("file", 0o644, "added\n")
    assert tree == exp
    # A container of the committed image deletes one more file: the earlier deletion still holds.
    out = podman("run", "--rm", "--pull=never", "--network=none", COMMITTED_IMAGE, "sh", "-c",
                 "rm /base/keep.txt && ls -A /base")
    assert sorted(out.split()) == ["added", "d", "del.txt", "gone", "link", "mod.txt", "src.txt", "tree"]


def _tar(entries: list[tuple[str, str]]) -> bytes:
    """A layer tarball: (name, content) pairs; a name ending in / is a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, text in entries:
            ti = tarfile.TarInfo(name.rstrip("/"))
            ti.mtime = 1_600_000_000
            if name.endswith("/"):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                data = text.encode()
                ti.mode, ti.size = 0o644, len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_pulled_style_image_with_whiteout_layers(podman: Podman) -> None:
    """An image as registries ship them: a later layer deletes with `.wh.NAME` and makes a directory
    opaque with `.wh..wh..opq` (`podman load` of a docker-archive stands in for a pull)."""
    top = _tar([("base/", ""), ("base/.wh.del.txt", ""), ("base/d/", ""), ("base/d/.wh..wh..opq", ""),
                ("base/d/new", "new\n"), ("base/tree/", ""), ("base/tree/.wh.inner", "")])
    layers = [podman.rootfs_tar(), top]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(la).hexdigest() for la in layers]}}).encode()
    image = "localhost/unionfs-test-loaded:latest"
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [image],
                            "Layers": ["0.tar", "1.tar"]}]).encode()
    archive = podman.base / "loaded.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("0.tar", layers[0]), ("1.tar", layers[1]), ("config.json", config),
                           ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    podman("load", "-i", str(archive))
    fstype, tree = podman.snapshot(image)
    assert fstype == FSTYPE
    exp = {k: v for k, v in BASE_FILES.items()
           if k != "/base/del.txt" and not k.startswith(("/base/d/", "/base/tree/"))}
    exp["/base/d/new"] = ("file", 0o644, "new\n")
    assert tree == exp


def test_build_matches_kernel_overlay(podman: Podman, built: Path,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same build on podman's native kernel overlayfs gives the same tree."""
    if util.IMPL != "unionfs":
        pytest.skip("compares unionfs with the kernel")
    why = util.overlay_problem()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("podman-kernel")
    kernel = Podman(base, None)
    try:
        assert "overlay.mount_program" not in kernel.graph_options()
        kernel.import_base()
        ctx = base / "context"
        ctx.mkdir()
        # The first RUN step checks the fstype; on the kernel it is plain overlay.
        (ctx / "Containerfile").write_text(CONTAINERFILE.replace(f" - {FSTYPE} ", " - overlay "))
        kernel("build", "--pull=never", "--network=none", "--layers", "-t", BUILT_IMAGE, str(ctx))
        k_fstype, k_tree = kernel.snapshot(BUILT_IMAGE)
        assert k_fstype == "overlay"
        u_fstype, u_tree = podman.snapshot(BUILT_IMAGE)
        assert u_fstype == FSTYPE
        assert u_tree == k_tree
    finally:
        problems = kernel.close()
        shutil.rmtree(base, ignore_errors=True)
    assert not problems, problems


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
