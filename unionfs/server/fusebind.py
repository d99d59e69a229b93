"""pyfuse3, loaded behind unionfs' libfuse shim.

The shim (`unionfs/server/_fuse_shim.c`) adds what pyfuse3 3.5 cannot ask libfuse for: fallocate(2) and
lseek(2) (SEEK_DATA, SEEK_HOLE) handlers, cached directory listings, and new objects' modes without
the umask applied (so that a default ACL can replace it).  It works by being the
``fuse_session_new`` that pyfuse3 binds to, so it must be loaded, into the global symbol scope,
before pyfuse3 is imported: import pyfuse3 in the server from here, never directly first.

pyfuse3 is also imported here without the standard library's importlib.metadata (see
``_version_only``): that import is on the critical path of every ``unionfs run``.

Attributes:
    pyfuse3: the pyfuse3 module.
    shim: the native shim module, or None when it is not built or pyfuse3 was imported first (the
        union then serves without fallocate modes, SEEK_DATA/SEEK_HOLE or kernel-cached listings, and a
        default ACL's permissions are cut by the umask as well).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

log = logging.getLogger(__name__)


_WITHOUT = "no fallocate, no SEEK_DATA/SEEK_HOLE, no cached listings, umask applied by the kernel"


def _load_shim() -> ModuleType | None:
    if "pyfuse3" in sys.modules:
        log.warning("pyfuse3 was imported before unionfs.server.fusebind: %s", _WITHOUT)
        return None
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from unionfs.server import _fuse_shim
    except ImportError as e:
        log.warning("libfuse shim not built (%s): %s", e, _WITHOUT)
        return None
    finally:
        sys.setdlopenflags(flags)
    return _fuse_shim


class _NotFound(ModuleNotFoundError):
    """The stand-in's PackageNotFoundError (the real one is a ModuleNotFoundError too)."""


def _dist_info_version(name: str) -> str:
    """The version of the installed package *name*, read off the ``NAME-VERSION.dist-info``
    directory beside it; _NotFound when there is none (a source tree, an egg).

    Enough for pyfuse3, whose distribution and package have one name; unlike importlib.metadata
    it does not normalise distribution names.
    """
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    locations: list[str] = list(getattr(spec, "submodule_search_locations", None) or [])
    prefix = name + "-"
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


def _real_metadata(attr: str) -> object:
    """Any other attribute of the stand-in: the real importlib.metadata takes its place, and answers.

    Dunder names are not looked up (the import system probes ``__path__`` and the like)."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    if "importlib.metadata" in sys.modules and sys.modules["importlib.metadata"].__dict__.get(
        "__getattr__"
    ) is _real_metadata:
        del sys.modules["importlib.metadata"]
    import importlib.metadata

    return getattr(importlib.metadata, attr)


@contextlib.contextmanager
def _version_only() -> Iterator[None]:
    """While pyfuse3 is imported, a stand-in for importlib.metadata that answers version() itself.

    pyfuse3 3.5 sets its ``__version__`` with ``importlib.metadata.version("pyfuse3")`` as it is
    imported.  Loading importlib.metadata (with the email package it parses METADATA with) and
    searching sys.path for the distribution costs 12-19 ms, a tenth of the FUSE server's start-up,
    for a string unionfs never reads.  trio is imported before, so what loads meanwhile is
    pyfuse3's own modules and the standard library's; should one of them ask the stand-in for
    anything but version(), the real module is loaded and answers.  The stand-in is gone from
    sys.modules afterwards: a later ``import importlib.metadata`` gets the real one.  When the real
    one is loaded already, it is used.
    """
    if "importlib.metadata" in sys.modules:
        yield
        return
    standin = ModuleType("importlib.metadata", "unionfs.server.fusebind's stand-in: version() alone")
    vars(standin).update(PackageNotFoundError=_NotFound, version=_dist_info_version,
                         __getattr__=_real_metadata)
    sys.modules["importlib.metadata"] = standin
    try:
        yield
    finally:
        if sys.modules.get("importlib.metadata") is standin:
            del sys.modules["importlib.metadata"]
        import importlib

        if vars(importlib).get("metadata") is standin:
            del importlib.metadata


shim = _load_shim()

import trio  # noqa: E402, F401 - pyfuse3 imports it: outside the stand-in's window

with _version_only():
    import pyfuse3  # noqa: E402 - must come after the shim

__all__ = ["pyfuse3", "shim"]
