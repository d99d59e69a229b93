"""Helpers for the tests, by topic: `mounts_util` (programs, the mount table, our daemons),
`layers_util` (layer specs in every whiteout dialect, tree snapshots), `pair_util` (kernel overlayfs
and the implementation under test side by side, errno capture); here, renameat2.  Tests
import them all through this module (``import util``; ``from util import Pair``).
"""

from __future__ import annotations

import os

from layers_util import (  # noqa: F401 - re-exported
    DIALECTS,
    FIXED_MTIME,
    OPAQUE_XATTRS,
    PRIVATE_XATTR_PREFIXES,
    WH_OPQ,
    WH_PREFIX,
    D,
    Entry,
    F,
    H,
    L,
    N,
    W,
    describe,
    file_sha256,
    fix_times,
    layer_digest,
    layer_state,
    normalise_upper,
    render_layer,
    snapshot,
    walk,
    xattrs,
)
from mounts_util import (  # noqa: F401 - re-exported
    BIN_DIR,
    IMPL,
    MOUNT_TIMEOUT,
    abort_fuse_under,
    find_daemons,
    fuse_problem,
    is_mounted,
    kill_daemons,
    mount_fstype,
    mounts,
    overlay_problem,
    program,
    requests_served,
    umount,
    wait_daemons_gone,
    wait_for_mount,
)
from pair_util import (  # noqa: F401 - re-exported
    KERNEL_OPTS,
    Mounted,
    Pair,
    Side,
    assert_trees_equal,
    call,
    err,
    mount_impl,
    mount_kernel,
    run_tool,
    unionfs_cmd,
    unmount,
)

from unionfs.core import sysx

# --------------------------------------------------------------------------------------------------
# renameat2 (the core's, on paths)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
AT_FDCWD = -100


def renameat2(old: os.PathLike[str] | str | bytes, new: os.PathLike[str] | str | bytes, flags: int) -> None:
    sysx.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
