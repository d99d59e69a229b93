"""The console scripts' entry points: ``unionfs run`` forks its FUSE server before the CLI loads, and
``unionfs mount`` and ``unionfs-overlay`` try a resident server before it (`unionfs.server.fastmount`).

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


def fast_mount(args: list[str]) -> int | None:
    """``unionfs mount ...`` (or mount.fuse3's ``unionfs SRC MNT -o OPTS``) through a resident
    server, without loading the CLI: its exit status, or None when the CLI must do it."""
    if args[:1] != ["mount"] and not (len(args) == 4 and args[2] == "-o"):
        return None
    from unionfs.server import fastmount

    parsed = fastmount.command("unionfs", args)
    return None if parsed is None else fastmount.try_mount("unionfs", *parsed)


def fast_umount(args: list[str]) -> int | None:
    """``unionfs umount MNT`` without loading the CLI: its exit status, or None when the CLI must do
    it (options, help, other arguments).  Errors read as the CLI's do."""
    if len(args) != 2 or args[0] != "umount" or args[1].startswith("-"):
        return None
    from unionfs.core.errors import QuietError
    from unionfs.server.unmount import umount

    try:
        umount(args[1])
    except QuietError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """``unionfs``: the click group in ``unionfs.cli``."""
    code = fast_mount(sys.argv[1:])
    if code is None:
        code = fast_umount(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    run = start_server_early(sys.argv[1:])
    from unionfs.cli import main as cli_main

    if run:
        from launcher import timing

        timing.stamp("imported")  # the CLI is loaded (UNIONFS_RUN_TIMING)
    cli_main()


def overlay_main() -> None:
    """``unionfs-overlay``: through a resident server when it can, else ``unionfs.cli.overlay_main``."""
    from unionfs.server import fastmount

    parsed = fastmount.command("unionfs-overlay", sys.argv[1:])
    if parsed is not None:
        code = fastmount.try_mount("unionfs-overlay", *parsed)
        if code is not None:
            sys.exit(code)
    from unionfs.cli import overlay_main as cli_overlay_main

    cli_overlay_main()
