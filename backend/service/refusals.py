"""Refusals of the access and provisioning use cases: their branch of the backend's tree.

BackendError                         (backend/errors.py)
└── ServiceError                     (backend/service/errors.py) a use case refused a request
    ├── NotFoundError                (backend/service/errors.py) no such thing, or not
    │                                 visible to the caller: the two answer alike (404)
    ├── AuthenticationError          no, malformed, unknown, revoked or expired credentials (401)
    ├── PermissionDeniedError        the caller's role may not do this at all (403)
    ├── ConflictError                a unique name/serial/id is taken, or a counter is spent (409)
    └── InvalidInputError            the request breaks a rule; ``errors`` names each field (422)
        └── MalformedRequestError    the body or query string does not even parse (400)

All are the caller's fault and leave nothing changed: a use case raises them before it
writes, or inside its unit of work, which then rolls back. The HTTP API maps them in one
middleware (:mod:`backend.api.problems`). A caller that names another tenant's (or
reseller's, or customer's) resource gets :class:`NotFoundError`, exactly as for an id that
does not exist, so ids never leak across tenants (DESIGN §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backend.service.errors import NotFoundError, ServiceError

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "FieldError",
    "InvalidInputError",
    "MalformedRequestError",
    "NotFoundError",
    "PermissionDeniedError",
]


class AuthenticationError(ServiceError):
    """The request carries no usable credentials (missing, malformed, unknown, revoked, expired)."""


class PermissionDeniedError(ServiceError):
    """The caller is authenticated but its role may not perform this action."""


class ConflictError(ServiceError):
    """A unique name, serial or id is already taken, or a per-meter counter is exhausted."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one input field: a JSON pointer-ish ``field`` path and what is wrong."""

    field: str
    problem: str


class InvalidInputError(ServiceError):
    """The request breaks a rule; :attr:`errors` lists every field at fault."""

    def __init__(self, message: str, errors: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.errors: tuple[FieldError, ...] = tuple(errors)

    @classmethod
    def one(cls, field: str, problem: str) -> InvalidInputError:
        """A refusal naming one field."""
        return cls(f"{field}: {problem}", [FieldError(field, problem)])


class MalformedRequestError(InvalidInputError):
    """The body is not JSON (or not UTF-8), or the query string does not parse."""
