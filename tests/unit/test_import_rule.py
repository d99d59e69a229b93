"""The import rule between the floors (docs/architecture.md): core <- server <- launcher, cli; no two
modules import each other; the core imports neither pyfuse3 nor trio.  Every import counts, also one
inside a function or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]     # tests/unit/this file -> the checkout
FLOORS = {"unionfs.core": 0, "unionfs.server": 1, "launcher": 2, "unionfs.cli": 2, "unionfs.entry": 3}
#: What the core must not import from outside the tree: it knows no FUSE and no trio.
NOT_IN_CORE = ("pyfuse3", "trio")


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _named(path: Path) -> set[str]:
    """Every module an import of *path* names (relative imports left out)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            named.add(node.module)
    return named


def _imports() -> dict[str, set[str]]:
    """Each module of unionfs/ and launcher/ -> the modules of this tree it imports (a package's
    ``__init__`` only when names are taken from it, as ``from pkg import name``, not ``from pkg import
    submodule``)."""
    files = [*sorted((REPO / "unionfs").rglob("*.py")), *sorted((REPO / "launcher").rglob("*.py"))]
    modules = {_module(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                for a in node.names:  # a submodule by name, else the module the names are from
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _floor(module: str) -> int | None:
    for prefix, floor in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            return floor
    return None


def test_no_import_runs_up_a_floor() -> None:
    upward = set()
    for module, imported in _imports().items():
        for other in imported:
            mine, theirs = _floor(module), _floor(other)
            if mine is not None and theirs is not None and theirs > mine:
                upward.add((module, other))
    assert upward == set()


def test_the_core_imports_neither_pyfuse3_nor_trio() -> None:
    found = {}
    for path in sorted((REPO / "unionfs" / "core").rglob("*.py")):
        bad = {m for m in _named(path) if m.split(".")[0] in NOT_IN_CORE}
        if bad:
            found[path.name] = sorted(bad)
    assert found == {}


def test_the_checks_see_an_import_under_type_checking(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio\n"
                      "def f() -> None:\n    from pyfuse3 import FUSEError\n")
    assert _named(sample) == {"typing", "trio", "pyfuse3"}


def test_the_checks_read_the_tree() -> None:
    """Not vacuous: the graph holds the floors' modules and the imports known to exist."""
    graph = _imports()
    assert "unionfs.core.resolve" in graph["unionfs.core.union"]
    assert "unionfs.core.union" in graph["unionfs.server.operations"]
    assert {_floor(m) for m in graph} >= set(FLOORS.values())


def test_no_circles() -> None:
    graph = _imports()
    circles = []
    for start in graph:
        todo, seen = list(graph[start]), set()
        while todo:
            module = todo.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
    assert circles == []
