"""The import rules of ../shared/DESIGN.md, checked on the source: which part of qcompile may import which,
and no import circle, counting imports inside functions too (a lazy import is still a dependency).

A part is a sub-package of ``qcompile`` (``passes``, ``flow``, ...) or a top-level module (``graph``,
``execution``, ``errors``, ``api``, ``cli``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qcompile"

# What each part may import besides itself: arrows point down the flow and to the leaves.
LEAVES = {"errors", "graph", "execution"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "graph": set(),
    # The runtime needs no compiler: a board installs only what runs an artifact.
    "runtime": {"errors"},
    "execution": {"errors", "runtime"},
    "frontend": LEAVES,
    "calibration": LEAVES,
    "hwmodels": {"errors", "graph"},
    "passes": LEAVES | {"calibration"},
    "search": LEAVES | {"calibration", "hwmodels", "passes"},
    "backends": LEAVES | {"hwmodels", "runtime"},
    "flow": LEAVES | {"calibration", "frontend", "hwmodels", "passes", "search", "backends", "runtime"},
    "api": {"errors", "calibration", "flow", "runtime"},
    "cli": {"errors", "api", "calibration", "frontend", "hwmodels", "flow", "backends", "runtime"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The qcompile modules ``path`` imports anywhere in its body (``from a import b`` counts ``a.b`` when
    ``b`` is a module, else ``a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("qcompile"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qcompile") and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return {name for name in found if name in modules and name != "qcompile"}


def _part(module: str) -> str:
    return module.split(".")[1]


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items() if name != "qcompile"}


def test_every_part_is_known() -> None:
    parts = {_part(name) for name in _graph()}
    assert parts == set(ALLOWED), f"parts without import rules: {parts - set(ALLOWED)}"


def test_parts_import_only_what_the_design_allows() -> None:
    broken = sorted(
        f"{module} imports {imported}"
        for module, imports in _graph().items()
        for imported in imports
        if _part(imported) != _part(module) and _part(imported) not in ALLOWED[_part(module)]
    )
    assert not broken, "imports against ../shared/DESIGN.md's rules:\n" + "\n".join(broken)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (found := visit(child)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_modules() -> None:
    graph = _graph()
    # A package's __init__ importing its own submodules (and they importing its names) is no circle
    # between parts; circles inside one package are still circles between modules.
    without_parents = {
        module: {name for name in imports if not module.startswith(f"{name}.")} for module, imports in graph.items()
    }
    cycle = _cycle(without_parents)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_import_circle_between_parts() -> None:
    parts: dict[str, set[str]] = {}
    for module, imports in _graph().items():
        parts.setdefault(_part(module), set()).update(_part(i) for i in imports if _part(i) != _part(module))
    cycle = _cycle(parts)
    assert cycle is None, "import circle between parts: " + " -> ".join(cycle or [])


def test_the_checks_find_what_they_look_for() -> None:
    """The cycle finder and the rules are not vacuous: a made-up circle and a made-up bad import are seen."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert "passes" not in ALLOWED["hwmodels"] and "flow" not in ALLOWED["passes"]
    assert not set(ALLOWED["runtime"]) - {"errors"}
    assert not any({"api", "cli"} & allowed for part, allowed in ALLOWED.items() if part != "cli")
    graph = _graph()
    assert "qcompile.flow.quantize" in graph["qcompile.flow.compile"]  # the walk sees real imports
    assert any(target.startswith("qcompile.runtime.executors") for target in graph["qcompile.runtime"]), (
        "imports inside functions are counted"
    )


@pytest.mark.parametrize("forbidden", ["passes", "search", "flow", "backends", "hwmodels", "frontend", "calibration"])
def test_runtime_imports_nothing_of_the_compiler(forbidden: str) -> None:
    runtime = [module for module in _graph() if _part(module) == "runtime"]
    assert runtime
    offenders = [m for m in runtime for i in _graph()[m] if _part(i) == forbidden]
    assert not offenders, offenders
