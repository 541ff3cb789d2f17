"""Declarative constraints on the fields of commands, read by the API's parser and its OpenAPI.

A command is a frozen dataclass whose fields are annotated, e.g.
``name: Annotated[str, Text(max_len=200), Doc("shown to customers")]``. The API's strict
parser (:mod:`backend.api.schemas`) enforces the markers on every request before a use
case runs, and the OpenAPI document describes them, so the two can never disagree. The
markers are pure data; the use cases still check the rules that need the database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

#: Largest id, amount or serial a ``BIGINT`` column holds.
MAX_INT64: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Text:
    """A string of ``min_len..max_len`` characters, optionally matching ``pattern`` in full."""

    min_len: int = 1
    max_len: int = 200
    pattern: str | None = None
    #: Compiled ``pattern`` (derived; not part of equality).
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.pattern is not None:
            object.__setattr__(self, "regex", re.compile(self.pattern))


@dataclass(frozen=True, slots=True)
class Range:
    """An integer in ``lo..hi`` (both inclusive)."""

    lo: int
    hi: int = MAX_INT64


@dataclass(frozen=True, slots=True)
class Items:
    """An array of ``min_items..max_items`` elements."""

    min_items: int = 0
    max_items: int = 100


@dataclass(frozen=True, slots=True)
class Doc:
    """Human description of a field (the OpenAPI ``description``), with an optional example."""

    text: str
    example: object = None


#: An id of a row: a positive BIGINT.
ID: Final = Range(1, MAX_INT64)
#: A display name (resellers, partners, tenants, customers, labels).
NAME: Final = Text(1, 200)
