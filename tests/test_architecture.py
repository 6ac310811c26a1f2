"""The package's layers (docs/architecture.md): a module imports only from its own layer and the
layers below it, counting imports inside functions, and the units (beit3's subpackages) import each
other without a cycle. Imports sit at the top of modules: inside a function only an optional or
heavy external package of the list below, with its reason on the line."""
from __future__ import annotations

import ast
import os
import re
from collections import defaultdict


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


# -- imports inside functions --------------------------------------------------------------------
# module -> the external packages it may import inside a function: optional ones (an extra, or not
# a dependency at all) and deepspeed, which takes ~2 s to import: only DeepSpeed engines and
# checkpoints load it, so that `import beit3`, a command's --help, evaluation and the plain engine
# do without it, and a command sets DS_ACCELERATOR before it loads. No beit3 module is imported
# inside a function; the dispatcher (beit3/cli/__init__.py) imports a command's module by name.
NESTED_ALLOWED = {
    "beit3.core.weight_files": {"deepspeed"},
    "beit3.trainer.engine": {"deepspeed"},
    "beit3.trainer.full_weights": {"deepspeed"},
    "beit3.jobs.finetune.run": {"deepspeed"},
    "beit3.jobs.benchmark.comm_bytes": {"deepspeed"},
    "beit3.data.shards": {"pyarrow"},
    "beit3.inference.search": {"faiss"},
    "beit3.weights.onnx": {"onnxruntime"},
    "beit3.vqkd.teachers": {"open_clip"},
    "beit3.jobs.benchmark.peers": {"torchscale"},
    "beit3.trainer.trackers": {"torch"},
    "beit3.trainer.wandb_tracker": {"wandb"},
    "beit3.trainer.mlflow_tracker": {"mlflow"},
}
REASON = re.compile(r"#.*\b(optional|heavy): \S")


def nested_imports(path: str, name: str) -> list[tuple[str, int, str]]:
    """(imported module, line, the line's text) for every import inside a function (a method, a
    nested function) of the file; relative imports resolved."""
    text = open(path).read()
    lines, tree = text.splitlines(), ast.parse(text, path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                targets = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                found[(t, node.lineno)] = lines[node.lineno - 1]
    return [(t, line, src) for (t, line), src in sorted(found.items(), key=lambda kv: kv[0][1])]


def package_of(imported: str) -> str:
    return imported.split(".")[0]


def test_imports_inside_functions_are_only_the_listed_optional_or_heavy_packages():
    bad, used = [], defaultdict(set)
    for name, path in modules().items():
        for imported, line, src in nested_imports(path, name):
            pkg = package_of(imported)
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if pkg not in NESTED_ALLOWED.get(name, ()):
                bad.append(f"{where}: {name} imports {imported} inside a function: move it to the top of the module"
                           + (" (a beit3 module always is)" if pkg == "beit3" else
                              " or, for an optional or heavy package, list it in NESTED_ALLOWED"))
            elif not REASON.search(src):
                bad.append(f"{where}: {imported} inside a function without its reason on the line "
                           f"('# optional: ...' or '# heavy: ...')")
            else:
                used[name].add(pkg)
    assert bad == []
    listed = {(m, p) for m, pkgs in NESTED_ALLOWED.items() for p in pkgs}
    assert sorted(listed - {(m, p) for m, pkgs in used.items() for p in pkgs}) == []  # no stale entry


def test_the_check_sees_imports_inside_methods_nested_functions_and_relative_ones(tmp_path):
    path = tmp_path / "beit3" / "data" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text("import json\n\n\nclass A:\n    def f(self):\n        import faiss  # optional: an extra\n\n"
                    "        def g():\n            from ..core import files\n            from .y import z\n"
                    "        return g\n")
    assert nested_imports(str(path), "beit3.data.x") == [
        ("faiss", 6, "        import faiss  # optional: an extra"),
        ("beit3.core", 9, "            from ..core import files"),
        ("beit3.data.y", 10, "            from .y import z")]
    assert REASON.search("        import faiss  # optional: an extra")
    assert not REASON.search("        import faiss  # an optional extra")
