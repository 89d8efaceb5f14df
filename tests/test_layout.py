"""The package's shape: no import circles (at module level or inside functions), no private name imported from
another package, every subpackage documented. Read from the source with ``ast``, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "distattr"


def module_name(path: Path) -> str:
    parts = ["distattr", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str) -> list[tuple[str, str, int]]:
    """``(target module, imported name or "", line)`` of every import in module ``name`` at any depth, except
    those under ``if TYPE_CHECKING:`` (they never run)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, "", node.lineno) for alias in node.names if alias.name.startswith("distattr"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("distattr"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.append((sub, "", node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in imports(name):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name and not name.startswith(target + "."):
                edges[name].add(target)  # a module's own parents are imported by Python anyway
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each one an import circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def package_of(name: str) -> str:
    """``distattr.jobs.actor`` -> ``distattr.jobs``; a top-level module is its own package."""
    parts = name.split(".")
    return ".".join(parts[:2])


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking_blocks():
    edges = graph()
    assert "distattr.viz.console" in edges["distattr.results"]  # a function-level import (out.show)
    assert "distattr.results" not in edges["distattr.aggregate"]  # only under TYPE_CHECKING
    circle = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(circle) == [["a", "b", "c"]]


def test_no_import_circles():
    circles = strongly_connected(graph())
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_private_name_imported_from_another_package():
    bad = []
    for name in MODULES:
        for target, imported, line in imports(name):
            if imported.startswith("_") and not imported.endswith("__") and package_of(target) != package_of(name):
                bad.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target}.{imported}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", sorted({p.parent for p in ROOT.rglob("*.py")}), ids=lambda p: p.name)
def test_every_module_says_what_it_holds(package: Path):
    for path in sorted(package.glob("*.py")):
        if path.name == "__main__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and doc.strip(), f"{path.relative_to(ROOT.parent)} has no module docstring"


def test_the_old_names_are_gone():
    """``distattr/dist`` (read by tools as build output) and ``distattr/stats`` were split and renamed."""
    assert not (ROOT / "dist").exists() and not (ROOT / "stats").exists()
    assert (ROOT / "jobs").is_dir() and (ROOT / "statistics").is_dir() and (ROOT / "casestudies").is_dir()
