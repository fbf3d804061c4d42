"""The package's modules import each other without cycles, counting imports inside functions too (a cycle
hidden in a function still ties the modules together and breaks when someone moves the import up)."""

from __future__ import annotations

import ast
from pathlib import Path

import qradaptor

PACKAGE = Path(qradaptor.__file__).parent


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules it imports (anywhere in its body)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "qradaptor.train" in graph and "qradaptor.evaluate" in graph["qradaptor.train"]  # the graph is real
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("def g():\n    from .a import f\n")
    (pkg / "d.py").write_text("from .a import f\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_cli_calls_only_the_command_layer_and_no_stage_imports_it():
    graph = import_graph()
    layer = {m for m in graph if m == "qradaptor.commands" or m.startswith("qradaptor.commands.")}
    assert "qradaptor.commands" in graph["qradaptor.cli"]
    # besides the commands: the errors it prints, the table of training settings its flags are made from, and the
    # process's share of the cores (--threads), which the CLI sets for every command before the command runs
    assert graph["qradaptor.cli"] - layer == {"qradaptor.errors", "qradaptor.rundir", "qradaptor.threads"}
    assert {"qradaptor.commands.train", "qradaptor.commands.run", "qradaptor.commands.demo"} <= layer
    # the package's __init__ re-exports the commands; every other module is a stage or a helper below them
    importers = {m: sorted(graph[m] & layer) for m in graph if m not in layer | {"qradaptor", "qradaptor.cli"}}
    assert {m: deps for m, deps in importers.items() if deps} == {}
