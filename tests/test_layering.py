"""The import graph of `paratron/`: no cycles, and `model/` never imports upward.

A cycle makes the import order matter and hides which module owns what; `model/`
importing training, checkpoints, conversion, the command line or the config parser would
tie the model to the run around it. The graph is read with `ast`, so every import counts,
at module level or inside a function, whether or not it ever runs. `PARATRON_SOURCE`
points the test at another checkout's `paratron/` folder.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

# What model/ may not import: the layers above it (see DESIGN.md, "Layers").
ABOVE_MODEL = ("paratron.training", "paratron.checkpoint", "paratron.convert", "paratron.cli",
               "paratron.config")


def package_root() -> Path:
    """The `paratron/` folder to read: $PARATRON_SOURCE, else the one in this repository."""
    if os.environ.get("PARATRON_SOURCE"):
        return Path(os.environ["PARATRON_SOURCE"])
    for folder in Path(__file__).resolve().parents:
        if (folder / "paratron" / "__init__.py").is_file():
            return folder / "paratron"
    raise FileNotFoundError(f"no paratron/ folder above {__file__}")


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package under `root`."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The paratron modules `name` imports anywhere in its file. `from a import b` counts as
    importing `a.b` when that is a module, else `a` (the package that defines `b`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .x import y`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files(package_root())
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, for the message."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    return component


def test_no_import_cycle():
    graph = import_graph()
    cycles = [" -> ".join(one_cycle(graph, c)) for c in strongly_connected(graph)]
    assert not cycles, "import cycles among paratron modules:\n" + "\n".join(cycles)


def test_model_imports_nothing_above_it():
    upward = sorted(f"{name} imports {target}"
                    for name, targets in import_graph().items()
                    if name == "paratron.model" or name.startswith("paratron.model.")
                    for target in targets
                    if any(target == top or target.startswith(top + ".") for top in ABOVE_MODEL))
    assert not upward, "model/ imports from the layers above it:\n" + "\n".join(upward)
