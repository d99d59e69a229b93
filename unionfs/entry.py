"""The console scripts' entry point: ``unionfs run`` forks its FUSE server before the CLI loads.

``unionfs run`` imports its FUSE server (trio, pyfuse3: about 100 ms) in a child that
``launcher.prefork`` forks; the CLI's own imports (click and the command group, about 20 ms) are
of no use to that child.  So the console script comes here first, forks the child, and only then
imports the CLI, which loads side by side with the server on the other core.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def start_server_early(args: Sequence[str]) -> None:
    """Fork the launcher's server child now when *args* (the command line after ``unionfs``) is a
    ``run``; a no-op otherwise, or when it has been forked already."""
    if args[:1] != ["run"]:
        return
    try:
        from launcher import prefork
    except ImportError:  # unionfs without its launcher: `run` will say so
        return
    prefork.start(args[1:])


def main() -> None:
    """``unionfs``: the click group in ``unionfs.cli``."""
    start_server_early(sys.argv[1:])
    from unionfs.cli import main as cli_main

    cli_main()
