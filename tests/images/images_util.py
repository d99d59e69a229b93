"""Helpers for the image tests: layer tars, docker-archive and OCI layouts made here, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import util
import zstandard

MTIME = 1_600_000_000


@dataclass
class M:
    """One tar member: name, kind (file, dir, symlink, hardlink, chardev, fifo), data or link target."""

    name: str
    kind: str = "file"
    data: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def layer_tar(members: Sequence[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.mtime, ti.mode, ti.uid, ti.gid = MTIME, m.mode, m.uid, m.gid
            if m.xattrs:
                ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                                  for k, v in m.xattrs.items()}
            payload = None
            if m.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif m.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, m.data
            elif m.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, m.data
            elif m.kind == "chardev":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            elif m.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            else:
                payload = m.data.encode()
                ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def compress(tar: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(tar, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(tars: Sequence[bytes], tag: str = "") -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "created": "2020-09-13T12:26:40Z",
                       "config": {"Cmd": ["sh"], "Env": [f"TAG={tag}"]},
                       "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
                       "history": [{"created": "2020-09-13T12:26:40Z", "created_by": f"layer {i}"}
                                   for i in range(len(tars))]},
                      sort_keys=True).encode()


def docker_archive(path: Path, images: Sequence[tuple[Sequence[bytes], list[str]]],
                   compression: str = "none", tweak: dict[str, bytes] | None = None) -> None:
    """A docker-archive of *images*: (layer tars, tags) each; *tweak* replaces member contents."""
    members: dict[str, bytes] = {}
    manifest = []
    for tars, tags in images:
        cfg = config_for(tars, ",".join(tags))
        cname = sha(cfg)[7:] + ".json"
        members[cname] = cfg
        names = []
        for t in tars:
            n = sha(t)[7:] + ".tar"
            members[n] = compress(t, compression)
            names.append(n)
        manifest.append({"Config": cname, "RepoTags": tags, "Layers": names})
    members["manifest.json"] = json.dumps(manifest).encode()
    members.update(tweak or {})
    write_tar(path, members)


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def oci_layout(root: Path, tars: Sequence[bytes], ref: str, compression: str = "gzip") -> dict[str, bytes]:
    """An OCI image-layout directory as skopeo writes it; returns {blob name: content}."""
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        blobs["blobs/sha256/" + sha(data)[7:]] = data
        return sha(data)

    cfg = config_for(tars, ref)
    layers = []
    for t in tars:
        b = compress(t, compression)
        suffix = {"gzip": "+gzip", "zstd": "+zstd"}.get(compression, "")
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + suffix, "digest": put(b),
                       "size": len(b)})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": put(cfg), "size": len(cfg)},
                           "layers": layers}).encode()
    mdigest = put(manifest)
    files = dict(blobs)
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": ref}}]}).encode()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def cli(*args: str, store: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`unionfs ARGS` (this checkout's) with --store after the command's own name."""
    argv = [util.program("unionfs"), *args]
    if store is not None:
        cut = 3 if args[0] == "image" else 2
        argv[cut:cut] = ["--store", str(store)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr}")
    return r


def store_state(store: Path) -> dict[str, object]:
    """Everything in a store, for 'unchanged' checks (lock files aside: they are empty and harmless)."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(store):
        rel = os.path.relpath(dirpath, store)
        if rel.startswith("locks"):
            continue
        for n in sorted(dirnames):
            out[os.path.join(rel, n)] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.join(rel, n)] = util.file_sha256(p) if os.path.isfile(p) and not os.path.islink(p) \
                else os.readlink(p) if os.path.islink(p) else "other"
    return out


def tree(root: Path) -> dict[bytes, dict[str, object]]:
    return util.snapshot(root)
