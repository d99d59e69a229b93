"""pyfuse3, loaded behind unionfs' libfuse shim.

The shim (`unionfs/_fuse_shim.c`) adds what pyfuse3 3.5 cannot ask libfuse for: a fallocate(2)
handler, and cached directory listings.  It works by being the ``fuse_session_new`` that pyfuse3
binds to, so it must be loaded, into the global symbol scope, before pyfuse3 is imported: import
pyfuse3 in the server from here, never directly first.

pyfuse3 is also imported here without the standard library's importlib.metadata (see
``_version_only``): that import is on the critical path of every ``unionfs run``.

Attributes:
    pyfuse3: the pyfuse3 module.
    shim: the native shim module, or None when it is not built or pyfuse3 was imported first (the
        union then serves without fallocate modes or kernel-cached listings).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

log = logging.getLogger(__name__)


def _load_shim() -> ModuleType | None:
    if "pyfuse3" in sys.modules:
        log.warning("pyfuse3 was imported before unionfs.fusebind: no fallocate, no cached listings")
        return None
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from . import _fuse_shim
    except ImportError as e:
        log.warning("libfuse shim not built (%s): no fallocate, no cached listings", e)
        return None
    finally:
        sys.setdlopenflags(flags)
    return _fuse_shim


class _NotFound(ModuleNotFoundError):
    """The stand-in's PackageNotFoundError (the real one is a ModuleNotFoundError too)."""


def _dist_info_version(name: str) -> str:
    """The version of the installed distribution *name*, read off its ``NAME-VERSION.dist-info``
    directory beside the package; _NotFound when there is none (a source tree, an egg)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    locations: list[str] = list(getattr(spec, "submodule_search_locations", None) or [])
    prefix = name.replace("-", "_") + "-"
    for location in locations:
        site = os.path.dirname(os.path.abspath(location))
        try:
            entries = os.listdir(site)
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(prefix) and entry.endswith(".dist-info"):
                return entry[len(prefix) : -len(".dist-info")]
    raise _NotFound(name)


@contextlib.contextmanager
def _version_only() -> Iterator[None]:
    """While pyfuse3 is imported, a stand-in for importlib.metadata that answers version() alone.

    pyfuse3 3.5 sets its ``__version__`` with ``importlib.metadata.version("pyfuse3")`` as it is
    imported.  Loading importlib.metadata (with the email package it parses METADATA with) and
    searching sys.path for the distribution costs ~12 ms, a tenth of the FUSE server's start-up,
    for a string unionfs never reads.  Nothing else is imported meanwhile, and the stand-in is
    gone from sys.modules afterwards: a later ``import importlib.metadata`` gets the real one.
    When the real one is loaded already, it is used.
    """
    if "importlib.metadata" in sys.modules:
        yield
        return
    standin = ModuleType("importlib.metadata", "unionfs.fusebind's stand-in: version() alone")
    standin.PackageNotFoundError = _NotFound  # type: ignore[attr-defined]
    standin.version = _dist_info_version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = standin
    try:
        yield
    finally:
        if sys.modules.get("importlib.metadata") is standin:
            del sys.modules["importlib.metadata"]
        import importlib

        if getattr(importlib, "metadata", None) is standin:
            del importlib.metadata


shim = _load_shim()

with _version_only():
    import pyfuse3  # noqa: E402 - must come after the shim

__all__ = ["pyfuse3", "shim"]
