"""Frozen dataclasses to JSON and back: the hand-offs between pipeline steps.

A step's result (an adapter reference, an evaluation outcome …) is a small frozen dataclass of
plain fields. Stored as JSON (never pickled), read back into the same class with its field
types checked, so a renamed or retyped field fails loudly when it is read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class RecordError(TypeError):
    """Stored data does not fit the class it is read into."""


def to_record(obj: Any) -> Any:
    """A dataclass (nested ones, tuples, lists, dicts of plain values) as JSON-ready data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_record(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_record(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_record(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise RecordError(f"cannot store a {type(obj).__name__} in a record: {obj!r}")


def from_record(cls: Any, data: Any) -> Any:
    """``data`` (from ``to_record``) as an instance of the dataclass ``cls`` (or ``None`` for
    an optional one)."""
    return _convert(cls, data, getattr(cls, "__name__", str(cls)))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = set(value) - names
        if unknown:
            raise RecordError(f"{where}: unknown fields {sorted(unknown)} for {tp.__name__}")
        return tp(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except RecordError as err:
                errors.append(str(err))
        raise RecordError("; ".join(errors) or f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_convert(inner, v, f"{where}[]") for v in _list(value, where))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return [_convert(inner, v, f"{where}[]") for v in _list(value, where)]
    if origin is dict:
        _, inner = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {value!r}")
        return {k: _convert(inner, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise RecordError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise RecordError(f"{where}: expected a list, got {value!r}")
    return list(value)
