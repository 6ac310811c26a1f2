"""Settings declared once: command-line flags generated from a settings dataclass, and the one check of
every setting's type and range.

Each field becomes ``--field-name`` (its type from the annotation; ``bool`` -> ``--x/--no-x``;
``list`` -> repeatable). A field's ``metadata`` may add ``help``, ``choices``, ``flags`` (extra
spellings, e.g. ``("--ds-config",)``) and ``metavar``, and its valid range: bounds ``ge``, ``gt``,
``le``, ``lt`` (``finite=True`` alone: any finite number). Every int and float setting declares one
(a test walks them all); ``setting(default, help, ge=0)`` makes such a field. Generated flags default
to "not given" (``argparse.SUPPRESS``), so ``given(namespace)`` holds exactly what the command line
set: those values override a recipe or a ``--config`` file without a default ever hiding a choice.

``check_settings(obj)`` checks each field of a settings object, however it was made (flags, a
``--config`` file, a recipe), and raises ``SettingError`` naming the flag, the value and the range:
the settings dataclasses run it when they are built, before any work. Parsers written by hand declare
ranges with ``add_flag(ap, "--x", type=int, ge=1)`` and check them with ``check_args``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from beit3.core.errors import UserError

_SCALARS = {int: int, float: float, str: str}
_BOUNDS = ("ge", "gt", "le", "lt")


class SettingError(UserError, ValueError):
    """A setting of the wrong type or outside its range; the message names its flag."""


# -- ranges ----------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """Bounds of a number; every value must also be finite (NaN and infinity never are settings)."""
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    @classmethod
    def of(cls, meta: Mapping) -> Optional["Range"]:
        """The range a field's metadata declares, or None when it declares none."""
        if not any(k in meta for k in (*_BOUNDS, "finite")):
            return None
        return cls(**{k: meta[k] for k in _BOUNDS if k in meta})

    def describe(self) -> str:
        lo = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}"
              if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})"
              if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return "a finite number"

    def holds(self, v: float) -> bool:
        return (math.isfinite(v) and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def setting(default: Any, help: str = "", **meta) -> dataclasses.Field:
    """A settings field: its flag's ``help`` and the metadata of the module docstring (range included)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


# -- types -----------------------------------------------------------------------------------------
def _base(tp):
    """``tp`` without its Optional."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _scalar_type(tp) -> Optional[type]:
    """int/float/str of ``tp`` or of ``Optional[tp]``; None for anything else."""
    base = _base(tp)
    return base if base in _SCALARS else None


def _is_list(tp) -> bool:
    """``list``, ``list[str]`` or an Optional of either."""
    base = _base(tp)
    return base is list or typing.get_origin(base) is list


def _is_pair(tp) -> bool:
    base = _base(tp)
    return base is tuple or typing.get_origin(base) is tuple


def is_number(tp) -> bool:
    """An int or float setting (a pair of floats too): one that must declare its range."""
    return _scalar_type(tp) in (int, float) or _is_pair(tp)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_problem(value, tp) -> Optional[str]:
    """What is wrong with the type of ``value`` for the annotation ``tp``, or None."""
    if value is None:
        return None if _optional(tp) else "must be given (it cannot be null)"
    base = _base(tp)
    if base is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif base is int:
        ok, want = _is_int(value), "an integer"
    elif base is float:
        ok, want = _is_real(value), "a number"
    elif base is str:
        ok, want = isinstance(value, str), "a string"
    elif _is_list(tp):
        ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    elif _is_pair(tp):
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_real(v) for v in value)
        want = "two numbers"
    else:
        return None
    return None if ok else f"must be {want}, got {value!r}"


def _problem(value, tp, meta: Mapping) -> Optional[str]:
    """What is wrong with ``value`` as a setting of type ``tp`` and ``meta``'s range, or None."""
    wrong = _type_problem(value, tp)
    if wrong or value is None:
        return wrong
    choices = meta.get("choices")
    if choices is not None and not _is_list(tp) and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    valid = Range.of(meta)
    values = value if _is_pair(tp) else [value]
    if valid is not None and _is_real(values[0]) and not all(valid.holds(v) for v in values):
        shown = ", ".join(_num(v) for v in values)
        return f"must be {valid.describe()}{' each' if len(values) > 1 else ''}, got {shown}"
    return None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(cls, values: Mapping, naming: Callable[[str], str] = flag_name,
                 error: type[Exception] = SettingError) -> None:
    """Raise ``error`` naming the first of ``values`` (fields of the dataclass ``cls``) of the wrong
    type or outside its field's range; keys that are not fields are left to ``config.check_fields``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in fields:
            problem = _problem(value, hints[name], fields[name].metadata)
            if problem:
                raise error(f"{naming(name)} {problem}")


def check_settings(settings, error: type[Exception] = SettingError) -> None:
    """Every field of the settings dataclass object ``settings``: its type and its range."""
    check_values(type(settings), {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)},
                 error=error)


# -- flags -----------------------------------------------------------------------------------------
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
        names = [flag_name(f.name), *meta.get("flags", ())]
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f, meta, tp))
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif _is_list(tp):
            kw.update(action="append", metavar=meta.get("metavar"), choices=meta.get("choices"))
        elif _is_pair(tp):
            kw.update(type=float, nargs=2)
        else:
            scalar = _scalar_type(tp)
            if scalar is None:
                raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp}")
            kw.update(type=_none_or(scalar) if _optional(tp) else scalar, choices=meta.get("choices"),
                      metavar=meta.get("metavar"))
        action = ap.add_argument(*names, **{k: v for k, v in kw.items() if v is not None})
        _declare(action, Range.of(meta), f.default if f.default is not dataclasses.MISSING else None,
                 or_none=_optional(tp))


def _help(f: dataclasses.Field, meta, tp) -> str:
    text = meta.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    notes = []
    if default not in (None, "", False) and "default" not in text:
        notes.append(f"default {default}")
    valid = Range.of(meta)
    if valid is not None:
        notes.append(valid.describe() + (", or none" if _optional(tp) else ""))
    if notes:
        text = f"{text} ({'; '.join(notes)})" if text else "; ".join(notes)
    return text.replace("%", "%%")


def add_flag(ap: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str, ge=None, gt=None, le=None,
             lt=None, **kw) -> argparse.Action:
    """``ap.add_argument`` for a number with its valid range (checked by ``check_args``, shown in --help)."""
    valid = Range(ge=ge, gt=gt, le=le, lt=lt)
    kw["help"] = f"{kw['help']} ({valid.describe()})" if kw.get("help") else valid.describe()
    action = ap.add_argument(*names, **kw)
    _declare(action, valid, kw.get("default"))
    return action


def _declare(action: argparse.Action, valid: Optional[Range], default: Any, or_none: bool = False) -> None:
    """Keep the range on the flag (``check_args``, ``ranges_table``) with the default the user gets."""
    action.valid, action.setting_default = valid, default
    action.valid_text = None if valid is None else valid.describe() + (", or none" if or_none else "")


def _number_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The visible flags of ``parser`` (and its sub-commands', first use of each) that take numbers."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out.update({x.option_strings[0]: x for x in _number_actions(sub) if x.option_strings[0] not in out})
        elif a.option_strings and a.help != argparse.SUPPRESS and getattr(a.type, "__name__", "") in ("int", "float"):
            out[a.option_strings[0]] = a
    return list(out.values())


def flag_ranges(parser: argparse.ArgumentParser) -> dict[str, Optional[Range]]:
    """Each number flag of ``parser`` (and of its sub-commands) -> its declared range (None: none)."""
    return {a.option_strings[0]: getattr(a, "valid", None) for a in _number_actions(parser)}


def ranges_table(parser: argparse.ArgumentParser) -> str:
    """A Markdown table of ``parser``'s number flags: flag, valid values, default (docs/settings.md)."""
    rows = ["| flag | valid values | default |", "|---|---|---|"]
    for a in _number_actions(parser):
        default = getattr(a, "setting_default", a.default)
        shown = "-" if default in (None, argparse.SUPPRESS) else (
            " ".join(_num(v) for v in default) if isinstance(default, (list, tuple)) else _num(default))
        rows.append(f"| `{a.option_strings[0]}` | {getattr(a, 'valid_text', None) or '(none declared)'} | "
                    f"{shown} |")
    return "\n".join(rows)


def check_args(parser: argparse.ArgumentParser, ns: argparse.Namespace,
               error: type[Exception] = SettingError) -> None:
    """Raise ``error`` naming the first flag ``add_flag`` declared whose value is outside its range."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):  # only the one given set values in ``ns``
            for sub in a.choices.values():
                check_args(sub, ns, error)
        valid = getattr(a, "valid", None)
        value = getattr(ns, a.dest, None)
        if valid is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not valid.holds(v):
                raise error(f"{a.option_strings[0]} must be {valid.describe()}, got {_num(v)}")


def given(ns: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that the command line set."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}
