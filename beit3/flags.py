"""Command-line flags generated from a config dataclass, so that a job's options are declared once.

Each field becomes ``--field-name`` (its type from the annotation; ``bool`` -> ``--x/--no-x``;
``list`` -> repeatable). A field's ``metadata`` may add ``help``, ``choices``, ``flags`` (extra
spellings, e.g. ``("--ds-config",)``) and ``metavar``. Generated flags default to "not given"
(``argparse.SUPPRESS``), so ``given(namespace)`` holds exactly what the command line set: those
values override a recipe or a ``--config`` file without a default ever hiding a choice.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Optional

_SCALARS = {int: int, float: float, str: str}


def _scalar_type(tp) -> Optional[type]:
    """int/float/str of ``tp`` or of ``Optional[tp]``; None for anything else."""
    if tp in _SCALARS:
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in _SCALARS else None


def _is_list(tp) -> bool:
    """``list``, ``list[str]`` or an Optional of either."""
    return any(t is list or typing.get_origin(t) is list for t in (tp, *typing.get_args(tp)))


def _none_or(cast):
    def parse(s: str):
        return None if s.lower() == "none" else cast(s)
    parse.__name__ = cast.__name__  # argparse names the type in its error messages
    return parse


def add_dataclass_flags(ap: argparse.ArgumentParser | argparse._ArgumentGroup, cls,
                        skip: Iterable[str] = ()) -> None:
    """One flag per field of the dataclass ``cls`` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, tp = f.metadata, hints[f.name]
        names = ["--" + f.name.replace("_", "-"), *meta.get("flags", ())]
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f, meta))
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif _is_list(tp):
            kw.update(action="append", metavar=meta.get("metavar"), choices=meta.get("choices"))
        elif tp is tuple or origin is tuple:
            kw.update(type=float, nargs=2)
        else:
            scalar = _scalar_type(tp)
            if scalar is None:
                raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp}")
            optional = scalar is not tp
            kw.update(type=_none_or(scalar) if optional else scalar, choices=meta.get("choices"),
                      metavar=meta.get("metavar"))
        ap.add_argument(*names, **{k: v for k, v in kw.items() if v is not None})


def _help(f: dataclasses.Field, meta) -> str:
    text = meta.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if default not in (None, "", False) and "default" not in text:
        text = f"{text} (default {default})" if text else f"default {default}"
    return text.replace("%", "%%")


def given(ns: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that the command line set."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def check_at_least(cfg, minimum: int, names: Iterable[str], error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first field of ``names`` (as its flag) below ``minimum``; a field
    left at None (an optional setting not given) is not checked."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
