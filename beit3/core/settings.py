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

Settings nest (torchtitan's config tree): a field made with ``part(Cls, help)`` holds a settings
dataclass of its own (the data loader's, the optimizer's, ...) whose fields become flags too, in a
help group of their own. A setting is named by its *key*: the field's name, unless its metadata gives
``name`` (``--data`` sets ``PretrainDataConfig.shards_dir``). The flag is ``--key``, and the key is
the flag's ``dest`` and the setting's name in a flat dict, so keys are unique over a tree
(``leaves`` refuses a repeat). ``tree_from_dict`` builds a tree from its nested form
(``{"optim": {"lr": 1e-3}}``, what ``dataclasses.asdict`` gives) or from flat keys (``{"lr": 1e-3}``,
what the command line and older files give). A field with ``flag=False`` is no flag: the job fills
it from what it builds (an image size from the model), and ``--print-config`` still shows it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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


def part(cls: type, help: str = "") -> dataclasses.Field:
    """A field holding the settings dataclass ``cls``, a part of a settings tree (default ``cls()``);
    ``help`` titles its flags' group in ``--help``."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


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


# -- the tree ----------------------------------------------------------------------------------------
def part_type(tp) -> Optional[type]:
    """The settings dataclass a field of annotation ``tp`` holds, or None for a setting."""
    base = _base(tp)
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def setting_key(f: dataclasses.Field) -> str:
    """The setting's name: its flag without ``--``, its key in a flat dict."""
    return f.metadata.get("name", f.name)


@dataclass(frozen=True)
class Leaf:
    """One setting of a tree: its key, the attribute path from the root, its field and annotation."""
    key: str
    path: tuple
    field: dataclasses.Field
    tp: Any


@functools.lru_cache(maxsize=None)
def leaves(cls) -> dict[str, Leaf]:
    """``{key: Leaf}`` for every setting of the dataclass ``cls`` and of its parts, in field order."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        sub = part_type(hints[f.name])
        found = ([dataclasses.replace(leaf, path=(f.name, *leaf.path)) for leaf in leaves(sub).values()] if sub
                 else [Leaf(setting_key(f), (f.name,), f, hints[f.name])])
        for leaf in found:
            if leaf.key in out:
                raise TypeError(f"{cls.__name__}: two settings named {leaf.key!r} ({'.'.join(out[leaf.key].path)} "
                                f"and {'.'.join(leaf.path)}); give one a metadata name")
            out[leaf.key] = leaf
    return out


def flat_values(settings) -> dict:
    """``{key: value}`` of every setting of a settings tree."""
    out = {}
    for leaf in leaves(type(settings)).values():
        value = settings
        for name in leaf.path:
            value = getattr(value, name)
        out[leaf.key] = value
    return out


def flatten(cls, d: Mapping) -> dict:
    """The flat ``{key: value}`` of ``d``, a dict of ``cls``'s settings in the nested form (a part's
    name holding an object of its fields) or flat (keys), or mixed. TypeError naming unknown keys
    or a setting given twice."""
    flat, unknown = {}, []
    _flatten_into(cls, d, flat, unknown, "", root=True)
    if unknown:
        parts = [f.name for f in dataclasses.fields(cls) if part_type(typing.get_type_hints(cls)[f.name])]
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}; settings are named as their flags, flat "
                        f"(\"lr\") or nested in their part ({', '.join(parts) or 'none'}) as --print-config shows")
    return flat


def _flatten_into(cls, d: Mapping, flat: dict, unknown: list, prefix: str, root: bool) -> None:
    """At the root a key may name any setting of the tree; inside a part object, its fields."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in d.items():
        f = fields.get(name)
        sub = part_type(hints[name]) if f is not None else None
        if sub is not None and isinstance(value, Mapping):
            _flatten_into(sub, value, flat, unknown, f"{prefix}{name}.", root=False)
            continue
        key = name if root and name in leaves(cls) else setting_key(f) if f is not None and sub is None else None
        if key is None:
            if sub is not None:
                raise TypeError(f"{prefix}{name} must be an object of {sub.__name__} settings, got {value!r}")
            unknown.append(prefix + name)
        elif key in flat:
            raise TypeError(f"{cls.__name__}: {prefix}{name} is given twice")
        else:
            flat[key] = value


def build_tree(cls, flat: Mapping):
    """``cls`` with the settings of ``flat`` (keys of ``leaves(cls)``), each part built by its class
    (which checks it), the others at their defaults."""
    hints, kw = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        sub = part_type(hints[f.name])
        if sub is not None:
            kw[f.name] = build_tree(sub, flat)
        elif setting_key(f) in flat:
            kw[f.name] = flat[setting_key(f)]
    return cls(**kw)


def tree_from_dict(cls, d: Mapping, naming: Callable[[str], str] = flag_name, error: type[Exception] = SettingError):
    """``cls`` built from ``d`` (nested, flat or mixed), naming the unknown keys (TypeError) and the
    first value of the wrong type or outside its range (``error``; ``naming``: how a key is named)."""
    flat = flatten(cls, d)
    check_values(cls, flat, naming, error)
    return build_tree(cls, flat)


def check_values(cls, values: Mapping, naming: Callable[[str], str] = flag_name,
                 error: type[Exception] = SettingError) -> None:
    """Raise ``error`` naming the first of ``values`` (settings of the dataclass ``cls`` or of its
    parts, by key) of the wrong type or outside its range; keys that are no setting are left to
    ``config.check_fields`` (or ``flatten``)."""
    known = leaves(cls)
    for key, value in values.items():
        leaf = known.get(key)
        if leaf is not None:
            problem = _problem(value, leaf.tp, leaf.field.metadata)
            if problem:
                raise error(f"{naming(key)} {problem}")


def check_settings(settings, error: type[Exception] = SettingError) -> None:
    """Every setting of the settings dataclass object ``settings`` and of its parts: type and range."""
    hints, values = typing.get_type_hints(type(settings)), {}
    for f in dataclasses.fields(settings):
        value, sub = getattr(settings, f.name), part_type(hints[f.name])
        if sub is None:
            values[setting_key(f)] = value
        elif not isinstance(value, sub):
            raise error(f"{type(settings).__name__}.{f.name} must be a {sub.__name__}, got {value!r}")
        else:
            check_settings(value, error)
    check_values(type(settings), values, error=error)


# -- flags -----------------------------------------------------------------------------------------
def _none_or(cast):
    def parse(s: str):
        return None if s.lower() == "none" else cast(s)
    parse.__name__ = cast.__name__  # argparse names the type in its error messages
    return parse


def add_dataclass_flags(ap: argparse.ArgumentParser | argparse._ArgumentGroup, cls,
                        skip: Iterable[str] = ()) -> None:
    """One flag per setting of the dataclass ``cls`` and of its parts (see the module docstring);
    on a parser, each part's flags form a help group."""
    hints = typing.get_type_hints(cls)
    leaves(cls)  # a key used twice fails here, before any flag is added
    for f in dataclasses.fields(cls):
        sub = part_type(hints[f.name])
        if sub is not None:
            title = f"{f.name}: {f.metadata.get('help') or sub.__name__}"
            add_dataclass_flags(ap.add_argument_group(title) if isinstance(ap, argparse.ArgumentParser) else ap,
                                sub, skip)
            continue
        key, meta, tp = setting_key(f), f.metadata, hints[f.name]
        if key in skip or not meta.get("flag", True):
            continue
        names = [flag_name(key), *meta.get("flags", ())]
        kw: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, help=_help(f, meta, tp))
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif _is_list(tp):
            kw.update(action="append", metavar=meta.get("metavar"), choices=meta.get("choices"))
        elif _is_pair(tp):
            kw.update(type=float, nargs=2, metavar=meta.get("metavar"))
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
    """The settings of ``cls`` (and of its parts) that the command line set, by key."""
    keys = leaves(cls)
    return {k: v for k, v in vars(ns).items() if k in keys}
