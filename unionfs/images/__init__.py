"""Images for unionfs: a store of unpacked layers shared by images, import of docker/OCI archives,
`docker diff` from the container layer alone, commit and export."""
from __future__ import annotations

from .changes import Change, commit, container_diff, export, write_layer_tar
from .store import Image, Store, default_store, normalize_name
from .unpack import ImageError

__all__ = ["Change", "Image", "ImageError", "Store", "commit", "container_diff", "default_store", "export",
           "normalize_name", "write_layer_tar"]
