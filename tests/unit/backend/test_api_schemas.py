"""Strict JSON → command parsing, view → JSON, and the JSON Schema of both."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

import pytest

from backend.api.schemas import Components, decode_json, parse, to_json
from backend.domain.fields import Doc, Items, Range, Text
from backend.service.refusals import InvalidInputError, MalformedRequestError


class Colour(enum.StrEnum):
    RED = "RED"
    BLUE = "BLUE"


@dataclass(frozen=True, slots=True, kw_only=True)
class Inner:
    level: Annotated[int, Range(0, 9)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    name: Annotated[str, Text(2, 5, "[a-z]+"), Doc("lower-case", "abc")]
    count: Annotated[int, Range(1, 10)]
    flag: bool
    colour: Colour
    at: datetime
    extra: dict[str, Any]
    tags: Annotated[list[Annotated[str, Text(1, 3)]], Items(0, 2)]
    inner: Inner
    note: Annotated[str | None, Text(1, 10)] = None


VALID: dict[str, Any] = {
    "name": "abc",
    "count": 3,
    "flag": True,
    "colour": "RED",
    "at": "2026-11-26T10:00:00+01:00",
    "extra": {"any": [1, 2]},
    "tags": ["a", "bb"],
    "inner": {"level": 4},
}


def test_a_valid_body_round_trips() -> None:
    command = parse(Command, VALID)
    assert command.name == "abc"
    assert command.colour is Colour.RED
    assert command.at == datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    assert command.at.tzinfo is UTC
    assert command.inner == Inner(level=4)
    assert command.note is None
    out = to_json(command)
    assert out["at"] == "2026-11-26T09:00:00Z"
    assert out["colour"] == "RED"
    assert out["inner"] == {"level": 4}
    assert parse(Command, out) == command


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"surprise": 1}, "surprise", "unknown field"),
        ({"count": True}, "count", "must be an integer, got a boolean"),
        ({"count": 1.0}, "count", "must be an integer, got a number with a fraction or exponent"),
        ({"count": "3"}, "count", "must be an integer, got a string"),
        ({"count": 11}, "count", "must be in 1..10, got 11"),
        ({"flag": 1}, "flag", "must be true or false, got an integer"),
        ({"name": "a"}, "name", "must be 2..5 characters, got 1"),
        ({"name": "ABC"}, "name", "must match [a-z]+"),
        ({"name": "a\tb"}, "name", "must not contain control characters"),
        ({"name": None}, "name", "must not be null"),
        ({"colour": "GREEN"}, "colour", 'must be one of RED, BLUE, got "GREEN"'),
        ({"colour": 1}, "colour", "must be one of RED, BLUE, got 1"),
        ({"at": "2026-11-26T10:00:00"}, "at", "(a time zone offset is required)"),
        ({"at": "2026-11-26"}, "at", "must be an RFC 3339 date-time"),
        ({"at": "yesterday T"}, "at", "must be an RFC 3339 date-time"),
        ({"at": 1764147600}, "at", "must be an RFC 3339 date-time"),
        ({"extra": []}, "extra", "must be an object, got an array"),
        ({"tags": ["a", "b", "c"]}, "tags", "must hold 0..2 items"),
        ({"tags": "a"}, "tags", "must be an array, got a string"),
        ({"tags": ["toolong"]}, "tags[0]", "must be 1..3 characters, got 7"),
        ({"inner": {"level": 10}}, "inner.level", "must be in 0..9, got 10"),
        ({"inner": {"level": 1, "x": 2}}, "inner.x", "unknown field"),
        ({"inner": 5}, "inner", "must be a JSON object, got an integer"),
        ({"note": "x" * 11}, "note", "must be 1..10 characters, got 11"),
    ],
)
def test_each_kind_of_bad_field_is_named(change: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse(Command, {**VALID, **change})
    assert [(e.field, e.problem) for e in caught.value.errors if e.field == field]
    found = {e.field: e.problem for e in caught.value.errors}
    assert problem in found[field]


def test_every_problem_is_reported_at_once() -> None:
    body = {k: v for k, v in VALID.items() if k != "flag"}
    with pytest.raises(InvalidInputError) as caught:
        parse(Command, {**body, "count": False, "zz": 1})
    assert {e.field for e in caught.value.errors} == {"count", "flag", "zz"}
    assert "flag: missing (required)" in str(caught.value)


def test_a_non_object_body_is_refused() -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse(Command, [VALID])
    assert caught.value.errors[0].field == ""
    assert "(body): must be a JSON object, got an array" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "not valid JSON"),
        (b"\xff", "not UTF-8"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b"[" * 100_000, "nests too deeply"),
    ],
)
def test_decode_json_refuses_what_is_not_plain_json(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedRequestError, match=message):
        decode_json(raw)


def test_decode_json_accepts_json() -> None:
    assert decode_json(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}


def test_to_json_shapes() -> None:
    import uuid

    when = datetime(2026, 1, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert to_json(when) == "2026-01-01T10:00:00.000005Z"
    assert to_json(uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert to_json((Colour.BLUE, {"k": [None]})) == ["BLUE", {"k": [None]}]


def test_json_schema_describes_the_same_rules() -> None:
    components = Components()
    assert components.ref(Command) == {"$ref": "#/components/schemas/Command"}
    schema = components.schemas["Command"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["name", "count", "flag", "colour", "at", "extra", "tags", "inner"]
    p = schema["properties"]
    assert p["name"] == {
        "type": "string",
        "minLength": 2,
        "maxLength": 5,
        "pattern": "^(?:[a-z]+)$",
        "description": "lower-case",
        "examples": ["abc"],
    }
    assert p["count"] == {"type": "integer", "minimum": 1, "maximum": 10}
    assert p["colour"] == {"type": "string", "enum": ["RED", "BLUE"]}
    assert p["at"] == {"type": "string", "format": "date-time"}
    assert p["extra"] == {"type": "object"}
    assert p["tags"]["items"]["maxLength"] == 3
    assert (p["tags"]["minItems"], p["tags"]["maxItems"]) == (0, 2)
    assert p["inner"] == {"$ref": "#/components/schemas/Inner"}
    assert p["note"]["anyOf"][1] == {"type": "null"}
    assert components.schemas["Inner"]["properties"]["level"]["maximum"] == 9
