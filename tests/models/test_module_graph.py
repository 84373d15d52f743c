"""models/ imports one way: its modules form no cycle, and none hides an import of a sibling inside a function.

Read from the source with ``ast`` (nothing is imported): every import of a sibling module counts,
wherever it is written, so a circle broken only by deferring an import to call time still shows.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "models"
PACKAGE_NAME = "resnext_hub.models"


def siblings_named(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The modules of the package that ``node`` imports (relative ``.x`` or absolute ``resnext_hub.models.x``)."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1:
            if node.module is None:  # from . import x
                return {alias.name for alias in node.names} & modules
            return {node.module.split(".")[0]} & modules
        if node.level == 0 and node.module and node.module.startswith(PACKAGE_NAME + "."):
            return {node.module.removeprefix(PACKAGE_NAME + ".").split(".")[0]} & modules
        if node.level == 0 and node.module == PACKAGE_NAME:
            return {alias.name for alias in node.names} & modules
        return set()
    names = {alias.name for alias in node.names if alias.name.startswith(PACKAGE_NAME + ".")}
    return {name.removeprefix(PACKAGE_NAME + ".").split(".")[0] for name in names} & modules


def imports_of(path: Path, modules: set[str]) -> tuple[set[str], list[str]]:
    """(the sibling modules ``path`` imports anywhere, "line N: module" for each one imported inside a def)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    everywhere: set[str] = set()
    deferred: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = siblings_named(child, modules)
                everywhere.update(found)
                if in_function:
                    deferred.extend(f"line {child.lineno}: {name}" for name in sorted(found))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return everywhere - {path.stem}, deferred


def package_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    paths = {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}
    modules = set(paths) - {"__init__"}
    graph, deferred = {}, {}
    for name, path in paths.items():
        graph[name], deferred[name] = imports_of(path, modules)
    return graph, deferred


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def walk(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := walk(target)):
                return cycle
        state[name] = "done"
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (cycle := walk(name)):
            return cycle
    return None


def test_the_probe_sees_the_package():
    graph, _ = package_graph()
    assert {"resnet", "builder", "quantize", "optimize"} <= set(graph)
    assert "resnet" in graph["builder"] and "builder" in graph["__init__"]  # imports are really read


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_models_import_graph_is_acyclic():
    graph, _ = package_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "models/ import cycle: " + " -> ".join(cycle or [])


def test_no_sibling_module_is_imported_inside_a_function():
    _, deferred = package_graph()
    hidden = {f"models/{name}.py": lines for name, lines in deferred.items() if lines}
    # Function-level imports stay only for optional third-party packages (openvino, nncf, torchao, safetensors).
    assert not hidden, f"function-level imports of sibling modules (a hidden cycle): {hidden}"
