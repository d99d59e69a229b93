"""The differential conformance oracle: unionfs against kernel overlayfs, side by side.

``unionfs conformance`` (:data:`conformance_command`) builds random lower layers, mounts two
implementations on identical copies, applies the same random operations to both, compares errno,
visible tree and upper layer after each step, and shrinks the first difference to a runnable script.
The pieces are usable on their own: :func:`run_sequence`, :func:`shrink`, :class:`Runner`, and
:func:`repro_main` for hand-written cases.
"""

from __future__ import annotations

import logging

from .cli import conformance_command
from .impls import FuseOverlayfs, Impl, KernelOverlay, MountError, Unionfs, make_impl
from .layers import LayerEntry, LayerSpec, random_layers
from .machine import Case, Failure, Runner, ScriptCase, Trace, run_sequence, shrink
from .ops import Chooser, Op, Outcome, Session, execute
from .report import repro_main, script
from .snapshot import KNOWN_DIFFERENCES, Snapshot, diff, upper_tree, visible_tree

log = logging.getLogger(__name__)

__all__ = [
    "KNOWN_DIFFERENCES", "Case", "Chooser", "Failure", "FuseOverlayfs", "Impl", "KernelOverlay",
    "LayerEntry", "LayerSpec", "MountError", "Op", "Outcome", "Runner", "ScriptCase", "Session",
    "Snapshot", "Trace", "Unionfs", "conformance_command", "diff", "execute", "make_impl",
    "random_layers", "repro_main", "run_sequence", "script", "shrink", "upper_tree", "visible_tree",
]
