"""What a container changed, read from its upper (container) layer alone: `diff`, `commit`, `export`.

The upper is walked; the image below it is never walked.  Telling an addition from a change needs
one look-up of that path in the lower layers (component by component, never following a symlink,
honouring their whiteouts), and only for paths the upper holds.  Whiteouts are read in every
dialect through unionfs.core.whiteout: AUFS ``.wh.NAME`` and ``.wh..wh..opq``, overlay 0/0 character
devices and the opaque xattrs.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionfs.core.branches import fd_path, listdir, lstat_at, open_dir_at, open_root
from unionfs.core.branchview import BranchView
from unionfs.core.whiteout import (
    WH_META_PREFIX,
    WH_OPQ,
    WH_PREFIX,
    dir_is_opaque,
    is_private_xattr,
    is_whiteout_stat,
)

from .store import Store, hexof, normalize_name
from .unpack import CHUNK, XATTR_PAX, ImageError, decompressed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    kind: str      # "A", "C" or "D", as docker diff prints them
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def _skipped(name: bytes) -> bool:
    """AUFS and unionfs bookkeeping (``.wh..wh.*``): never a change, never in a layer.  The opaque
    marker ``.wh..wh..opq`` is read separately, through dir_is_opaque."""
    return name.startswith(WH_META_PREFIX)


def container_diff(upper: os.PathLike[str] | str, lowers: Sequence[os.PathLike[str] | str]) -> list[Change]:
    """What `docker diff` prints for the container layer *upper* over *lowers* (top first).

    Order and rules as docker's and podman's overlay driver (containers/storage ``changes()``): a
    depth-first walk of the upper, names sorted bytewise in each directory (a whiteout where its own
    name sorts), each directory before what is inside it.  A directory that exists below with the
    same mode, size and mtime is not listed for itself; an added or deleted path then brings in
    every parent directory not listed yet, as "C", just before it.  An opaque directory that hides
    something below (``rm -rf d && mkdir d``) is "D", as docker and podman print it, and what is in
    it is "A".
    """
    out: list[Change] = []
    listed: set[str] = set()
    low = BranchView(lowers)
    root = open_root(os.fspath(upper))
    try:
        _walk(root, [], False, low, out, listed)
    finally:
        os.close(root)
        low.close()
    return out


def _walk(dfd: int, parts: list[bytes], hidden: bool, low: BranchView, out: list[Change],
          listed: set[str]) -> None:
    for name in sorted(listdir(dfd)):
        if _skipped(name):
            continue
        st = lstat_at(dfd, name)
        if name.startswith(WH_PREFIX) or is_whiteout_stat(st):
            gone = name[len(WH_PREFIX):] if name.startswith(WH_PREFIX) else name
            _record(out, listed, Change("D", _path([*parts, gone])))
            continue
        path = [*parts, name]
        below = None if hidden else low.lstat_names(path)
        is_dir = stat.S_ISDIR(st.st_mode)
        sub = open_dir_at(dfd, name) if is_dir else -1
        try:
            opaque = is_dir and dir_is_opaque(sub)
            if below is None:
                _record(out, listed, Change("A", _path(path)))
            elif opaque:          # replaced: what was there is gone (docker and podman say D)
                _record(out, listed, Change("D", _path(path)))
            elif not (is_dir and stat.S_ISDIR(below.st_mode) and _same_dir(st, below)):
                _record(out, listed, Change("C", _path(path)))
            if is_dir:
                _walk(sub, path, hidden or opaque or below is None, low, out, listed)
        finally:
            if sub >= 0:
                os.close(sub)


def _same_dir(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_mode == b.st_mode and a.st_size == b.st_size
            and (a.st_mtime_ns == b.st_mtime_ns or (int(a.st_mtime) == int(b.st_mtime)
                                                    and 0 in (a.st_mtime_ns % 10**9, b.st_mtime_ns % 10**9))))


def _record(out: list[Change], listed: set[str], change: Change) -> None:
    if change.kind in ("A", "D"):
        parents = []
        p = os.path.dirname(change.path)
        while p != "/":
            if p not in listed:
                parents.append(Change("C", p))
                listed.add(p)
            p = os.path.dirname(p)
        out.extend(reversed(parents))
    out.append(change)
    listed.add(change.path)


def _path(parts: list[bytes]) -> str:
    return "/" + os.fsdecode(b"/".join(parts))


# ---------------------------------------------------------------------------------------- layer tars


def write_layer_tar(upper: os.PathLike[str] | str, out: io.BufferedIOBase) -> None:
    """The upper as an OCI layer tar: overlay whiteouts and opaque xattrs become ``.wh.`` entries,
    AUFS ones stay as they are, bookkeeping is left out; hard links stay links; xattrs (user.*,
    security.*, trusted.* other than overlay's) go in PAX headers.  Deterministic: sorted names,
    numeric owners only, times as in the upper."""
    root = open_root(os.fspath(upper))
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
            _tar_dir(tf, root, b"", {})
    finally:
        os.close(root)


def _tar_dir(tf: tarfile.TarFile, dfd: int, prefix: bytes, links: dict[tuple[int, int], str]) -> None:
    names = sorted(listdir(dfd))
    if prefix and dir_is_opaque(dfd) and WH_OPQ not in names:
        tf.addfile(_whiteout_info(prefix + WH_OPQ))
    for name in names:
        if _skipped(name) and name != WH_OPQ:
            continue
        rel = prefix + name
        st = lstat_at(dfd, name)
        if is_whiteout_stat(st):
            tf.addfile(_whiteout_info(prefix + WH_PREFIX + name))
            continue
        ti = tarfile.TarInfo(os.fsdecode(rel))
        ti.uid, ti.gid, ti.uname, ti.gname = st.st_uid, st.st_gid, "", ""
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.mtime = st.st_mtime
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in links:
            ti.type, ti.linkname = tarfile.LNKTYPE, links[key]
            tf.addfile(ti)
            continue
        ti.pax_headers = _xattr_headers(dfd, name, stat.S_ISLNK(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
            sub = open_dir_at(dfd, name)
            try:
                _tar_dir(tf, sub, rel + b"/", links)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                links[key] = ti.name
            ti.size = st.st_size
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                tf.addfile(ti, f)
        elif stat.S_ISLNK(st.st_mode):
            ti.type, ti.linkname = tarfile.SYMTYPE, os.fsdecode(os.readlink(name, dir_fd=dfd))
            tf.addfile(ti)
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            ti.type = (tarfile.FIFOTYPE if stat.S_ISFIFO(st.st_mode)
                       else tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE)
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            tf.addfile(ti)
        else:
            log.warning("leaving %s out of the layer: a socket", os.fsdecode(rel))


def _whiteout_info(rel: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(os.fsdecode(rel))
    ti.mode, ti.mtime, ti.uname, ti.gname = 0o644, 0, "", ""
    return ti


def _xattr_headers(dfd: int, name: bytes, link: bool) -> dict[str, str]:
    target = os.path.join(fd_path(dfd), os.fsdecode(name))
    try:
        keys = os.listxattr(target, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for key in sorted(keys):
        if is_private_xattr(os.fsencode(key)) or key.startswith("trusted.overlay."):
            continue
        try:
            value = os.getxattr(target, key, follow_symlinks=False)
        except OSError:
            continue
        out[XATTR_PAX + key] = value.decode("utf-8", "surrogateescape")
    return out


# ---------------------------------------------------------------------------------------- commit


def commit(store: Store, base: str, upper: os.PathLike[str] | str, name: str,
           author: str = "unionfs commit") -> str:
    """A new image: *base*'s layers plus *upper* as a new layer, named *name*; its id."""
    with store.lock("store.lock", exclusive=False):   # no prune between the layer and its image
        return _commit(store, base, upper, name, author)


def _commit(store: Store, base: str, upper: os.PathLike[str] | str, name: str, author: str) -> str:
    image = store.image(base)
    with store.tmpdir() as work:
        tar_path = work / "layer.tar"
        with open(tar_path, "wb") as f:
            write_layer_tar(upper, f)
        diff_id = store.add_layer_from_tar(tar_path)
    cfg = json.loads(json.dumps(image.config))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    diff_ids = cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"]
    history = cfg.setdefault("history", [])
    # podman checks that history has one non-empty entry per layer: fill in what the base lacks.
    missing = len(diff_ids) - sum(1 for h in history if not h.get("empty_layer"))
    filler = {"created": cfg.get("created", now), "comment": "no history for this layer"}
    history[:0] = [filler] * max(0, missing)
    diff_ids.append(diff_id)
    history.append({"created": now, "created_by": author})
    cfg["created"] = now
    config = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    return store.add_image(config, [name])


# ---------------------------------------------------------------------------------------- export


def export(store: Store, ref: str, out: os.PathLike[str] | str, fmt: str = "docker-archive") -> None:
    """Write *ref* as an archive `podman load` takes: docker-archive (uncompressed layers) or
    oci-archive (layer blobs as stored).  Written to a temporary name, then renamed."""
    image = store.image(ref)
    config = (store.root / "images" / hexof(image.id) / "config.json").read_bytes()
    names = image.names or ([normalize_name(ref)] if not ref.startswith("sha256:") else [])
    dest = Path(out)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            if fmt == "docker-archive":
                _docker_archive(store, image, config, names, tf)
            elif fmt == "oci-archive":
                _oci_archive(store, image, config, names, tf)
            else:
                raise ImageError(f"unknown format {fmt!r} (docker-archive or oci-archive)")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
    tf.addfile(ti, io.BytesIO(data))


def _docker_archive(store: Store, image: Any, config: bytes, names: list[str], tf: tarfile.TarFile) -> None:
    layers = []
    for diff_id in image.diff_ids:
        name = hexof(diff_id) + ".tar"
        info = store.layer_info(diff_id)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = int(info["size"]), 0o644, 0
        with open(store.root / "layers" / f"{hexof(diff_id)}.blob", "rb") as raw:
            tf.addfile(ti, _Exact(decompressed(io.BufferedReader(raw)), ti.size))
        layers.append(name)
    config_name = hexof(image.id) + ".json"
    _add_bytes(tf, config_name, config)
    _add_bytes(tf, "manifest.json", json.dumps(
        [{"Config": config_name, "RepoTags": names, "Layers": layers}]).encode())


def _oci_archive(store: Store, image: Any, config: bytes, names: list[str], tf: tarfile.TarFile) -> None:
    _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    for diff_id in image.diff_ids:
        info = store.layer_info(diff_id)
        ti = tarfile.TarInfo("blobs/sha256/" + hexof(info["digest"]))
        ti.size, ti.mode, ti.mtime = int(info["blob_size"]), 0o644, 0
        with open(store.root / "layers" / f"{hexof(diff_id)}.blob", "rb") as f:
            tf.addfile(ti, f)
    _add_bytes(tf, "blobs/sha256/" + hexof(image.id), config)
    manifest = (store.root / "images" / hexof(image.id) / "manifest.json").read_bytes()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    _add_bytes(tf, "blobs/sha256/" + hexof(digest), manifest)
    entry: dict[str, Any] = {"mediaType": json.loads(manifest)["mediaType"], "digest": digest,
                             "size": len(manifest)}
    if names:
        entry["annotations"] = {"org.opencontainers.image.ref.name": names[0]}
    _add_bytes(tf, "index.json", json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode())


class _Exact(io.RawIOBase):
    """A stream that must yield exactly *size* bytes (tarfile would pad a short one silently)."""

    def __init__(self, src: Any, size: int) -> None:
        self.src, self.left = src, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.src.read(CHUNK if n < 0 else min(n, CHUNK))
        self.left -= len(data)
        if self.left < 0 or (not data and self.left > 0 and n != 0):
            raise ImageError("a stored layer blob does not match its recorded size")
        return data

