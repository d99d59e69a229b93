"""pyfuse3, loaded behind unionfs' libfuse shim.

The shim (`unionfs/_fuse_shim.c`) adds what pyfuse3 3.5 cannot ask libfuse for: a fallocate(2)
handler, and cached directory listings.  It works by being the ``fuse_session_new`` that pyfuse3
binds to, so it must be loaded, into the global symbol scope, before pyfuse3 is imported: import
pyfuse3 in the server from here, never directly first.

Attributes:
    pyfuse3: the pyfuse3 module.
    shim: the native shim module, or None when it is not built or pyfuse3 was imported first (the
        union then serves without fallocate modes or kernel-cached listings).
"""
from __future__ import annotations

import logging
import os
import sys
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


shim = _load_shim()

import pyfuse3  # noqa: E402 - must come after the shim

__all__ = ["pyfuse3", "shim"]
