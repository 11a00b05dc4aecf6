"""JSON records: frozen dataclasses that write and read HELM's JSON shapes.

`to_dict()` follows HELM's `asdict_without_nones`: fields whose value is None are left out, nested records
become dicts, tuples become lists. `from_dict()` is its exact inverse, driven by the field annotations (an
absent optional field reads as None): it refuses unknown keys, missing required fields and values of the
wrong type, naming the field.
Sequence fields are stored as tuples (so records stay immutable); lists passed to a constructor are
converted.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

RecordT = TypeVar("RecordT", bound="JsonRecord")


class JsonRecord:
    """Mixin for frozen dataclasses with a HELM JSON shape (see module docstring)."""

    def __post_init__(self) -> None:
        for name in _tuple_field_names(type(self)):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """HELM's JSON shape of this record (None fields omitted)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _encode(value)
        return out

    @classmethod
    def from_dict(cls: type[RecordT], data: Mapping[str, Any]) -> RecordT:
        """Read a record from its JSON shape; raises ValueError naming the offending field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = _field_types(cls)
        unknown = [k for k in data if k not in hints]
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"known fields: {', '.join(hints)}")
        kwargs = {name: _decode(hints[name], value, f"{cls.__name__}.{name}") for name, value in data.items()}
        missing = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data or f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            if _is_optional(hints[f.name]):
                kwargs[f.name] = None  # written without it because it was None
            else:
                missing.append(f.name)
        if missing:
            raise ValueError(f"{cls.__name__}: missing required field(s) {', '.join(map(repr, missing))}")
        return cls(**kwargs)


def _encode(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


@functools.cache
def _tuple_field_names(cls: type) -> tuple[str, ...]:
    return tuple(name for name, tp in _field_types(cls).items() if _is_tuple_type(tp))


def _is_tuple_type(tp: Any) -> bool:
    if typing.get_origin(tp) is tuple:
        return True
    return _is_optional(tp) and any(typing.get_origin(a) is tuple for a in typing.get_args(tp))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _decode(tp: Any, value: Any, where: str) -> Any:
    """Convert a JSON value to the annotated type `tp`, or raise ValueError naming `where`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner, value, where)
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        return tp.from_dict(_expect(value, Mapping, where))  # type: ignore[attr-defined]
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        items = _expect(value, list, where)
        return tuple(_decode(item_type, v, f"{where}[{i}]") for i, v in enumerate(items))
    if origin in (dict, Mapping):
        _key_type, value_type = typing.get_args(tp)
        obj = _expect(value, Mapping, where)
        return {_expect(k, str, f"{where} key"): _decode(value_type, v, f"{where}[{k!r}]") for k, v in obj.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ValueError(f"{where}: expected an integer, got bool {value!r}")
    return _expect(value, tp, where)


def _expect(value: Any, tp: type, where: str) -> Any:
    if not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r:.80}")
    return value
