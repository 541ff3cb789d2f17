"""What every use case receives about its caller, and the checks and audit every one makes.

A :class:`Call` carries the caller's :class:`~backend.domain.auth.Scope`, the request id
(for the audit log and error reports) and the time the request arrived, read once by the
API from its clock so a use case never reads the wall clock itself. Use cases start
with :func:`require` and end every change with :func:`audit` in the same unit of work,
so a change and its audit row commit or roll back together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar

from backend.adapters.db.repos import Repositories
from backend.domain.auth import Action, Scope
from backend.domain.fields import MAX_INT64
from backend.service.refusals import InvalidInputError, PermissionDeniedError

T = TypeVar("T")
#: A clock returning an aware UTC datetime (injected; tests use a fixed one).
Clock = Callable[[], datetime]
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 500


def utc_now() -> datetime:
    """The wall clock as an aware UTC datetime: the production :data:`Clock`."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One request to a use case: who asks, under which request id, at what time."""

    scope: Scope
    request_id: str
    now: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class PageRequest:
    """Which page of a list: at most ``limit`` items with keys after ``after``."""

    limit: int = DEFAULT_LIMIT
    after: int | str | None = None

    def __post_init__(self) -> None:
        if type(self.limit) is not int or not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidInputError.one("limit", f"must be an integer in 1..{MAX_LIMIT}")
        if type(self.after) is int and not 0 <= self.after <= MAX_INT64:
            raise InvalidInputError.one("after", f"must be an integer in 0..{MAX_INT64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Page(Generic[T]):
    """One page of a list; pass ``next_after`` as ``after`` for the next (``None``: the end)."""

    items: list[T]
    next_after: int | str | None


def require(call: Call, action: Action) -> None:
    """Refuse (403) unless the caller's role may take ``action`` at all."""
    if not call.scope.may(action):
        raise PermissionDeniedError(f"role {call.scope.role} may not {action}")


async def audit(
    repos: Repositories,
    call: Call,
    *,
    action: Action | str,
    target: str,
    tenant_id: int | None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append the audit row of a change, in the change's own unit of work."""
    await repos.audit.record(
        call.scope,
        at=call.now,
        tenant_id=tenant_id,
        action=str(action),
        target=target,
        request_id=call.request_id,
        detail=detail,
    )
