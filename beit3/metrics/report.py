"""Printing and saving evaluation results: an aligned text table and ``<output>/results.json``."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from beit3.core.files import atomic_write_bytes as _atomic_write_bytes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``beit3.core.files.atomic_write_bytes`` (a reader, or a job killed mid-write, never sees a
    half-written file), returning the path."""
    _atomic_write_bytes(path, data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``json.dump`` ``obj`` atomically; tensors and numpy values become plain Python numbers."""
    text = json.dumps(obj, indent=2, default=_to_builtin)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def write_results_json(results: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write ``results`` to ``<output_dir>/results.json`` atomically and return that path."""
    return atomic_write_json(Path(output_dir) / "results.json", dict(results))


def format_results_table(results: Mapping[str, Any], title: str = "Results") -> str:
    """Aligned two-column table of the scalar leaves of ``results``. Nested dicts become dotted
    keys (``per_class.cat.f1``); lists (a confusion matrix) are summarised by their length."""
    rows = [(key, _format_value(value)) for key, value in _flatten(results)]
    key_w = max([len("metric")] + [len(k) for k, _ in rows])
    val_w = max([len("value")] + [len(v) for _, v in rows])
    rule = "-" * (key_w + 3 + val_w)
    lines = [title, rule, f"{'metric':<{key_w}} | {'value':>{val_w}}", rule]
    lines += [f"{k:<{key_w}} | {v:>{val_w}}" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)


def print_results_table(results: Mapping[str, Any], title: str = "Results") -> str:
    """Print :func:`format_results_table` and return the printed text."""
    table = format_results_table(results, title)
    print(table, flush=True)
    return table


def _flatten(results: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def _format_value(value: Any) -> str:
    value = _to_builtin(value) if not isinstance(value, (str, int, float, list, tuple)) else value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return f"<{len(value)} items>"
    return str(value)


def _to_builtin(obj: Any) -> Any:
    """JSON fallback for torch tensors and numpy scalars/arrays (both expose ``tolist``)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"results value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")
