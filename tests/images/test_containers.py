"""`unionfs run IMAGE` and containers in the store, as root: the image config applied and overridden
as `docker run` does, names, `ps`, `rm`, `--rm`, and `diff` and `commit` of a container."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from containers_util import busybox_tar, image_archive, ps_rows
from images_util import M, cli, layer_tar

from launcher.supervisor import DEFAULT_PATH

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("need_fuse"),
              pytest.mark.skipif(os.geteuid() != 0, reason="as root (rootless: test_containers_rootless)")]

APP = "localhost/ctest-app:1"      # Cmd, Env, WorkingDir, User
ENTRY = "localhost/ctest-entry:1"  # Entrypoint + Cmd
BARE = "localhost/ctest-bare:1"    # no config at all
APP_CONFIG = {"Cmd": ["sh", "-c", "pwd; echo $FOO:$PATH:$HOME; id -u"], "Env": ["FOO=image", "PATH=/bin"],
              "WorkingDir": "/etc", "User": "nobody"}
APP_LAYER = [M("data/", "dir", mode=0o755), M("data/keep", data="keep\n"), M("data/victim", data="v\n")]


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("container-images")
    rootfs = busybox_tar(base)
    image_archive(base / "app.tar", [rootfs, layer_tar(APP_LAYER)], APP_CONFIG, APP)
    image_archive(base / "entry.tar", [rootfs], {"Entrypoint": ["/bin/echo", "entry"], "Cmd": ["default"]}, ENTRY)
    image_archive(base / "bare.tar", [rootfs], {}, BARE)
    return base


@pytest.fixture
def store(archives: Path, tmp_path: Path) -> Iterator[Path]:
    s = tmp_path / "store"
    for name in ("app", "entry", "bare"):
        cli("image", "import", str(archives / f"{name}.tar"), store=s)
    yield s
    for row in ps_rows(cli("ps", "-a", store=s).stdout).values():
        assert not row["STATUS"].startswith("Up"), f"a container still runs: {row}"


def run(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli("run", *args, store=store, check=check)


def test_the_image_config_applies(store: Path) -> None:
    assert run(store, "--rm", APP).stdout.splitlines() == ["/etc", "image:/bin:/", "65534"]
    assert run(store, "--rm", ENTRY).stdout == "entry default\n"
    assert run(store, "--rm", BARE, "sh", "-c", "echo $PATH; pwd; id -u").stdout.splitlines() == \
        [DEFAULT_PATH, "/", "0"]


def test_flags_override_the_config_as_docker_run(store: Path, tmp_path: Path) -> None:
    out = run(store, "--rm", "-w", "/tmp", "-e", "FOO=flag", "-u", "0", APP).stdout
    assert out.splitlines() == ["/tmp", "flag:/bin:/root", "0"]
    assert run(store, "--rm", APP, "echo", "a", "b").stdout == "a b\n"           # CMD args replace Cmd
    assert run(store, "--rm", ENTRY, "x", "y").stdout == "entry x y\n"           # ... after the Entrypoint
    assert run(store, "--rm", "--entrypoint", "/bin/echo", ENTRY).stdout == "\n"  # --entrypoint drops Cmd
    assert run(store, "--rm", "--entrypoint", "", ENTRY, "echo", "z").stdout == "z\n"
    assert run(store, "--rm", "--entrypoint", '["/bin/echo", "j"]', ENTRY, "k").stdout == "j k\n"
    env_file = tmp_path / "env"
    env_file.write_text("# comment\n\nFOO=file\nBAR=file\n")
    out = run(store, "--rm", "--env-file", str(env_file), "-e", "BAR=flag", APP, "sh", "-c", "echo $FOO $BAR")
    assert out.stdout == "file flag\n"
    r = run(store, "--rm", "--entrypoint", "", BARE, check=False)
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "no command specified" in r.stderr
    assert ps_rows(cli("ps", "-a", store=store).stdout) == {}


def test_a_directory_of_that_name_means_branches(store: Path, tmp_path: Path) -> None:
    (tmp_path / "ctest-bare").mkdir()
    r = subprocess.run([util.program("unionfs"), "run", "--store", str(store), "ctest-bare", "true"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ctest-bare" not in cli("ps", "-a", store=store).stdout  # a lone upper
    r = run(store, "no-such-image", "true", check=False)
    assert r.returncode == 125 and r.stderr.count("\n") == 1
    assert "no-such-image: no such image in" in r.stderr


def test_names_ps_and_rm(store: Path) -> None:
    run(store, "--name", "first", APP, "true")
    r = run(store, "--name", "first", APP, "true", check=False)
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "'first' is already in use" in r.stderr
    run(store, APP, "sh", "-c", "exit 3", check=False)
    rows = ps_rows(cli("ps", "-a", store=store).stdout)
    assert len(rows) == 2 and all(re.fullmatch(r"[a-z]+_[a-z]+\d*", n) for n in set(rows) - {"first"})
    generated = next(n for n in rows if n != "first")
    assert rows["first"]["IMAGE"] == APP and rows["first"]["COMMAND"] == "true"
    assert rows["first"]["STATUS"].startswith("Exited (0) ")
    assert rows[generated]["STATUS"].startswith("Exited (3) ")
    assert re.fullmatch(r"[0-9a-f]{12}", rows["first"]["CONTAINER ID"])
    assert cli("ps", store=store).stdout.splitlines()[1:] == []         # none running
    assert cli("rm", "first", generated, store=store).stdout.split() == ["first", generated]
    assert ps_rows(cli("ps", "-a", store=store).stdout) == {}
    r = cli("rm", "first", store=store, check=False)
    assert r.returncode == 1 and r.stderr == "unionfs: no such container: first\n"
    assert os.listdir(store / "containers") == [] and os.listdir(store / "tmp") == []


def start(store: Path, *args: str) -> subprocess.Popen[str]:
    argv = [util.program("unionfs"), "run", "--store", str(store), *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_up_while_running_exited_after_sigkill_and_rm_force(store: Path) -> None:
    proc = start(store, "--name", "busy", APP, "sh", "-c", "echo ready; exec sleep 60")
    try:
        assert ps_rows(cli("ps", store=store).stdout)["busy"]["STATUS"].startswith("Up ")
        r = cli("rm", "busy", store=store, check=False)
        assert r.returncode == 1 and "cannot remove container busy as it is running" in r.stderr
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ps_rows(cli("ps", "-a", store=store).stdout)["busy"]["STATUS"] == "Exited (137)"
    cli("rm", "busy", store=store)
    proc = start(store, "--name", "busy2", "--rm", APP, "sh", "-c", "echo ready; exec sleep 60")
    try:
        assert cli("rm", "-f", "busy2", store=store).stdout == "busy2\n"
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ps_rows(cli("ps", "-a", store=store).stdout) == {}


def test_auto_remove_and_the_exit_status(store: Path) -> None:
    r = run(store, "--rm", APP, "sh", "-c", "echo out; exit 7", check=False)
    assert (r.returncode, r.stdout) == (7, "out\n")
    assert ps_rows(cli("ps", "-a", store=store).stdout) == {}
    assert os.listdir(store / "containers") == []


def test_diff_and_commit_of_a_container(store: Path) -> None:
    changes = "rm /data/victim && echo new > /data/new && mkdir /made && echo x > /made/f && hostname"
    run(store, "--name", "changer", "-u", "0", APP, "sh", "-c", changes)
    diff = cli("diff", "changer", store=store).stdout.splitlines()
    assert sorted(diff) == ["A /data/new", "A /made", "A /made/f", "C /data", "D /data/victim"]  # no init layer
    image_id = cli("commit", "changer", "localhost/ctest-committed:1", store=store).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", image_id)
    out = run(store, "--rm", "-u", "0", "localhost/ctest-committed:1", "sh", "-c",
              "ls /data; cat /made/f; cat /etc/hostname").stdout.splitlines()
    assert out[:3] == ["keep", "new", "x"] and out[3] != "changer"
    # the committed image keeps its base's config
    assert run(store, "--rm", "localhost/ctest-committed:1").stdout.splitlines()[0] == "/etc"
    cli("rm", "changer", store=store)


def test_image_rm_refuses_an_image_a_container_uses(store: Path) -> None:
    run(store, "--name", "user-of-app", APP, "true")
    before = cli("images", store=store).stdout
    r = cli("image", "rm", APP, store=store, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "image is in use by container user-of-app" in r.stderr
    assert cli("images", store=store).stdout == before
    cli("image", "prune", store=store)
    assert run(store, "--rm", APP, "cat", "/data/keep").stdout == "keep\n"
    assert cli("diff", "user-of-app", store=store).stdout == ""
    cli("rm", "user-of-app", store=store)
    cli("image", "rm", APP, store=store)
    assert APP not in cli("images", store=store).stdout
