"""The image store: layers unpacked once (keyed by diff_id) and shared, images, names.

Layout below the store's root::

    layers/<diff_id hex>/        the layer's tree, exactly as in its tar (OCI whiteouts kept)
    layers/<diff_id hex>.json    {"diff_id", "size", "digest", "media_type"} of the stored blob
    layers/<diff_id hex>.blob    the layer blob as imported (for export)
    images/<config hex>/         config.json and manifest.json (OCI) of one image
    names.json                   {"localhost/name:tag": "sha256:<config hex>"}, replaced atomically
    tmp/                         work in progress; an entry nobody holds locked is a crash's leftover
    locks/                       store.lock (shared by imports and commits, exclusive for rm and prune),
                                 names.lock, and one <diff_id hex>.lock per layer being made

Imports are atomic: every new layer is unpacked and verified in tmp/ first, and only when all of
them are good do they (and then the image, and then its names) get renamed into place.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionfs.core.branches import DIR_FLAGS

from .sources import DIGEST_RE, LayerRef, SourceImage, blob_name, open_source
from .unpack import GZIP_MAGIC, ZSTD_MAGIC, ImageError, remove_tree, unpack_stream

log = logging.getLogger(__name__)

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
Progress = Callable[[int], None]


def default_store() -> Path:
    """/var/lib/unionfs for root; $XDG_DATA_HOME/unionfs (or ~/.local/share/unionfs) otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/unionfs")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "unionfs"


def initial_user_namespace() -> bool:
    """Whether this process is in the host's user namespace (its uid map is the identity)."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def normalize_name(name: str) -> str:
    """What podman would call *name*: ``busybox`` is ``localhost/busybox:latest``."""
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        name += ":latest"
    if "/" not in name:
        name = "localhost/" + name
    return name


def hexof(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass
class Image:
    """An image in the store: its id, config and layers (bottom first, as in the config)."""

    id: str
    config: dict[str, Any]
    manifest: dict[str, Any]
    names: list[str]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config["rootfs"]["diff_ids"])


class Store:
    def __init__(self, root: os.PathLike[str] | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_store()
        # Root of a user namespace (rootless, the subordinate ids mapped) keeps the image's owners, as
        # root does; only root of the initial namespace may make device nodes.
        self.keep_owners = os.geteuid() == 0
        self.privileged = self.keep_owners and initial_user_namespace()

    # ------------------------------------------------------------------ layout and locks

    def ensure(self) -> None:
        for d in ("layers", "images", "tmp", "locks", "partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextmanager
    def lock(self, name: str, exclusive: bool) -> Iterator[None]:
        self.ensure()
        fd = os.open(self.root / "locks" / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def tmpdir(self) -> Iterator[Path]:
        """A fresh directory in tmp/, locked while in use, removed afterwards."""
        self.ensure()
        with self.lock("tmp.lock", exclusive=True):   # so no clean_tmp() sees it before it is locked
            path = Path(tempfile.mkdtemp(prefix="work-", dir=self.root / "tmp"))
            fd = os.open(path, DIR_FLAGS)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            try:
                self._remove(self.root / "tmp", path.name)
            finally:
                os.close(fd)

    def _remove(self, parent: Path, name: str) -> None:
        pfd = os.open(parent, DIR_FLAGS)
        try:
            remove_tree(pfd, name)
        finally:
            os.close(pfd)

    def clean_tmp(self) -> list[str]:
        """Remove what crashed imports left in tmp/ (entries nobody holds locked)."""
        removed: list[str] = []
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return removed
        with self.lock("tmp.lock", exclusive=True):
            for entry in sorted(os.listdir(tmp)):
                if self._remove_unlocked(tmp, entry):
                    removed.append(entry)
        return removed

    def _remove_unlocked(self, tmp: Path, entry: str) -> bool:
        """Remove tmp/*entry* unless a live process holds it locked."""
        try:
            fd = os.open(tmp / entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = -1      # a symlink or a file: nobody's lock
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False      # another import at work
            self._remove(tmp, entry)
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def partial_dir(self) -> Path:
        """Where pulls keep blobs being downloaded, so that a pull run again resumes them."""
        self.ensure()
        return self.root / "partial"

    def clean_partial(self) -> list[str]:
        """Forget the downloads interrupted pulls left (called with the store locked exclusively)."""
        d = self.root / "partial"
        gone = sorted(os.listdir(d)) if d.is_dir() else []
        for name in gone:
            self._remove(d, name)
        return gone

    # ------------------------------------------------------------------ names

    def names(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / "names.json").read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def _update_names(self, change: Callable[[dict[str, str]], None]) -> None:
        with self.lock("names.lock", exclusive=True):
            names = self.names()
            change(names)
            write_atomic(self.root / "names.json", json.dumps(names, indent=1, sort_keys=True).encode())

    def resolve(self, ref: str) -> str:
        """The image id that *ref* (a name, a full id or an unambiguous id prefix) names."""
        names = self.names()
        for cand in (ref, normalize_name(ref)):
            if cand in names:
                return names[cand]
        hexpart = ref.removeprefix("sha256:")
        if len(hexpart) >= 3 and all(c in "0123456789abcdef" for c in hexpart):
            ids = [i for i in self.image_ids() if hexof(i).startswith(hexpart)]
            if len(ids) == 1:
                return ids[0]
            if len(ids) > 1:
                raise ImageError(f"{ref}: ambiguous image id prefix")
        raise ImageError(f"{ref}: no such image in {self.root}")

    # ------------------------------------------------------------------ reading

    def image_ids(self) -> list[str]:
        d = self.root / "images"
        return sorted("sha256:" + n for n in os.listdir(d)) if d.is_dir() else []

    def image(self, ref: str) -> Image:
        image_id = self.resolve(ref)
        d = self.root / "images" / hexof(image_id)
        try:
            config = json.loads((d / "config.json").read_bytes())
            manifest = json.loads((d / "manifest.json").read_bytes())
        except FileNotFoundError:
            raise ImageError(f"{ref}: image {image_id} is named but missing from the store") from None
        names = sorted(n for n, i in self.names().items() if i == image_id)
        return Image(image_id, config, manifest, names)

    def images(self) -> list[Image]:
        return [self.image(i) for i in self.image_ids()]

    def layer_dir(self, diff_id: str) -> Path:
        return self.root / "layers" / hexof(diff_id)

    def layer_info(self, diff_id: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.root / "layers" / f"{hexof(diff_id)}.json").read_text())
        return info

    def layer_dirs(self, ref: str) -> list[Path]:
        """The image's layer trees, top first: the read-only branches of a union (what `run` mounts)."""
        return [self.layer_dir(d) for d in reversed(self.image(ref).diff_ids)]

    def has_layer(self, diff_id: str) -> bool:
        return self.layer_dir(diff_id).is_dir() and (self.root / "layers" / f"{hexof(diff_id)}.blob").exists()

    # ------------------------------------------------------------------ import

    def import_archive(self, path: str, name: str | None = None, progress: Progress | None = None,
                       on_total: Callable[[int], None] | None = None) -> list[tuple[str, list[str]]]:
        """Import the images of the archive or OCI layout at *path*; [(image id, names)].

        Without *name*, every image in it, named as in it.  With *name*, the image the archive calls
        *name*; when no image is called so and the archive holds exactly one, that one, named *name*.
        """
        src, found = open_source(path)
        try:
            chosen = self._choose(found, name, path)
            layers: dict[str, LayerRef] = {}
            for img in chosen:
                for ref in img.layers:
                    layers.setdefault(ref.diff_id, ref)

            def make(todo: list[str], work: Path) -> None:
                if on_total is not None:
                    on_total(sum(layers[d].size or src_size(src, layers[d].blob) for d in todo))
                for d in todo:
                    self._unpack_layer(src, layers[d], work, progress)

            self.add_images(list(layers), make, [(img.image_id, img.config, img.names) for img in chosen])
            return [(img.image_id, img.names) for img in chosen]
        finally:
            src.close()

    def add_images(self, diff_ids: list[str], make: Callable[[list[str], Path], None],
                   images: list[tuple[str, bytes, list[str]]]) -> list[str]:
        """The one way images come into the store (import, pull): under the store's shared lock and
        the locks of *diff_ids* (taken in sorted order: no deadlock), ``make(todo, work)`` must leave
        each layer of *todo* (those not stored yet) verified in *work* as _unpack_layer does; then the
        layers, the images (id, config, names) and their names are moved into place.  Whatever
        *make* raises leaves the store as it was.  Returns the layers that were made."""
        with self.lock("store.lock", exclusive=False):
            self.clean_tmp()
            with ExitStack() as stack:
                for diff_id in sorted(set(diff_ids)):
                    stack.enter_context(self.lock(hexof(diff_id) + ".lock", exclusive=True))
                todo = [d for d in dict.fromkeys(diff_ids) if not self.has_layer(d)]
                work = stack.enter_context(self.tmpdir())
                make(todo, work)
                for diff_id in todo:
                    self._install_layer(work, diff_id)
                for image_id, config, _names in images:
                    self._install_image(work, image_id, config, manifest_for(self, config))
        self._update_names(lambda names: names.update(
            {n: image_id for image_id, _config, img_names in images for n in img_names}))
        return todo

    def _choose(self, found: list[SourceImage], name: str | None, path: str) -> list[SourceImage]:
        for img in found:
            img.names = [normalize_name(n) for n in img.names]
        if name is None:
            return found
        want = normalize_name(name)
        chosen = [img for img in found if want in img.names]
        if not chosen and len(found) == 1:
            chosen = found
        if not chosen:
            have = ", ".join(n for img in found for n in img.names) or "none"
            raise ImageError(f"{path}: no image called {name} in it (it has: {have})")
        for img in chosen:
            img.names = [want]
        return chosen[:1]

    def _unpack_layer(self, src: Any, ref: Any, work: Path, progress: Progress | None) -> str:
        """Unpack one layer blob into work/<hex>/ and keep the blob as work/<hex>.blob (unless the blob
        is that file already, as a pull leaves it), verifying the blob's digest and size and the
        diff_id; returns the diff_id."""
        h = hexof(ref.diff_id)
        os.mkdir(work / h, 0o755)
        root_fd = os.open(work / h, DIR_FLAGS)
        try:
            kept = work / f"{h}.blob"
            with src.open(ref.blob) as raw, ExitStack() as stack:
                tee = None if os.path.exists(kept) else stack.enter_context(open(kept, "xb"))
                digest, unpacked = unpack_stream(raw, root_fd, privileged=self.keep_owners,
                                                 devices=self.privileged,
                                                 what=f"layer {ref.diff_id[:19]}", progress=progress, tee=tee)
            size = os.path.getsize(kept)
        finally:
            os.close(root_fd)
        if ref.digest is not None and digest != ref.digest:
            raise ImageError(f"{ref.blob}: digest mismatch: expected {ref.digest}, got {digest}")
        if ref.size is not None and size != ref.size:
            raise ImageError(f"{ref.blob}: {size} bytes where {ref.size} were announced")
        if unpacked.diff_id != ref.diff_id:
            raise ImageError(f"{ref.blob}: diff_id mismatch: the config says {ref.diff_id}, "
                             f"the layer is {unpacked.diff_id}")
        info = {"diff_id": ref.diff_id, "size": unpacked.size, "digest": digest, "blob_size": size,
                "media_type": media_type_of(work / f"{h}.blob")}
        (work / f"{h}.json").write_text(json.dumps(info, sort_keys=True))
        return str(ref.diff_id)

    def _install_layer(self, work: Path, diff_id: str) -> None:
        h = hexof(diff_id)
        layers = self.root / "layers"
        os.replace(work / f"{h}.json", layers / f"{h}.json")
        os.replace(work / f"{h}.blob", layers / f"{h}.blob")
        # Last: a tree in place means the layer is complete.  Moving a directory to another parent
        # needs write permission on it (its ".." changes): a rootless user lends it for the move.
        mode = stat.S_IMODE(os.lstat(work / h).st_mode)
        if not self.privileged:
            os.chmod(work / h, mode | stat.S_IWUSR)
        os.rename(work / h, layers / h)
        if not self.privileged:
            os.chmod(layers / h, mode)

    def _install_image(self, work: Path, image_id: str, config: bytes, manifest: bytes) -> None:
        final = self.root / "images" / hexof(image_id)
        if final.is_dir():
            return
        d = work / ("image-" + hexof(image_id))
        d.mkdir()
        (d / "config.json").write_bytes(config)
        (d / "manifest.json").write_bytes(manifest)
        os.rename(d, final)

    def add_image(self, config: bytes, names: list[str]) -> str:
        """Record an image whose layers are all in the store already; its id."""
        import hashlib

        image_id = "sha256:" + hashlib.sha256(config).hexdigest()

        def make(todo: list[str], work: Path) -> None:
            if todo:
                raise ImageError(f"layer {todo[0]} is missing from the store")

        norm = [normalize_name(n) for n in names]
        self.add_images(list(json.loads(config)["rootfs"]["diff_ids"]), make, [(image_id, config, norm)])
        return image_id

    def manifest_bytes(self, image_id: str) -> bytes:
        return (self.root / "images" / hexof(image_id) / "manifest.json").read_bytes()

    def note_source(self, diff_id: str, where: str) -> None:
        """Remember that registry repository *where* (host/repo) holds the layer's blob: a push to
        another repository of that registry can then mount it instead of uploading it."""
        with self.lock(hexof(diff_id) + ".lock", exclusive=True):
            info = self.layer_info(diff_id)
            sources = list(info.get("sources", []))
            if where in sources:
                return
            info["sources"] = (sources + [where])[-8:]
            write_atomic(self.root / "layers" / f"{hexof(diff_id)}.json",
                         json.dumps(info, sort_keys=True).encode())

    def add_layer_from_tar(self, tar_path: Path, progress: Progress | None = None) -> str:
        """Store an uncompressed layer tar (a commit's new layer); its diff_id."""
        import hashlib

        sha = hashlib.sha256()
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        diff_id = "sha256:" + sha.hexdigest()
        ref = LayerRef(str(tar_path), diff_id, os.path.getsize(tar_path), diff_id, LAYER_TAR)
        with self.lock("store.lock", exclusive=False), self.lock(hexof(diff_id) + ".lock", exclusive=True):
            if self.has_layer(diff_id):
                return diff_id
            with self.tmpdir() as work:
                self._unpack_layer(FileSource(), ref, work, progress)
                self._install_layer(work, diff_id)
        return diff_id

    # ------------------------------------------------------------------ removal

    def remove(self, ref: str) -> tuple[str, list[str]]:
        """Untag *ref* if it is a name of an image that has other names; else remove the image and
        the layers no other image uses.  Returns (image id, removed layer diff_ids)."""
        with self.lock("store.lock", exclusive=True):
            image_id = self.resolve(ref)
            names = self.names()
            mine = [n for n, i in names.items() if i == image_id]
            by_name = next((c for c in (ref, normalize_name(ref)) if c in names), None)
            if by_name is not None and len(mine) > 1:
                self._update_names(lambda n: _drop(n, [by_name]))
                return image_id, []
            user = self._containers_using().get(image_id)
            if user is not None:
                raise ImageError(f"{ref}: image is in use by container {user} (remove it first: "
                                 f"unionfs rm {user})")
            self._update_names(lambda n: _drop(n, mine))
            self._remove(self.root / "images", hexof(image_id))
            return image_id, self._remove_unused_layers()

    def _containers_using(self) -> dict[str, str]:
        """Image id -> the name of a container made from it (such an image is never removed).

        Read from the records `containers.Containers` writes (``containers/ID/container.json``):
        the store knows containers only as users of its images."""
        found: dict[str, str] = {}
        root = self.root / "containers"
        for entry in sorted(os.listdir(root)) if root.is_dir() else []:
            try:
                doc = json.loads((root / entry / "container.json").read_bytes())
            except (OSError, ValueError):
                continue    # being made or removed
            found.setdefault(doc["Image"], doc["Name"])
        return found

    def _used_layers(self) -> set[str]:
        used: set[str] = set()
        for image_id in self.image_ids():
            try:
                cfg = json.loads((self.root / "images" / hexof(image_id) / "config.json").read_bytes())
                used.update(cfg["rootfs"]["diff_ids"])
            except (OSError, ValueError, KeyError):
                log.warning("image %s is damaged; keeping every layer", image_id)
                return {d for d in self._layer_ids()}
        return used

    def _layer_ids(self) -> list[str]:
        d = self.root / "layers"
        if not d.is_dir():
            return []
        return sorted({"sha256:" + n.split(".")[0] for n in os.listdir(d)
                       if DIGEST_RE.match("sha256:" + n.split(".")[0])})

    def _remove_unused_layers(self) -> list[str]:
        used = self._used_layers()
        gone = []
        for diff_id in self._layer_ids():
            if diff_id in used:
                continue
            h = hexof(diff_id)
            self._remove(self.root / "layers", h)      # the tree first: no tree = no layer
            for ext in (".blob", ".json"):
                self._remove(self.root / "layers", h + ext)
            gone.append(diff_id)
        return gone

    def prune(self) -> tuple[list[str], list[str], list[str]]:
        """Remove tmp leftovers, unnamed images and unused layers: (tmp entries, images, layers)."""
        with self.lock("store.lock", exclusive=True):
            tmp = self.clean_tmp() + self.clean_partial()
            named = set(self.names().values()) | set(self._containers_using())
            dangling = [i for i in self.image_ids() if i not in named]
            for image_id in dangling:
                self._remove(self.root / "images", hexof(image_id))
            layers = self._remove_unused_layers()
            for name in os.listdir(self.root / "locks"):
                h = name.removesuffix(".lock")
                gone = not self.layer_dir("sha256:" + h).exists()
                if h != name and DIGEST_RE.match("sha256:" + h) and gone:
                    os.unlink(self.root / "locks" / name)   # nobody waits on it: the store lock is ours
            return tmp, dangling, layers


def _drop(names: dict[str, str], gone: list[str]) -> None:
    for n in gone:
        names.pop(n, None)


class FileSource:
    """Blobs that are files, opened by path."""

    @contextmanager
    def open(self, name: str) -> Iterator[Any]:
        with open(name, "rb") as f:
            yield f


def src_size(src: Any, name: str) -> int:
    m = getattr(src, "members", {}).get(name)
    if m is not None:
        return int(m.size)
    try:
        return os.path.getsize(os.path.join(src.path, name))
    except (OSError, AttributeError):
        return 0


def manifest_for(store: Store, config: bytes) -> bytes:
    """The OCI manifest of an image whose layers are in the store (or in the work dir being installed)."""
    import hashlib

    layers = []
    for diff_id in json.loads(config)["rootfs"]["diff_ids"]:
        info = store.layer_info(diff_id)
        layers.append({"mediaType": info["media_type"], "digest": info["digest"], "size": info["blob_size"]})
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
           "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                      "size": len(config)},
           "layers": layers}
    return json.dumps(doc, sort_keys=True).encode()


def media_type_of(blob: Path) -> str:
    """The OCI media type of a stored layer blob, from its first bytes."""
    with open(blob, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC):
        return LAYER_TAR + "+gzip"
    if head.startswith(ZSTD_MAGIC):
        return LAYER_TAR + "+zstd"
    return LAYER_TAR


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["Store", "Image", "ImageError", "default_store", "normalize_name", "blob_name"]
