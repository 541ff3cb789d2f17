"""The one exception → RFC 9457 mapping: statuses, hidden 5xx details, the 401 challenge.

This module is itself a route module (``routes`` below) mounted next to the system
routes, so each handler raises one exception through the real middleware stack.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from backend.api.app import create_app
from backend.api.problems import PROBLEMS, Problem, problem_for, register
from backend.api.registry import RouteTable
from backend.config import BackendConfig
from backend.errors import (
    AccountNotFoundError,
    BackendError,
    IdempotencyConflictError,
    LimitExceededError,
    StorageError,
)
from backend.keys.errors import KeyStateError, UnknownKeyIdError
from backend.payments.errors import PaymentProviderError, WebhookSignatureError
from backend.service.errors import NotFoundError, UnknownPaymentError
from backend.service.refusals import ConflictError, InvalidInputError
from tests.support.api import KeyRing

routes = RouteTable("test", "Handlers that raise.")

RAISED: dict[str, BaseException] = {
    "storage": StorageError("connection to 10.0.0.5 refused, password=hunter2"),
    "crash": RuntimeError("secret internals"),
    "ledger-404": AccountNotFoundError(frozenset({5})),
    "limit": LimitExceededError(account_id=1, balance_after=-10, min_balance=0),
    "idempotency": IdempotencyConflictError("id reused"),
    "key-state": KeyStateError("no key yet"),
    "key-404": UnknownKeyIdError(3),
    "retryable": PaymentProviderError("timeout", provider="stripe", retryable=True),
    "final": PaymentProviderError("bad key", provider="stripe", retryable=False),
    "webhook": WebhookSignatureError("no signature matches"),
    "unknown-payment": UnknownPaymentError("pay_1"),
    "not-found": NotFoundError("customer 7 not found"),
    "field": InvalidInputError.one("email", "must match"),
}


@routes.get("/test/raise/{what}", "Raise", public=True)
async def raise_it(request: web.Request) -> web.Response:
    """Raise the exception named in the path."""
    raise RAISED[request.match_info["what"]]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    config = BackendConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    app = create_app(
        config, key_store=KeyRing(), route_modules=("backend.api.routes.system", __name__)
    )
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize(
    ("what", "status", "slug"),
    [
        ("storage", 500, "storage-failure"),
        ("crash", 500, "internal"),
        ("ledger-404", 404, "account-not-found"),
        ("limit", 422, "limit-exceeded"),
        ("idempotency", 409, "idempotency-conflict"),
        ("key-state", 409, "key-state"),
        ("key-404", 404, "unknown-key"),
        ("retryable", 503, "payment-provider"),
        ("final", 502, "payment-provider"),
        ("webhook", 400, "webhook-rejected"),
        ("unknown-payment", 409, "unknown-payment"),
        ("not-found", 404, "not-found"),
        ("field", 422, "invalid-input"),
    ],
)
async def test_exceptions_map_to_problems(
    client: TestClient[web.Request, web.Application],
    caplog: pytest.LogCaptureFixture,
    what: str,
    status: int,
    slug: str,
) -> None:
    with caplog.at_level(logging.ERROR, logger="backend.api.middleware"):
        resp = await client.get(f"/test/raise/{what}", headers={"X-Request-Id": "rid-1"})
    body = await resp.json(content_type="application/problem+json")
    assert resp.status == status
    assert body["type"] == f"urn:voltcredit:problem:{slug}"
    assert body["status"] == status
    assert body["instance"] == "urn:voltcredit:request:rid-1"
    if status >= 500:
        # The client learns the request id, never the internals; the log has both.
        assert body["detail"] == "the server failed; quote request id rid-1 when reporting it"
        assert "rid-1" in caplog.text
        assert str(RAISED[what]) in caplog.text
    else:
        assert body["detail"] == str(RAISED[what])
        assert not caplog.records
    if what == "field":
        assert body["errors"] == [{"field": "email", "problem": "must match"}]


def test_most_specific_class_wins_and_new_rows_can_be_registered() -> None:
    assert problem_for(ConflictError("x")).status == 409
    assert problem_for(BackendError("x")).status == 500

    class TopupLimitError(ConflictError):
        pass

    assert problem_for(TopupLimitError("x")).slug == "conflict"
    try:
        register(TopupLimitError, Problem(429, "too-many", "Too many top-ups"))
        assert problem_for(TopupLimitError("x")).status == 429
    finally:
        PROBLEMS.pop(TopupLimitError)
