"""``python -m launcher BRANCHES -- COMMAND``: ``unionfs run`` without the rest of the CLI."""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from launcher import prefork

    prefork.start(sys.argv[1:])  # first: the FUSE server's imports overlap all below (launcher.prefork)

    from launcher import timing
    from launcher.cli import run_command

    timing.stamp("imported")

    run_command(prog_name="unionfs run")
