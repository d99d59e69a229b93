"""``python -m unionfs.conformance``: the same as ``unionfs conformance``."""

from __future__ import annotations

from .cli import conformance_command

if __name__ == "__main__":
    conformance_command(prog_name="unionfs conformance")
