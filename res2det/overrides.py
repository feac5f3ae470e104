"""One way to change a typed config: ``dotted.path=value`` edits of nested frozen dataclasses.

``create_model(name, **overrides)``, a training config's ``model_options`` and ``res2det train --set`` all go
through ``apply_overrides``. A key is a dotted path of field names (``backbone.frozen_stages``,
``roi_head.stages.0.train.sampler.num``: a number indexes a tuple), or a bare field name that occurs exactly once
anywhere in the config (``frozen_stages``, ``num_classes``); an ambiguous bare name is an error that lists its
paths. Values are checked against the field's annotation (ints are accepted for floats; lists become tuples).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping

from .errors import Res2DetError


def apply_overrides(config: Any, overrides: Mapping[str, Any], *, what: str = "option") -> Any:
    """``config`` with every ``{path: value}`` of ``overrides`` applied, in order. ``what`` names the edits in
    error messages (``'--set'``, ``'option'``)."""
    for key, value in overrides.items():
        config = _replace(config, resolve_path(config, key, what=what), value, key, what)
    return config


def resolve_path(config: Any, key: str, *, what: str = "option") -> list[str]:
    """The full path of ``key`` in ``config``: its own parts when it is dotted, else the one field of that name."""
    if "." in key:
        return key.split(".")
    paths = [p for p in _field_paths(config) if p[-1] == key]
    if len(paths) == 1:
        return paths[0]
    if not paths:
        raise Res2DetError(f"{what} {key}: no field {key!r} in {type(config).__name__} "
                           f"(fields: {', '.join(f.name for f in dataclasses.fields(config))})")
    raise Res2DetError(f"{what} {key}: ambiguous in {type(config).__name__}, use one of "
                       f"{', '.join('.'.join(p) for p in paths)}")


def _field_paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every field path of a nested dataclass, into tuples of dataclasses by index (``roi_head.stages.0``)."""
    out = []
    for f in dataclasses.fields(obj):
        path = prefix + (f.name,)
        out.append(list(path))
        value = getattr(obj, f.name)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                out += _field_paths(item, path if i is None else path + (str(i),))
    return out


def _replace(obj: Any, path: list[str], value: Any, key: str, what: str) -> Any:
    name, rest = path[0], path[1:]
    if isinstance(obj, tuple):
        if not name.isdigit() or int(name) >= len(obj):
            raise Res2DetError(f"{what} {key}: {name!r} is not an index of this {len(obj)}-element tuple")
        i = int(name)
        if not rest:
            raise Res2DetError(f"{what} {key}: set the whole tuple, or a field of one of its elements")
        return obj[:i] + (_replace(obj[i], rest, value, key, what),) + obj[i + 1:]
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise Res2DetError(f"{what} {key}: {type(obj).__name__} has no field {name!r}")
    hints = typing.get_type_hints(type(obj))
    if name not in {f.name for f in dataclasses.fields(obj)}:
        raise Res2DetError(f"{what} {key}: no field {name!r} in {type(obj).__name__} "
                           f"(fields: {', '.join(f.name for f in dataclasses.fields(obj))})")
    if rest:
        return dataclasses.replace(obj, **{name: _replace(getattr(obj, name), rest, value, key, what)})
    return dataclasses.replace(obj, **{name: coerce(value, hints[name], key, what)})


def coerce(value: Any, annotation: Any, key: str, what: str = "option") -> Any:
    """``value`` checked against ``annotation`` (lists become tuples, ints become floats where a float is
    expected); a clear error otherwise."""
    if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    options = args if origin in (typing.Union, types.UnionType) else (annotation,)
    for option in options:
        o = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return value
        if o is Literal and value in typing.get_args(option):
            return value
        if o is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if o is Any or (isinstance(o, type) and o is not type(None) and isinstance(value, o)
                        and not (o is int and isinstance(value, bool))):
            return value
    raise Res2DetError(f"{what} {key}: {value!r} is not a valid value (expected {annotation})")


__all__ = ["apply_overrides", "resolve_path", "coerce"]
