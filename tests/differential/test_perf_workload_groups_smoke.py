"""Smoke tests of the whole-workload groups in perf/: one small repetition of each runs to completion and
every implementation's runs validate.

Speed is never asserted: the tests read the JSON the scripts write and check only that no run of any
implementation was invalid (a wrong build, a wrong upper layer, a container on the wrong filesystem).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
import mount_loop  # noqa: E402
import podman_workloads  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ROOTFS = Path(os.environ.get("UNIONFS_TEST_CACHE", "/var/tmp/unionfs-test-cache")) / "bookworm-minbase"


def needs(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the perf groups need root (mounts, private podman stores)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run_script(name: str, args: list[str], out: Path, timeout: float) -> dict[str, object]:
    done = subprocess.run([sys.executable, str(REPO / "perf" / name), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    results = list(out.glob("*.json"))
    assert len(results) == 1, results
    document: dict[str, object] = json.loads(results[0].read_text())
    return document


def samples_of(document: dict[str, object]) -> list[dict[str, object]]:
    samples = document["samples"]
    assert isinstance(samples, list)
    return samples


@pytest.mark.slow
def test_mount_loop_validates(tmp_path: Path) -> None:
    needs("fuse-overlayfs", "fusermount3", "useradd")
    document = run_script("mount_loop.py", ["--reps", "1", "--iterations", "2"], tmp_path, 600)
    samples = samples_of(document)
    rows = {s["impl"] for s in samples}
    assert rows == {"unionfs", "fuse-overlayfs", "kernel", "unionfs rootless", "fuse-overlayfs rootless"}
    invalid = [s for s in samples if s["seconds"] is None]
    assert not invalid, invalid[:3]
    assert len(samples) == 2 * len(rows)


@pytest.mark.slow
def test_mount_loop_leaves_dev_fuse_and_users_as_they_were(tmp_path: Path) -> None:
    needs("fuse-overlayfs", "fusermount3", "useradd")
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    users = Path("/etc/passwd").read_text()
    run_script("mount_loop.py", ["--reps", "1", "--iterations", "1"], tmp_path, 600)
    assert os.stat("/dev/fuse").st_mode & 0o7777 == mode
    assert Path("/etc/passwd").read_text() == users


@pytest.mark.slow
@pytest.mark.parametrize("group", ["build", "run"])
def test_podman_group_validates(tmp_path: Path, group: str) -> None:
    needs("podman", "runc", "fuse-overlayfs")
    if not ROOTFS.is_dir():
        pytest.skip(f"no Debian root filesystem cached at {ROOTFS} (tests/launcher/test_run_debian.py builds it)")
    document = run_script("podman_workloads.py", ["--only", group, "--reps", "1", "--runs", "2"], tmp_path, 1800)
    samples = samples_of(document)
    assert {s["impl"] for s in samples} == {"unionfs-overlay", "fuse-overlayfs", "kernel"}, document["skipped"]
    invalid = [s for s in samples if s["seconds"] is None]
    assert not invalid, invalid[:3]


@pytest.mark.slow
@pytest.mark.network
def test_podman_apt_build_validates(tmp_path: Path) -> None:
    needs("podman", "runc", "fuse-overlayfs")
    document = run_script("podman_workloads.py", ["--network", "--only", "build-apt", "--reps", "1"],
                          tmp_path, 3600)
    samples = samples_of(document)
    assert {s["impl"] for s in samples} == {"unionfs-overlay", "fuse-overlayfs", "kernel"}, document["skipped"]
    invalid = [s for s in samples if s["seconds"] is None]
    assert not invalid, invalid[:3]


def test_mount_loop_check_rejects_a_wrong_upper_layer(tmp_path: Path) -> None:
    """The check after the unmount fails on an upper layer that lacks a whiteout or a copy-up."""
    mount_loop.layout(tmp_path, None)
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    (upper / "newdir").mkdir()
    for name, text in (("new.txt", "new\n"), ("b.txt", "bravo\nmore\n"), ("newdir/ren.txt", "rename me\n")):
        (upper / name).write_text(text)
    os.symlink("a.txt", upper / "link")
    (upper / "dir").mkdir()
    (upper / "dir" / "c.txt").write_text("charlie\n")
    os.chmod(upper / "dir" / "c.txt", 0o600)
    (upper / ".wh.del.txt").write_text("")
    with pytest.raises(mount_loop.LoopError, match="no whiteout for ren.txt"):
        mount_loop.check_upper(lower, upper)
    os.mknod(upper / "ren.txt", 0o600 | 0o020000, 0)
    mount_loop.check_upper(lower, upper)  # now complete (both whiteout forms accepted)
    (upper / "b.txt").write_text("bravo\n")
    with pytest.raises(mount_loop.LoopError, match="b.txt not in the upper layer"):
        mount_loop.check_upper(lower, upper)
    assert not list(mnt.iterdir())


def test_podman_build_check_rejects_a_wrong_image(tmp_path: Path) -> None:
    """The check of a built image fails on a missing rename, a wrong sum or a step on another filesystem."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "debian_version").write_text("12.15\n")
    want = podman_workloads.expected_check("unionfs-overlay", False, tmp_path)
    right = "\n".join(f"{k} {v}" if v else k for k, v in want.items())
    assert podman_workloads.wrong_lines(right, want) == []
    for line, replacement in (("fstypes", "fstypes fuse.unionfs overlay fuse.unionfs fuse.unionfs"),
                              ("absent", "absent /etc/issue.net /usr/share/doc /srv/data\npresent /etc/debian_version"),
                              ("sum", "sum 0123")):
        out = "\n".join(replacement if x.startswith(line + " ") else x for x in right.splitlines())
        assert podman_workloads.wrong_lines(out, want), line
