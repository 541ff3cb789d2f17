"""Strict JSON ↔ dataclass mapping for the HTTP API, and the JSON Schema of the same types.

One description serves three purposes, so they cannot drift apart: a command or view is
a frozen dataclass whose fields carry :mod:`backend.domain.fields` markers, and

- :func:`parse` turns a decoded JSON body into the command, refusing unknown fields,
  missing fields, wrong types (``true`` is not an integer, ``1.0`` is not an integer,
  ``"1"`` is not an integer), out-of-range numbers, over-long or control-character
  strings, naive or malformed datetimes — every problem of the body at once, each
  naming its field (:class:`~backend.service.refusals.InvalidInputError`);
- :func:`to_json` turns a view into JSON-ready data (RFC 3339 UTC times, enum values);
- :func:`json_schema` describes either for the OpenAPI document (JSON Schema 2020-12,
  as OpenAPI 3.1 uses it).

:func:`decode_json` reads the raw body: UTF-8 only, no ``NaN``/``Infinity``, no
duplicate keys (RFC 8259 §4 leaves their meaning open; we refuse rather than guess).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from backend.domain.fields import Doc, Items, Range, Text
from backend.service.refusals import FieldError, InvalidInputError, MalformedRequestError

T = TypeVar("T")
_MISSING: Final = object()


@dataclasses.dataclass(frozen=True, slots=True)
class _Type:
    """A field's annotation taken apart: the base type, whether ``None`` is allowed, markers."""

    base: Any
    nullable: bool
    markers: tuple[object, ...]

    def marker(self, kind: type[T]) -> T | None:
        for m in self.markers:
            if isinstance(m, kind):
                return m
        return None


def _unpack(annotation: Any) -> _Type:
    markers: tuple[object, ...] = ()
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        markers = tuple(extra)
    nullable = False
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:  # pragma: no cover - our schemas use only X | None unions
            raise TypeError(f"unsupported union {annotation!r}")
        annotation = args[0]
    return _Type(annotation, nullable, markers)


def _hints(cls: type[Any]) -> dict[str, _Type]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: _unpack(hints[f.name]) for f in dataclasses.fields(cls)}


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


# ------------------------------------------------------------------------------ parsing


def decode_json(raw: bytes) -> object:
    """The JSON value of a request body; :class:`MalformedRequestError` if it is not JSON."""

    def no_constants(name: str) -> object:
        raise ValueError(f"{name} is not JSON (RFC 8259 numbers are finite)")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"duplicate key {key!r}")
            obj[key] = value
        return obj

    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as exc:
        raise MalformedRequestError(f"request body is not UTF-8: {exc.reason}") from exc
    except RecursionError as exc:
        raise MalformedRequestError("request body nests too deeply") from exc
    except ValueError as exc:
        raise MalformedRequestError(f"request body is not valid JSON: {exc}") from exc


def parse(cls: type[T], data: object) -> T:
    """``cls`` built from JSON ``data``, or :class:`InvalidInputError` listing every problem."""
    errors: list[FieldError] = []
    value = _parse_object(cls, data, "", errors)
    if errors:
        summary = "; ".join(f"{e.field or '(body)'}: {e.problem}" for e in errors[:5])
        raise InvalidInputError(f"invalid request: {summary}", errors)
    return typing.cast("T", value)


def _parse_object(cls: type[Any], data: object, path: str, errors: list[FieldError]) -> object:
    if not isinstance(data, dict):
        errors.append(FieldError(path, f"must be a JSON object, got {_kind(data)}"))
        return None
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors.extend(
        FieldError(_join(path, name), "unknown field") for name in sorted(set(data) - set(fields))
    )
    values: dict[str, object] = {}
    for name, f in fields.items():
        where = _join(path, name)
        if name not in data:
            if not _has_default(f):
                errors.append(FieldError(where, "missing (required)"))
            continue
        values[name] = _parse_value(hints[name], data[name], where, errors)
    if errors:
        return None
    try:
        return cls(**values)
    except InvalidInputError as exc:  # a command's own __post_init__ check
        errors.extend(exc.errors or [FieldError(path, str(exc))])
        return None


def _parse_value(t: _Type, value: object, where: str, errors: list[FieldError]) -> object:
    if value is None:
        if not t.nullable:
            errors.append(FieldError(where, "must not be null"))
        return None
    base = t.base
    problem: str | None = None
    if base is bool:
        problem = None if type(value) is bool else f"must be true or false, got {_kind(value)}"
    elif base is int:
        problem = _check_int(value, t.marker(Range))
    elif base is str:
        problem = _check_str(value, t.marker(Text))
    elif base is datetime:
        return _parse_datetime(value, where, errors)
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        allowed = [m.value for m in base]
        if value not in allowed or type(value) is not str:
            problem = f"must be one of {', '.join(map(str, allowed))}, got {_show(value)}"
        else:
            return base(value)
    elif typing.get_origin(base) is dict:
        problem = None if isinstance(value, dict) else f"must be an object, got {_kind(value)}"
    elif typing.get_origin(base) is list:
        return _parse_list(t, value, where, errors)
    elif dataclasses.is_dataclass(base):
        return _parse_object(typing.cast("type[Any]", base), value, where, errors)
    else:  # pragma: no cover - a schema using a type this module does not know
        raise TypeError(f"{where}: unsupported field type {base!r}")
    if problem is not None:
        errors.append(FieldError(where, problem))
    return value


def _check_int(value: object, bounds: Range | None) -> str | None:
    # bool is an int subclass in Python; in JSON true is not a number.
    if type(value) is not int:
        return f"must be an integer, got {_kind(value)}"
    if bounds is not None and not bounds.lo <= value <= bounds.hi:
        return f"must be in {bounds.lo}..{bounds.hi}, got {value}"
    return None


def _check_str(value: object, text: Text | None) -> str | None:
    if type(value) is not str:
        return f"must be a string, got {_kind(value)}"
    text = text or Text(0, 10_000)
    if not text.min_len <= len(value) <= text.max_len:
        return f"must be {text.min_len}..{text.max_len} characters, got {len(value)}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "must not contain control characters"
    if text.regex is not None and text.regex.fullmatch(value) is None:
        return f"must match {text.pattern}"
    return None


def _parse_datetime(value: object, where: str, errors: list[FieldError]) -> datetime | None:
    problem = "must be an RFC 3339 date-time with offset, e.g. 2026-01-31T22:00:00Z"
    if type(value) is not str or "T" not in value.upper():
        errors.append(FieldError(where, problem))
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        errors.append(FieldError(where, problem))
        return None
    if parsed.utcoffset() is None:
        errors.append(FieldError(where, problem + " (a time zone offset is required)"))
        return None
    return parsed.astimezone(UTC)


def _parse_list(t: _Type, value: object, where: str, errors: list[FieldError]) -> object:
    if not isinstance(value, list):
        errors.append(FieldError(where, f"must be an array, got {_kind(value)}"))
        return None
    bounds = t.marker(Items) or Items()
    if not bounds.min_items <= len(value) <= bounds.max_items:
        errors.append(FieldError(where, f"must hold {bounds.min_items}..{bounds.max_items} items"))
        return None
    item = _unpack(typing.get_args(t.base)[0])
    return [_parse_value(item, v, f"{where}[{i}]", errors) for i, v in enumerate(value)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number with a fraction or exponent",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------ output


def format_datetime(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``: ``2026-11-26T01:02:03Z`` (microseconds if any)."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_json(value: object) -> Any:
    """JSON-ready data of a view (dataclass), list, dict or scalar."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------ JSON Schema


class Components:
    """The ``components.schemas`` of an OpenAPI document, filled as types are described."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def ref(self, cls: type[Any], *, name: str | None = None) -> dict[str, Any]:
        """``{"$ref": …}`` to ``cls``'s schema, adding it on first use."""
        name = name or cls.__name__
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: breaks cycles
            self.schemas[name] = object_schema(cls, self)
        return {"$ref": f"#/components/schemas/{name}"}


def object_schema(cls: type[Any], components: Components) -> dict[str, Any]:
    """JSON Schema of a dataclass: every field, ``required`` ones, no others allowed."""
    hints = _hints(cls)
    properties = {name: _schema(t, components) for name, t in hints.items()}
    required = [f.name for f in dataclasses.fields(cls) if not _has_default(f)]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc:
        schema["description"] = doc[0]
    return schema


def json_schema(cls: type[Any], components: Components) -> dict[str, Any]:
    """A reference to ``cls``'s schema in ``components``."""
    return components.ref(cls)


def _schema(t: _Type, components: Components) -> dict[str, Any]:
    base = t.base
    schema: dict[str, Any]
    if base is bool:
        schema = {"type": "boolean"}
    elif base is int:
        schema = {"type": "integer"}
        bounds = t.marker(Range)
        if bounds is not None:
            schema.update(minimum=bounds.lo, maximum=bounds.hi)
    elif base is str:
        schema = {"type": "string"}
        text = t.marker(Text)
        if text is not None:
            schema.update(minLength=text.min_len, maxLength=text.max_len)
            if text.pattern is not None:
                schema["pattern"] = f"^(?:{text.pattern})$"
    elif base is datetime:
        schema = {"type": "string", "format": "date-time"}
    elif base is uuid.UUID:
        schema = {"type": "string", "format": "uuid"}
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        schema = {"type": "string", "enum": [m.value for m in base]}
    elif typing.get_origin(base) is dict:
        schema = {"type": "object"}
    elif typing.get_origin(base) is list:
        item = _unpack(typing.get_args(base)[0])
        schema = {"type": "array", "items": _schema(item, components)}
        items = t.marker(Items)
        if items is not None:
            schema.update(minItems=items.min_items, maxItems=items.max_items)
    elif dataclasses.is_dataclass(base):
        schema = components.ref(typing.cast("type[Any]", base))
    else:  # pragma: no cover - a schema using a type this module does not know
        raise TypeError(f"unsupported field type {base!r}")
    doc = t.marker(Doc)
    if t.nullable:
        schema = {"anyOf": [schema, {"type": "null"}]}
    if doc is not None:
        schema["description"] = doc.text
        if doc.example is not None:
            schema["examples"] = [doc.example]
    return schema
