"""The shape of the code, enforced: llamahost is pure and free of import cycles, and the
compliance checks learn host paths and expected values from llamahost alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "llamahost"


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (a late import inside a function is
    still an import: late imports are how cycles used to be hidden)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in _imports(path):
            if imported not in modules:
                continue
            edges.add(imported)
            # Importing a.b.c runs a/__init__ and a/b/__init__ first; a package's own
            # modules importing each other do not re-run it.
            parts = imported.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and not name.startswith(parent + "."):
                    edges.add(parent)
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycles.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_llamahost() -> None:
    graph = _graph()
    assert graph.get("llamahost.spec")
    assert _cycles(graph) == []


def test_the_vocabulary_imports_nothing_from_the_package() -> None:
    for module in ("checks", "layout"):
        assert not {i for i in _imports(PACKAGE / f"{module}.py") if i.startswith("llamahost")}


def test_llamahost_never_imports_pyinfra_or_tasks() -> None:
    for path in PACKAGE.rglob("*.py"):
        bad = {i for i in _imports(path) if i.split(".")[0] in ("pyinfra", "tasks")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_compliance_imports_neither_tasks_nor_pyinfra() -> None:
    """Statically, and by importing every compliance module in a fresh interpreter."""
    compliance = sorted((REPO / "tests" / "compliance").glob("*.py"))
    for path in compliance:
        bad = {i for i in _imports(path) if i.split(".")[0] in ("pyinfra", "tasks")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
    names = [_module(p) for p in compliance]
    probe = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyinfra', 'tasks'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
