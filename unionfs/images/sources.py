"""Image archives as they come: docker-archive (``docker save``/``podman save``), oci-archive, and
OCI image-layout directories (``skopeo copy ... oci:DIR``).

A source lists its images (config, layer blobs, names) and opens blobs by name; it never unpacks
anything.  Every name it opens comes from the archive's own member list or is a validated digest,
so an OCI directory is read only below ``blobs/sha256/``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from .unpack import ImageError

log = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MAX_JSON = 16 << 20


@dataclass
class LayerRef:
    """One layer blob of an image in a source: where to read it and what it must hash to."""

    blob: str                 # member name (docker-archive) or blob path (OCI)
    digest: str | None        # the blob's digest, when the source states it (OCI)
    size: int | None
    diff_id: str
    media_type: str


@dataclass
class SourceImage:
    config: bytes             # the config JSON, verified against its digest
    image_id: str             # sha256 of the config
    layers: list[LayerRef]
    names: list[str]


class Source:
    """A readable archive or directory; subclasses say how to open a member."""

    def images(self) -> list[SourceImage]:
        raise NotImplementedError

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield

    def close(self) -> None:
        pass

    def read_json(self, name: str, digest: str | None = None, size: int | None = None) -> tuple[bytes, Any]:
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageError(f"{name}: larger than {MAX_JSON} bytes")
        if size is not None and len(data) != size:
            raise ImageError(f"{name}: {len(data)} bytes where {size} were announced")
        if digest is not None:
            check_digest(name, data, digest)
        try:
            return data, json.loads(data)
        except ValueError as e:
            raise ImageError(f"{name}: not valid JSON: {e}") from None


def check_digest(name: str, data: bytes, digest: str) -> None:
    import hashlib

    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise ImageError(f"{name}: digest mismatch: expected {digest}, got {got}")


BlobInfo = tuple[str, "str | None", "int | None", str]   # (name, digest, size, media type)


def image_from_config(config: bytes, cfg: Any, what: str, layers: Sequence[BlobInfo],
                      names: list[str]) -> SourceImage:
    import hashlib

    try:
        diff_ids = list(cfg["rootfs"]["diff_ids"])
    except (KeyError, TypeError):
        raise ImageError(f"{what}: config has no rootfs.diff_ids") from None
    if len(diff_ids) != len(layers):
        raise ImageError(f"{what}: {len(layers)} layers but {len(diff_ids)} diff_ids in the config")
    for d in diff_ids:
        if not isinstance(d, str) or not DIGEST_RE.match(d):
            raise ImageError(f"{what}: bad diff_id {d!r}")
    refs = [LayerRef(blob, digest, size, diff_id, mt)
            for (blob, digest, size, mt), diff_id in zip(layers, diff_ids, strict=True)]
    return SourceImage(config, "sha256:" + hashlib.sha256(config).hexdigest(), refs, names)


class TarSource(Source):
    """A tar archive on disk (docker-archive or oci-archive), read by member name."""

    def __init__(self, path: str) -> None:
        try:
            self.tf = tarfile.open(path, "r:*")
            self.members = {m.name.removeprefix("./"): m for m in self.tf.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as e:
            why = "not a tar archive" if "could not be opened" in str(e) else str(e).splitlines()[0]
            raise ImageError(f"{path}: not a readable image archive: {why}") from None
        self.path = path

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        m = self.members.get(name.removeprefix("./"))
        if m is None or not m.isreg():
            raise ImageError(f"{self.path}: no file {name!r} in the archive")
        f = self.tf.extractfile(m)
        assert f is not None
        yield f

    def has(self, name: str) -> bool:
        return name in self.members

    def close(self) -> None:
        self.tf.close()


class DirSource(Source):
    """An OCI image-layout directory."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if name not in ("index.json", "oci-layout", "manifest.json") and not name.startswith("blobs/sha256/"):
            raise ImageError(f"{self.path}: refusing to read {name!r}")
        try:
            f = open(os.path.join(self.path, name), "rb")
        except FileNotFoundError:
            raise ImageError(f"{self.path}: {name} is missing") from None
        with f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageError(f"{self.path}: {name} is not a regular file")
            yield f

    def has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.path, name))


def open_source(path: str) -> tuple[Source, list[SourceImage]]:
    """Open *path* and list its images, whatever its format."""
    src: TarSource | DirSource
    if os.path.isdir(path):
        src = DirSource(path)
    elif os.path.exists(path):
        src = TarSource(path)
    else:
        raise ImageError(f"{path}: no such file or directory")
    try:
        if src.has("index.json") and src.has("oci-layout"):
            return src, oci_images(src)
        if src.has("manifest.json"):
            return src, docker_images(src)
        raise ImageError(f"{path}: neither a docker-archive (manifest.json) nor an OCI layout "
                         "(oci-layout, index.json)")
    except BaseException:
        src.close()
        raise


def docker_images(src: Source) -> list[SourceImage]:
    _, manifest = src.read_json("manifest.json")
    if not isinstance(manifest, list):
        raise ImageError("manifest.json: not a list of images")
    out = []
    for entry in manifest:
        try:
            config_name = str(entry["Config"])
            layer_names = [str(x) for x in entry["Layers"]]
        except (KeyError, TypeError):
            raise ImageError("manifest.json: an entry lacks Config or Layers") from None
        config, cfg = src.read_json(config_name)
        stem = os.path.basename(config_name).removesuffix(".json")
        if re.fullmatch(r"[0-9a-f]{64}", stem):
            check_digest(config_name, config, "sha256:" + stem)
        names = [str(t) for t in entry.get("RepoTags") or []]
        blobs = [(n, None, None, "application/vnd.oci.image.layer.v1.tar") for n in layer_names]
        out.append(image_from_config(config, cfg, config_name, blobs, names))
    return out


def blob_name(digest: Any, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ImageError(f"{what}: bad digest {digest!r}")
    return "blobs/sha256/" + digest[len("sha256:"):]


def oci_images(src: Source) -> list[SourceImage]:
    _, index = src.read_json("index.json")
    out: list[SourceImage] = []
    for desc in (index.get("manifests") or [] if isinstance(index, dict) else []):
        out.extend(_oci_descriptor(src, desc, depth=0))
    if not out:
        raise ImageError("index.json: no image manifests")
    return out


def _oci_descriptor(src: Source, desc: Any, depth: int) -> list[SourceImage]:
    if not isinstance(desc, dict) or depth > 2:
        raise ImageError("index.json: malformed descriptor")
    name = blob_name(desc.get("digest"), "index.json")
    _, doc = src.read_json(name, desc["digest"], desc.get("size"))
    if desc.get("mediaType") in INDEX_TYPES or doc.get("manifests") is not None:
        wanted = [d for d in doc.get("manifests") or []
                  if (d.get("platform") or {}).get("os", "linux") == "linux"
                  and (d.get("platform") or {}).get("architecture", _arch()) == _arch()]
        return [img for d in wanted[:1] for img in _oci_descriptor(src, d, depth + 1)]
    annotations = desc.get("annotations") or {}
    names = [annotations[REF_NAME]] if REF_NAME in annotations else []
    try:
        cdesc = doc["config"]
        config, cfg = src.read_json(blob_name(cdesc["digest"], name), cdesc["digest"], cdesc.get("size"))
        layers = [(blob_name(d["digest"], name), str(d["digest"]), int(d["size"]),
                   str(d.get("mediaType", ""))) for d in doc["layers"]]
    except (KeyError, TypeError, ValueError):
        raise ImageError(f"{name}: malformed image manifest") from None
    return [image_from_config(config, cfg, name, layers, names)]


def _arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
