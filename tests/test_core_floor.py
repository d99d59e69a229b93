"""The core is the ground floor: nothing under unionfs/core imports the server, the launcher, pyfuse3
or trio (not even for type checking), so the union can be used, and tested, without FUSE."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "unionfs" / "core"
ABOVE = ("pyfuse3", "trio", "unionfs.server", "unionfs.images", "unionfs.cli", "launcher")


def imports_from_above(source: str) -> list[str]:
    """The modules named by *source*'s imports (anywhere in it) that belong to a floor above the core."""
    named = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            named += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            named.append(node.module)
    return [m for m in named if any(m == a or m.startswith(a + ".") for a in ABOVE)]


def test_the_check_sees_every_kind_of_import() -> None:
    sample = ("from typing import TYPE_CHECKING\n"
              "import os\n"
              "if TYPE_CHECKING:\n    import trio\n"
              "from unionfs.server.offload import Offload\n"
              "def f():\n    import pyfuse3\n"
              "from .nodes import Node\n")
    assert sorted(imports_from_above(sample)) == ["pyfuse3", "trio", "unionfs.server.offload"]


def test_the_core_imports_nothing_from_above() -> None:
    found = {p.name: imports_from_above(p.read_text()) for p in sorted(CORE.glob("*.py"))}
    assert {name: mods for name, mods in found.items() if mods} == {}
