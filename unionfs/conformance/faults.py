"""Planted bugs: how the conformance harness proves that it finds what it is meant to find.

The product has no fault switch.  The harness starts a unionfs daemon with a planted bug through
this module instead of the ``unionfs`` command::

    python -m unionfs.conformance.faults FAULT[,FAULT...] mount -f -o ... MNT

which plants each fault into its own process (nothing outside it changes) and then runs unionfs'
own command line with the rest of the arguments.

The seam: a fault replaces a function of the core, in this process only.  ``FAULTS`` says which.

- ``skip-whiteout-on-unlink``: `WhiteoutWriter.write` (``unionfs.core.whiteout``), the one writer of
  the whiteouts that removing a name leaves, removes what it is to replace and writes nothing; a
  deleted lower file then shows again.  (A rename in the overlay dialect leaves its whiteout with
  RENAME_WHITEOUT, in the same call, and keeps it.)
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from unionfs.core import whiteout


def _skip_whiteout_on_unlink() -> None:
    def write(self: whiteout.WhiteoutWriter, dirfd: int, name: bytes, replace: bool) -> None:
        if replace:
            try:
                os.unlink(name, dir_fd=dirfd)
            except IsADirectoryError:
                os.rmdir(name, dir_fd=dirfd)

    whiteout.WhiteoutWriter.write = write  # type: ignore[method-assign]


FAULTS: dict[str, Callable[[], None]] = {
    "skip-whiteout-on-unlink": _skip_whiteout_on_unlink,
}


def parse(spec: str) -> list[str]:
    """The fault names in *spec* (comma-separated); ValueError naming an unknown one."""
    names = [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault {', '.join(unknown)} (known: {', '.join(sorted(FAULTS))})")
    return names


def command(spec: str, args: Sequence[str]) -> list[str]:
    """The command line of ``unionfs ARGS`` with the faults in *spec* planted (no fault: plain)."""
    if not parse(spec):
        exe = os.path.join(os.path.dirname(sys.executable), "unionfs")
        return [exe if os.path.exists(exe) else "unionfs", *args]
    return [sys.executable, "-m", __name__, spec, *args]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m unionfs.conformance.faults FAULTS ARGS...``: ``unionfs ARGS`` with FAULTS planted."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.exit(f"usage: python -m {__name__} FAULT[,FAULT...] UNIONFS-ARGS...")
    try:
        names = parse(args[0])
    except ValueError as e:
        sys.exit(str(e))
    for name in names:
        FAULTS[name]()
    print(f"planted: {', '.join(names)}", file=sys.stderr, flush=True)
    from unionfs.cli import main as cli_main

    cli_main(args[1:])


if __name__ == "__main__":
    main()
