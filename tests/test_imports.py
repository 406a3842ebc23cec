"""The import graph of `seg`: no circle among the modules' top-level imports, and no package importing a higher
one at module level (models <- data <- inference <- explain <- training <- cli). Imports inside functions are the
lazy ones (a command's heavy dependency, or one reached only on request) and are left out, as are `TYPE_CHECKING`
blocks."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import seg

ROOT = Path(seg.__file__).parent
LAYERS = ["models", "data", "inference", "explain", "training", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def top_level_imports(path: Path, known: dict[str, Path], lazy: bool = False) -> set[str]:
    """The `seg` modules `path` imports when it is imported (module body, `if` and `try` blocks at its top); with
    `lazy` also those imported inside its functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    tree = ast.parse(path.read_text())
    visit(list(ast.walk(tree)) if lazy else tree.body)
    return {m for m in found if m in known and m != name}


@functools.lru_cache
def graph(lazy: bool = False) -> dict[str, set[str]]:
    known = modules()
    return {name: top_level_imports(path, known, lazy) for name, path in known.items()}


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    return circles


def test_no_import_circle():
    assert circles(graph()) == []


def test_no_import_circle_through_lazy_imports_either():
    # `onnx_model -> predict.write_atomic -> predictor -> onnx_model` was one, through an import inside a function
    assert circles(graph(lazy=True)) == []


def test_no_package_imports_a_higher_one():
    upward = sorted((name, imported) for name, imports in graph().items() for imported in imports
                    if layer(name) is not None and layer(imported) is not None and layer(imported) > layer(name))
    assert upward == []


def test_the_command_files_are_not_imported_as_libraries():
    # a command module (parse, call, exit code) is imported by seg.cli only, on demand
    commands = {"seg.inference.predict", "seg.inference.export", "seg.explain.command"}
    importers = sorted((name, imported) for name, imports in graph(lazy=True).items() for imported in imports
                       if imported in commands and name != "seg.cli")
    assert importers == []


def test_the_graph_sees_imports():  # the walker itself: a known edge is found, a lazy one is not
    edges = graph()
    assert "seg.inference.outputs" in edges["seg.inference.folder"]
    assert "seg.inference.folder" not in edges["seg.training.cv"]  # imported inside `out_of_fold`
