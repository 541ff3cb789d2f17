"""Errors as ``application/problem+json`` (RFC 9457): the one table from exception to status.

Every refusal leaves the API as a problem document::

    {"type": "urn:voltcredit:problem:not-found", "title": "Not found", "status": 404,
     "detail": "customer 7 not found", "instance": "urn:voltcredit:request:5f0c…",
     "request_id": "5f0c…", "errors": [{"field": "email", "problem": "…"}]}

``type`` names the kind of problem (a URN: stable, and not pretending to be a page we
host; the docs page lists every one), ``instance`` this occurrence (the request id, also
in the ``X-Request-Id`` header and the logs), ``errors`` the fields at fault when there
are any. Server-side failures (5xx) never echo internal details: the log has them under
the request id.

:data:`PROBLEMS` maps exception classes to problems; the most specific class of an
exception's MRO wins. A subsystem adding exceptions adds rows with :func:`register`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from backend.config import ConfigError
from backend.domain.auth import ScopeError
from backend.errors import (
    AccountNotFoundError,
    BackendError,
    IdempotencyConflictError,
    LedgerError,
    LimitExceededError,
    StorageError,
)
from backend.keys.errors import KeyStateError, KeyStoreError, RotationError, UnknownKeyIdError
from backend.payments.errors import (
    InvalidPaymentRequestError,
    PaymentConflictError,
    PaymentError,
    PaymentNotFoundError,
    PaymentProviderError,
    PaymentStateError,
    WebhookError,
)
from backend.service.errors import (
    NotFoundError,
    ServiceError,
    SettlementMismatchError,
    UnknownPaymentError,
)
from backend.service.refusals import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    MalformedRequestError,
    PermissionDeniedError,
)

MEDIA_TYPE: Final = "application/problem+json"
TYPE_PREFIX: Final = "urn:voltcredit:problem:"


@dataclass(frozen=True, slots=True)
class Problem:
    """A kind of problem: HTTP status, short slug (the ``type``), title; 5xx hide detail."""

    status: int
    slug: str
    title: str
    #: A status chosen per exception instead of ``status`` (e.g. retryable → 503).
    status_of: Callable[[BaseException], int] | None = None

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug


def _provider_status(exc: BaseException) -> int:
    return 503 if getattr(exc, "retryable", False) else 502


#: Exception class → problem. Most specific class in the MRO wins.
PROBLEMS: Final[dict[type[BaseException], Problem]] = {
    AuthenticationError: Problem(401, "unauthenticated", "Authentication required"),
    PermissionDeniedError: Problem(403, "forbidden", "Forbidden"),
    NotFoundError: Problem(404, "not-found", "Not found"),
    ConflictError: Problem(409, "conflict", "Conflict"),
    InvalidInputError: Problem(422, "invalid-input", "Invalid input"),
    MalformedRequestError: Problem(400, "malformed-request", "Malformed request"),
    ServiceError: Problem(422, "refused", "Request refused"),
    UnknownPaymentError: Problem(409, "unknown-payment", "Unknown payment"),
    SettlementMismatchError: Problem(409, "settlement-mismatch", "Settlement mismatch"),
    LedgerError: Problem(422, "ledger-refused", "Ledger refused the operation"),
    AccountNotFoundError: Problem(404, "account-not-found", "Ledger account not found"),
    IdempotencyConflictError: Problem(409, "idempotency-conflict", "Idempotency conflict"),
    LimitExceededError: Problem(422, "limit-exceeded", "Balance limit exceeded"),
    KeyStoreError: Problem(500, "key-store-failure", "Signing-key store failure"),
    UnknownKeyIdError: Problem(404, "unknown-key", "Unknown signing key"),
    KeyStateError: Problem(409, "key-state", "Signing key not usable"),
    RotationError: Problem(409, "key-rotation", "Key rotation refused"),
    PaymentError: Problem(422, "payment-refused", "Payment refused"),
    InvalidPaymentRequestError: Problem(422, "invalid-payment", "Invalid payment request"),
    PaymentConflictError: Problem(409, "payment-conflict", "Payment conflict"),
    PaymentStateError: Problem(409, "payment-state", "Payment state conflict"),
    PaymentNotFoundError: Problem(404, "payment-not-found", "Payment not found"),
    PaymentProviderError: Problem(
        502, "payment-provider", "Payment provider failed", _provider_status
    ),
    WebhookError: Problem(400, "webhook-rejected", "Webhook rejected"),
    StorageError: Problem(500, "storage-failure", "Database failure"),
    ConfigError: Problem(500, "configuration", "Server misconfigured"),
    ScopeError: Problem(500, "internal", "Internal error"),
    BackendError: Problem(500, "internal", "Internal error"),
}

#: Problems of aiohttp's own refusals (no route, wrong method, body too large, …).
HTTP_PROBLEMS: Final[dict[int, Problem]] = {
    400: Problem(400, "malformed-request", "Malformed request"),
    404: Problem(404, "not-found", "Not found"),
    405: Problem(405, "method-not-allowed", "Method not allowed"),
    413: Problem(413, "payload-too-large", "Request body too large"),
    415: Problem(415, "unsupported-media-type", "Unsupported media type"),
    503: Problem(503, "not-ready", "Not ready"),
}
INTERNAL: Final = Problem(500, "internal", "Internal error")


def register(exc_type: type[BaseException], problem: Problem) -> None:
    """Map ``exc_type`` (and its subclasses without a row of their own) to ``problem``."""
    PROBLEMS[exc_type] = problem


def problem_for(exc: BaseException) -> Problem:
    """The problem of the most specific class in ``exc``'s MRO that has a row."""
    for cls in type(exc).__mro__:
        found = PROBLEMS.get(cls)
        if found is not None:
            return found
    return INTERNAL


def status_of(problem: Problem, exc: BaseException) -> int:
    return problem.status if problem.status_of is None else problem.status_of(exc)


def problem_response(
    problem: Problem,
    *,
    status: int,
    detail: str,
    request_id: str,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The RFC 9457 response for one occurrence of ``problem``."""
    body: dict[str, Any] = {
        "type": problem.type,
        "title": problem.title,
        "status": status,
        "detail": detail,
        "instance": f"urn:voltcredit:request:{request_id}",
        "request_id": request_id,
    }
    if errors:
        body["errors"] = errors
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type=MEDIA_TYPE,
        headers=headers,
    )


def all_problems() -> list[Problem]:
    """Every distinct problem type, by status then slug (for the docs page)."""
    seen = {p.slug: p for p in [*PROBLEMS.values(), *HTTP_PROBLEMS.values(), INTERNAL]}
    return sorted(seen.values(), key=lambda p: (p.status, p.slug))
