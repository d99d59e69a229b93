"""The import rule between the floors (docs/architecture.md): core <- server <- launcher, cli; and no
two modules outside the core import each other.  Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOORS = {"unionfs.core": 0, "unionfs.server": 1, "launcher": 2, "unionfs.cli": 2, "unionfs.entry": 3}
# Upward imports that the regroup of the core is still taking out; nothing may be added here.
PENDING = {("unionfs.core.union", "unionfs.server.offload")}


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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
    assert upward - PENDING == set()


def test_no_circles_outside_the_core() -> None:
    graph = {m: {o for o in imported if not o.startswith("unionfs.core")}
             for m, imported in _imports().items() if not m.startswith("unionfs.core")}
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
