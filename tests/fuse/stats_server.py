"""A unionfs server that answers its live statistics on standard input, in place of the mount's
control channel: each line read is answered with one line of JSON, `Operations.stats_snapshot()`,
taken on the server's own trio loop between requests (as the channel will take it).

    python stats_server.py UPPER LOWER WORK MOUNTPOINT

Serves the overlay-style union of UPPER over LOWER as `unionfs mount` does (the same `Operations`,
the libfuse shim, the kernel's caches on), logging warnings to stderr.  Runs until unmounted or
until its standard input closes (it then unmounts).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from unionfs.server.operations import Operations  # isort: skip - loads the libfuse shim before pyfuse3
import trio

from unionfs.core.branches import open_stack
from unionfs.core.whiteout import Dialect
from unionfs.server.compat import pyfuse3


async def answer_stats(ops: Operations) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    pending = b""
    while data := await stdin.receive_some():
        pending += data
        while b"\n" in pending:
            _, pending = pending.split(b"\n", 1)
            line = (json.dumps(ops.stats_snapshot()) + "\n").encode()
            while line:
                line = line[os.write(1, line):]
    pyfuse3.terminate()


async def serve(ops: Operations) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_stats, ops)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    upper, lower, work, mnt = sys.argv[1:5]
    stack = open_stack([(upper, True), (lower, False)], work, aufs_work=False)
    ops = Operations.over(stack, Dialect.OVERLAY, timeout=1.0)
    ops.use_shim()
    pyfuse3.init(ops, mnt, {"fsname=unionfs-stats", "subtype=unionfs", "default_permissions", "allow_other"})
    try:
        trio.run(serve, ops)
    finally:
        pyfuse3.close(unmount=True)
        ops.union.close()
        stack.close()


if __name__ == "__main__":
    main()
