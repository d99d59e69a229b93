"""The ``unionfs`` console script's entry point: ``unionfs run`` forks its FUSE server before the CLI loads.

``unionfs run`` imports its FUSE server (trio, pyfuse3: about 100 ms) in a child that
``launcher.prefork`` forks; the CLI's own imports (click and the command group, about 20 ms) are
of no use to that child.  So the console script comes here first, forks the child, and only then
imports the CLI, which loads side by side with the server on the other core.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def start_server_early(args: Sequence[str]) -> bool:
    """Fork the launcher's server child now when *args* (the command line after ``unionfs``) is a
    ``run`` (a no-op when it has been forked already); whether it is a ``run``."""
    if args[:1] != ["run"]:
        return False
    try:
        from launcher import prefork
    except ModuleNotFoundError as e:
        if e.name in ("launcher", "launcher.prefork"):
            return False  # unionfs without its launcher: `run` will say so
        raise
    prefork.start(args[1:])
    return True


def main() -> None:
    """``unionfs``: the click group in ``unionfs.cli``."""
    run = start_server_early(sys.argv[1:])
    from unionfs.cli import main as cli_main

    if run:
        from launcher import timing

        timing.stamp("imported")  # the CLI is loaded (UNIONFS_RUN_TIMING)
    cli_main()
