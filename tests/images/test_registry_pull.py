"""`unionfs pull` / `unionfs push` against a real registry (Debian's docker-registry) on 127.0.0.1:
round trips, layers skipped, plain HTTP only when asked, manifest lists, chunked uploads,
cross-repository mounts, interrupted downloads, and the errors a user meets (each one line, the
store unchanged).  Auth and TLS are in test_registry_auth.py; podman in test_registry_podman.py."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import util
from images_util import M, cli, compress, docker_archive, layer_tar, sha, store_state, tree
from registry_util import Proxy, Registry, running_registry

INSECURE = "--tls-verify=false"
BASE = [M("etc/", "dir", mode=0o755), M("etc/hello", data="hello from the registry\n"),
        M("etc/gone", data="deleted above\n"), M("usr/", "dir", mode=0o755), M("usr/lib/", "dir", mode=0o755)]
TOP = [M("etc/", "dir", mode=0o755), M("etc/.wh.gone"), M("etc/top", data="top layer\n")]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="module")
def seeded(reg: Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding image `seed` (two gzip layers), pushed to REG/test/seed:1; returns the store."""
    d = tmp_path_factory.mktemp("seed")
    docker_archive(d / "seed.tar", [([layer_tar(BASE), layer_tar(TOP)], ["localhost/seed:latest"])], "gzip")
    cli("image", "import", str(d / "seed.tar"), store=d / "store")
    cli("push", INSECURE, "seed", f"{reg.host}/test/seed:1", store=d / "store")
    return d / "store"


def big_layer(size: int, seed: int = 0) -> bytes:
    """A layer with one incompressible file of *size* bytes (so that the blob is as large)."""
    data = hashlib.shake_256(f"unionfs-{seed}".encode()).digest(size)
    return layer_tar([M("data/", "dir", mode=0o755), M("data/blob", data=data.decode("latin-1"))])


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def layer_trees(store: Path, name: str) -> list[dict[bytes, dict[str, object]]]:
    dirs = json.loads(cli("image", "inspect", name, store=store).stdout)["LayerDirs"]
    return [tree(Path(d)) for d in dirs]


# ---------------------------------------------------------------------------------------- round trips


def test_pull_fetches_what_was_pushed_and_a_second_pull_skips_every_layer(reg: Registry, seeded: Path,
                                                                           tmp_path: Path) -> None:
    ref = f"{reg.host}/test/seed:1"
    r = cli("pull", INSECURE, ref, store=tmp_path / "s")
    assert "2 layers fetched, 0 already stored" in r.stdout
    assert layer_trees(tmp_path / "s", ref) == layer_trees(seeded, "seed")
    pushed = json.loads(cli("image", "inspect", "seed", store=seeded).stdout)
    pulled = json.loads(cli("image", "inspect", ref, store=tmp_path / "s").stdout)
    assert pulled["Id"] == pushed["Id"] and pulled["Names"] == [ref]
    assert not os.listdir(tmp_path / "s/tmp") and not os.listdir(tmp_path / "s/partial")
    again = cli("pull", INSECURE, ref, store=tmp_path / "s")
    assert "0 layers fetched, 2 already stored" in again.stdout
    # by digest, too: the same image
    digest = reg.manifest_digest("test/seed", "1")
    by_digest = cli("pull", INSECURE, f"{reg.host}/test/seed@{digest}", store=tmp_path / "s")
    assert by_digest.stdout.startswith(pulled["Id"][7:19]) and "0 layers fetched" in by_digest.stdout


def test_plain_http_only_for_a_registry_named_with_tls_verify_false(reg: Registry, seeded: Path,
                                                                     tmp_path: Path) -> None:
    """127.0.0.1 gets no silent downgrade to HTTP (docker would allow it; podman does not)."""
    store = tmp_path / "s"
    r = cli("pull", f"{reg.host}/test/seed:1", store=store, check=False)
    one_line_error(r, reg.host, "TLS", "--tls-verify=false")
    assert not store.exists()


def test_chunked_push_and_cross_repository_mount(reg: Registry, seeded: Path, tmp_path: Path) -> None:
    docker_archive(tmp_path / "c.tar", [([layer_tar(BASE), big_layer(300_000, 7)], ["localhost/c:latest"])])
    cli("image", "import", str(tmp_path / "c.tar"), store=tmp_path / "s")
    r = cli("push", INSECURE, "--chunk-size", "65536", "c", f"{reg.host}/chunked/c:1", store=tmp_path / "s")
    assert "3 blobs uploaded, 0 present, 0 mounted" in r.stdout
    assert cli("pull", INSECURE, f"{reg.host}/chunked/c:1", store=tmp_path / "p").returncode == 0
    assert layer_trees(tmp_path / "p", f"{reg.host}/chunked/c:1") == layer_trees(tmp_path / "s", "c")
    # the store knows chunked/c holds these layers: another repository mounts them
    r = cli("push", INSECURE, "c", f"{reg.host}/other/c:1", store=tmp_path / "s")
    assert "1 blobs uploaded, 0 present, 2 mounted" in r.stdout
    r = cli("push", INSECURE, "c", f"{reg.host}/other/c:2", store=tmp_path / "s")
    assert "0 blobs uploaded, 3 present, 0 mounted" in r.stdout


def test_manifest_list_picks_the_platform(reg: Registry, seeded: Path, tmp_path: Path) -> None:
    """A Docker manifest list of an OCI manifest (amd64) and a Docker v2 schema 2 one (arm64)."""
    base = f"http://{reg.host}/v2/multi/img"
    docker_archive(tmp_path / "arm.tar", [([layer_tar(BASE), layer_tar([M("arm", data="arm64\n")])],
                                           ["localhost/arm:latest"])], "gzip")
    cli("image", "import", str(tmp_path / "arm.tar"), store=tmp_path / "src")
    cli("push", INSECURE, "arm", f"{reg.host}/multi/img:arm-oci", store=tmp_path / "src")
    cli("push", INSECURE, "seed", f"{reg.host}/multi/img:amd", store=seeded)
    oci = reg.manifest("multi/img", "arm-oci")
    docker = dict(oci, mediaType="application/vnd.docker.distribution.manifest.v2+json")
    docker["config"] = dict(oci["config"], mediaType="application/vnd.docker.container.image.v1+json")  # type: ignore[arg-type]
    docker["layers"] = [dict(x, mediaType="application/vnd.docker.image.rootfs.diff.tar.gzip")
                        for x in oci["layers"]]  # type: ignore[attr-defined]
    body = json.dumps(docker).encode()
    put = httpx.put(f"{base}/manifests/arm", content=body,
                    headers={"Content-Type": docker["mediaType"]})  # type: ignore[dict-item]
    assert put.status_code == 201, put.text
    amd = reg.blob_path(reg.manifest_digest("multi/img", "amd")).read_bytes()
    index = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
             "manifests": [
                 {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(amd), "size": len(amd),
                  "platform": {"os": "linux", "architecture": "amd64"}},
                 {"mediaType": docker["mediaType"], "digest": sha(body), "size": len(body),
                  "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}
    put = httpx.put(f"{base}/manifests/multi", content=json.dumps(index).encode(),
                    headers={"Content-Type": index["mediaType"]})  # type: ignore[dict-item]
    assert put.status_code == 201, put.text
    ref = f"{reg.host}/multi/img:multi"
    if os.uname().machine == "x86_64":
        cli("pull", INSECURE, ref, store=tmp_path / "host")
        assert layer_trees(tmp_path / "host", ref) == layer_trees(seeded, "seed")
    cli("pull", INSECURE, "--platform", "linux/arm64", ref, store=tmp_path / "arm")
    assert layer_trees(tmp_path / "arm", ref) == layer_trees(tmp_path / "src", "arm")
    r = cli("pull", INSECURE, "--platform", "linux/s390x", ref, store=tmp_path / "arm", check=False)
    one_line_error(r, "no image for linux/s390x", "linux/amd64", "linux/arm64/v8")


# ---------------------------------------------------------------------------------------- interruptions


@pytest.fixture(scope="module")
def big(reg: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """REG/test/big:1, one 6 MB layer over BASE; returns its reference."""
    d = tmp_path_factory.mktemp("big")
    docker_archive(d / "big.tar", [([layer_tar(BASE), big_layer(6 << 20)], ["localhost/big:latest"])])
    cli("image", "import", str(d / "big.tar"), store=d / "store")
    cli("push", INSECURE, "big", f"{reg.host}/test/big:1", store=d / "store")
    return f"{reg.host}/test/big:1"


def test_a_connection_cut_mid_blob_is_resumed_with_a_range_request(reg: Registry, big: str,
                                                                   tmp_path: Path) -> None:
    proxy = Proxy(reg.port, cut_after=2 << 20)
    try:
        ref = big.replace(reg.host, proxy.host)
        r = cli("pull", INSECURE, ref, store=tmp_path / "s")
    finally:
        proxy.close()
    assert "1 resumed" in r.stdout, r.stdout
    assert b"Range: bytes=" in bytes(proxy.sent) or b"range: bytes=" in bytes(proxy.sent)
    assert layer_trees(tmp_path / "s", ref)[0][b"data/blob"]["sha256"] == \
        hashlib.sha256(hashlib.shake_256(b"unionfs-0").digest(6 << 20).decode("latin-1").encode()).hexdigest()


def test_a_pull_killed_mid_blob_completes_when_run_again(reg: Registry, big: str, tmp_path: Path) -> None:
    store = tmp_path / "s"
    proxy = Proxy(reg.port, rate=2 << 20)
    ref = big.replace(reg.host, proxy.host)
    try:
        proc = subprocess.Popen([util.program("unionfs"), "pull", "--store", str(store), INSECURE, ref],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list((store / "partial").glob("*")) if (store / "partial").is_dir() else []
            if any(p.stat().st_size > (1 << 20) for p in partial):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the pull ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (store / "images").exists() or not os.listdir(store / "images")
        proxy.rate = None
        r = cli("pull", INSECURE, ref, store=store)
    finally:
        proxy.close()
    assert "1 resumed" in r.stdout, r.stdout
    assert not os.listdir(store / "partial") and not os.listdir(store / "tmp")
    assert len(layer_trees(store, ref)) == 2


# ---------------------------------------------------------------------------------------- errors


def test_unknown_tag_unknown_host_and_unknown_repository_are_one_line(reg: Registry, seeded: Path,
                                                                      tmp_path: Path) -> None:
    store = tmp_path / "s"
    cli("pull", INSECURE, f"{reg.host}/test/seed:1", store=store)
    before = store_state(store)
    one_line_error(cli("pull", INSECURE, f"{reg.host}/test/seed:nope", store=store, check=False),
                   "test/seed:nope", "404", "MANIFEST_UNKNOWN")
    one_line_error(cli("pull", INSECURE, f"{reg.host}/no/such:1", store=store, check=False), "404")
    one_line_error(cli("pull", INSECURE, "nosuchhost.invalid/a/b:1", store=store, check=False),
                   "nosuchhost.invalid", "unknown host")
    one_line_error(cli("push", INSECURE, "nosuchimage", f"{reg.host}/x/y:1", store=store, check=False),
                   "no such image")
    one_line_error(cli("pull", "Not/A:Valid:Ref", store=store, check=False), "bad")
    assert store_state(store) == before


def test_a_corrupt_blob_in_the_registry_is_one_line_and_the_store_is_unchanged(
        reg: Registry, tmp_path: Path) -> None:
    docker_archive(tmp_path / "t.tar", [([layer_tar(BASE), layer_tar([M("tampered", data="x" * 5000)])],
                                         ["localhost/t:latest"])], "gzip")
    cli("image", "import", str(tmp_path / "t.tar"), store=tmp_path / "src")
    cli("push", INSECURE, "t", f"{reg.host}/test/tampered:1", store=tmp_path / "src")
    layer = reg.manifest("test/tampered", "1")["layers"][1]  # type: ignore[index]
    path = reg.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store = tmp_path / "s"
    cli("pull", INSECURE, f"{reg.host}/test/seed:1", store=store, check=False)
    before = store_state(store)
    r = cli("pull", INSECURE, f"{reg.host}/test/tampered:1", store=store, check=False)
    one_line_error(r, "digest mismatch", layer["digest"])
    assert store_state(store) == before


def test_a_full_disk_is_one_line_and_the_store_is_unchanged(reg: Registry, seeded: Path, big: str,
                                                           tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs (root)")
    store = tmp_path / "s"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "unionfs-test-full", str(store)], check=True)
    try:
        cli("pull", INSECURE, f"{reg.host}/test/seed:1", store=store)
        before = store_state(store)
        r = cli("pull", INSECURE, big, store=store, check=False)
        one_line_error(r, "No space left on device")
        assert store_state(store) == before
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_compress_helper_is_what_the_registry_stores(reg: Registry, seeded: Path) -> None:
    """The seed's blobs in the registry are the gzip blobs imported (pushed as they are)."""
    layers = reg.manifest("test/seed", "1")["layers"]  # type: ignore[index]
    assert [x["digest"] for x in layers] == [sha(compress(layer_tar(m), "gzip")) for m in (BASE, TOP)]
