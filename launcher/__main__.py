"""``python -m launcher BRANCHES -- COMMAND``: ``unionfs run`` without the rest of the CLI."""

from __future__ import annotations

from launcher.cli import run_command

if __name__ == "__main__":
    run_command(prog_name="unionfs run")
