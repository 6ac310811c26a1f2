"""The package's layers (docs/architecture.md): a module imports only from its own layer and the
layers below it, counting imports inside functions, and the units (beit3's subpackages) import each
other without a cycle."""
from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "beit3")

# unit -> layer, bottom to top; the same numbers as docs/architecture.md's table.
LAYERS = {
    "core": 0,
    "data": 1, "metrics": 1,
    "model": 2, "vqkd": 2,
    "weights": 3,
    "inference": 4,
    "trainer": 5,
    "jobs": 6,
    "cli": 7,
    "__init__": 7, "__main__": 7,  # the public API and `python -m beit3`
}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[module_name(path)] = path
    return out


def imports(path: str, name: str) -> list[tuple[str, int]]:
    """(imported beit3 module or name, line) for every import in the file, nested ones included."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(t, line) for t, line in found if t == "beit3" or t.startswith("beit3.")]


UNITS = {name for name in os.listdir(PACKAGE) if not name.startswith(".") and name != "__pycache__"}


def unit(name: str) -> str:
    """The subpackage (or top-level module) ``name`` belongs to; names of beit3 itself
    (``beit3.__version__``) belong to its ``__init__``."""
    parts = name.split(".")
    if len(parts) > 1 and (parts[1] in UNITS or parts[1] + ".py" in UNITS):
        return parts[1]
    return "__init__"


def edges() -> list[tuple[str, str, str, int]]:
    """(importing module, imported name, its file, line) for every import between units."""
    out = []
    for name, path in modules().items():
        for target, line in imports(path, name):
            if unit(target) != unit(name):
                out.append((name, target, path, line))
    return out


def test_every_unit_has_a_layer():
    units = {unit(m) for m in modules()}
    assert sorted(units - set(LAYERS)) == []


def test_no_module_imports_from_a_higher_layer():
    bad = [f"{os.path.relpath(path, ROOT)}:{line}: {name} ({unit(name)}, layer {LAYERS[unit(name)]}) imports "
           f"{target} ({unit(target)}, layer {LAYERS.get(unit(target))})"
           for name, target, path, line in edges()
           if LAYERS.get(unit(target), 99) > LAYERS[unit(name)]]
    assert bad == []


def test_no_cycle_between_units():
    graph = defaultdict(set)
    for name, target, _, _ in edges():
        graph[unit(name)].add(unit(target))

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    assert sorted(u for u in list(graph) if u in reach(u)) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "beit3" / "core" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    from ..jobs import pretrain\n")
    assert imports(str(path), "beit3.core.x") == [("beit3.jobs.pretrain", 2)]
