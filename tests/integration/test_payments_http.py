"""Payments over real HTTP on 127.0.0.1: the Stripe adapter against a local imitation of
Stripe's documented API, the webhook deliverer against a local receiver, and the sandbox
provider end to end (create → delay → signed webhook POSTed → verified by the receiver).

Nothing here talks to the real Stripe: the imitation answers with the documented
responses and records what it receives so the tests can check every header and field.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from backend.payments.base import PaymentRequest, PaymentStatus, WebhookEvent
from backend.payments.errors import (
    InvalidPaymentRequestError,
    PaymentConflictError,
    PaymentNotFoundError,
    PaymentProviderError,
    WebhookError,
)
from backend.payments.sandbox import SIGNATURE_HEADER, SandboxProvider
from backend.payments.stripe import StripeProvider
from backend.payments.webhooks import (
    DeliveryState,
    WebhookDeliverer,
    parse_signature_header,
    verify_signature,
)

pytestmark = pytest.mark.integration

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], Awaitable[TestServer]]]:
    servers: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- a local imitation of Stripe ---------------------------------------------------------------

# The documented create response (docs.stripe.com/api/payment_intents/create), trimmed.
PI: dict[str, Any] = {
    "id": "pi_3MtwBwLkdIwHu7ix28a3tqPa",
    "object": "payment_intent",
    "amount": 2000,
    "amount_capturable": 0,
    "amount_received": 0,
    "automatic_payment_methods": {"enabled": True},
    "canceled_at": None,
    "capture_method": "automatic",
    "client_secret": "pi_3MtwBwLkdIwHu7ix28a3tqPa_secret_YrKJUKribcBjcG8HVhfZluoGH",
    "confirmation_method": "automatic",
    "created": 1680800504,
    "currency": "usd",
    "description": None,
    "last_payment_error": None,
    "livemode": False,
    "metadata": {},
    "next_action": None,
    "payment_method_types": ["card", "link"],
    "status": "requires_payment_method",
}


def pi(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(PI)
    body.update(changes)
    return body


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict[str, Any] = field(default_factory=pi)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    content_type: str
    form: list[tuple[str, str]]


class FakeStripe:
    """Answers /v1/payment_intents with scripted replies and records every request."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.seen: list[Seen] = []
        self.base_url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/payment_intents", self.handle)
        app.router.add_get("/v1/payment_intents/{id}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(
            Seen(
                method=request.method,
                path=request.path,
                headers=dict(request.headers),
                content_type=request.content_type,
                form=parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw)),
            )
        )
        reply = self.replies.popleft() if self.replies else Reply()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        return web.Response(
            status=reply.status,
            body=body,
            headers={"Content-Type": "application/json", **reply.headers},
        )


@pytest.fixture
async def fake_stripe(
    serve: Callable[[web.Application], Awaitable[TestServer]],
) -> FakeStripe:
    fake = FakeStripe()
    server = await serve(fake.app())
    fake.base_url = str(server.make_url(""))
    return fake


API_KEY = "sk_test_" + secrets.token_hex(12)
WEBHOOK_SECRET = "whsec_" + secrets.token_hex(16)


@pytest.fixture
def stripe(fake_stripe: FakeStripe, session: aiohttp.ClientSession) -> StripeProvider:
    return StripeProvider(
        api_key=API_KEY,
        webhook_secret="whsec_" + secrets.token_hex(16),
        session=session,
        base_url=fake_stripe.base_url,
        api_version="2025-10-29.clover",
        request_timeout_s=0.5,
    )


def topup(amount_minor: int = 2000, **overrides: Any) -> PaymentRequest:
    fields: dict[str, Any] = {
        "idempotency_key": "topup-5b1e",
        "account_ref": "acct-42",
        "amount_minor": amount_minor,
        "currency": "USD",
        "description": "Prepaid electricity",
        "metadata": {"meter": "M-1", "tenant": "utility-a"},
    }
    fields.update(overrides)
    return PaymentRequest(**fields)


async def test_create_sends_the_documented_request(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    fake_stripe.replies.append(Reply(body=pi(metadata={"account_ref": "acct-42"})))
    intent = await stripe.create_payment(topup())

    (seen,) = fake_stripe.seen
    assert (seen.method, seen.path) == ("POST", "/v1/payment_intents")
    assert seen.content_type == "application/x-www-form-urlencoded"
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["Idempotency-Key"] == "topup-5b1e"
    assert seen.headers["Stripe-Version"] == "2025-10-29.clover"
    assert sorted(seen.form) == sorted(
        [
            ("amount", "2000"),
            ("currency", "usd"),
            ("automatic_payment_methods[enabled]", "true"),
            ("description", "Prepaid electricity"),
            ("metadata[account_ref]", "acct-42"),
            ("metadata[meter]", "M-1"),
            ("metadata[tenant]", "utility-a"),
        ]
    )
    assert intent.provider == "stripe"
    assert intent.provider_payment_id == "pi_3MtwBwLkdIwHu7ix28a3tqPa"
    assert intent.status is PaymentStatus.PENDING
    assert (intent.amount_minor, intent.currency) == (2000, "USD")
    assert intent.client_secret == PI["client_secret"]
    assert intent.next_action_url is None


async def test_create_without_description_or_version_omits_them(
    fake_stripe: FakeStripe, session: aiohttp.ClientSession
) -> None:
    provider = StripeProvider(
        api_key=API_KEY,
        webhook_secret=WEBHOOK_SECRET,
        session=session,
        base_url=fake_stripe.base_url + "/",
    )
    await provider.create_payment(topup(description="", metadata={}))
    (seen,) = fake_stripe.seen
    assert "Stripe-Version" not in seen.headers
    assert dict(seen.form) == {
        "amount": "2000",
        "currency": "usd",
        "automatic_payment_methods[enabled]": "true",
        "metadata[account_ref]": "acct-42",
    }


async def test_requires_action_carries_the_redirect_url(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    url = "https://hooks.stripe.com/3d_secure_2/hosted?merchant=acct_1"
    fake_stripe.replies.append(
        Reply(
            body=pi(
                status="requires_action",
                next_action={"type": "redirect_to_url", "redirect_to_url": {"url": url}},
            )
        )
    )
    intent = await stripe.create_payment(topup())
    assert (intent.status, intent.next_action_url) == (PaymentStatus.REQUIRES_ACTION, url)


async def test_sdk_next_action_has_no_url(stripe: StripeProvider, fake_stripe: FakeStripe) -> None:
    fake_stripe.replies.append(
        Reply(body=pi(status="requires_action", next_action={"type": "use_stripe_sdk"}))
    )
    intent = await stripe.create_payment(topup())
    assert (intent.status, intent.next_action_url) == (PaymentStatus.REQUIRES_ACTION, None)


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"status": "succeeded", "amount_received": 2000}, PaymentStatus.SUCCEEDED),
        ({"status": "processing"}, PaymentStatus.PENDING),
        ({"status": "canceled"}, PaymentStatus.CANCELED),
        (
            {"last_payment_error": {"type": "card_error", "code": "card_declined"}},
            PaymentStatus.FAILED,
        ),
    ],
)
async def test_get_payment_retrieves_and_maps(
    stripe: StripeProvider,
    fake_stripe: FakeStripe,
    changes: dict[str, Any],
    status: PaymentStatus,
) -> None:
    fake_stripe.replies.append(Reply(body=pi(**changes)))
    intent = await stripe.get_payment("pi_3MtwBwLkdIwHu7ix28a3tqPa")
    (seen,) = fake_stripe.seen
    assert (seen.method, seen.path) == ("GET", "/v1/payment_intents/pi_3MtwBwLkdIwHu7ix28a3tqPa")
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert "Idempotency-Key" not in seen.headers
    assert seen.form == []
    assert intent.status is status


def stripe_error(error_type: str, code: str | None = None, message: str = "msg") -> dict[str, Any]:
    return {"error": {"type": error_type, "code": code, "message": message}}


@pytest.mark.parametrize(
    ("reply", "retryable", "code"),
    [
        (
            Reply(400, stripe_error("invalid_request_error", "parameter_missing")),
            False,
            "parameter_missing",
        ),
        (Reply(401, stripe_error("invalid_request_error", None, "Invalid API Key")), False, None),
        (Reply(402, stripe_error("card_error", "card_declined")), False, "card_declined"),
        (Reply(409, stripe_error("invalid_request_error", "lock_timeout")), True, "lock_timeout"),
        (Reply(429, stripe_error("invalid_request_error", "rate_limit")), True, "rate_limit"),
        (Reply(500, stripe_error("api_error")), True, None),
        (Reply(503, b"<html>bad gateway</html>"), True, None),
        (Reply(500, stripe_error("api_error"), {"Stripe-Should-Retry": "false"}), False, None),
        (
            Reply(400, stripe_error("invalid_request_error"), {"Stripe-Should-Retry": "true"}),
            True,
            None,
        ),
        (Reply(302, b"", {"Location": "https://elsewhere.example/"}), False, None),
    ],
    ids=[
        "400-missing",
        "401-key",
        "402-declined",
        "409-lock",
        "429-rate",
        "500",
        "503-html",
        "should-retry-false",
        "should-retry-true",
        "redirect-not-followed",
    ],
)
async def test_api_errors_are_translated_with_a_retry_verdict(
    stripe: StripeProvider,
    fake_stripe: FakeStripe,
    reply: Reply,
    retryable: bool,
    code: str | None,
) -> None:
    fake_stripe.replies.append(reply)
    with pytest.raises(PaymentProviderError) as caught:
        await stripe.create_payment(topup())
    assert caught.value.provider == "stripe"
    assert caught.value.status == reply.status
    assert caught.value.retryable is retryable
    assert caught.value.code == code
    assert f"HTTP {reply.status}" in str(caught.value)
    assert API_KEY not in str(caught.value)


async def test_error_message_is_passed_on(stripe: StripeProvider, fake_stripe: FakeStripe) -> None:
    fake_stripe.replies.append(
        Reply(400, stripe_error("invalid_request_error", None, "Bad amount"))
    )
    with pytest.raises(PaymentProviderError, match="invalid_request_error: Bad amount"):
        await stripe.create_payment(topup())


async def test_reused_key_with_other_parameters_is_a_conflict(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    fake_stripe.replies.append(
        Reply(400, stripe_error("idempotency_error", None, "Keys for idempotent requests ..."))
    )
    with pytest.raises(PaymentConflictError, match="idempotency_error"):
        await stripe.create_payment(topup())


async def test_unknown_payment_is_not_found(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    fake_stripe.replies.append(
        Reply(404, stripe_error("invalid_request_error", "resource_missing"))
    )
    with pytest.raises(PaymentNotFoundError) as caught:
        await stripe.get_payment("pi_missing")
    assert caught.value.provider_payment_id == "pi_missing"


async def test_404_on_create_is_a_provider_error(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    fake_stripe.replies.append(Reply(404, stripe_error("invalid_request_error")))
    with pytest.raises(PaymentProviderError) as caught:
        await stripe.create_payment(topup())
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (pi(status="exploded"), "unknown PaymentIntent status"),
        (pi(id=None), r"payment_intent\.id"),
        (pi(amount="2000"), r"payment_intent\.amount"),
        (pi(client_secret=7), r"payment_intent\.client_secret"),
        (pi(status="requires_action", next_action={"type": "redirect_to_url"}), "redirect_to_url"),
        (pi(amount=2001), "asked 2000 USD"),
        (pi(currency="eur"), "asked 2000 USD"),
    ],
)
async def test_unreadable_success_responses_are_provider_errors(
    stripe: StripeProvider, fake_stripe: FakeStripe, body: bytes | dict[str, Any], message: str
) -> None:
    fake_stripe.replies.append(Reply(body=body))
    with pytest.raises(PaymentProviderError, match=message) as caught:
        await stripe.create_payment(topup())
    assert caught.value.retryable is False


async def test_unreachable_stripe_is_retryable(session: aiohttp.ClientSession) -> None:
    provider = StripeProvider(
        api_key=API_KEY,
        webhook_secret=WEBHOOK_SECRET,
        session=session,
        base_url=f"http://127.0.0.1:{unused_port()}",
    )
    with pytest.raises(PaymentProviderError, match="ClientConnectorError") as caught:
        await provider.create_payment(topup())
    assert (caught.value.retryable, caught.value.status) == (True, None)


async def test_slow_stripe_times_out_retryable(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    fake_stripe.replies.append(Reply(delay_s=2.0))
    with pytest.raises(PaymentProviderError, match="Timeout") as caught:
        await stripe.get_payment("pi_slow")
    assert caught.value.retryable is True


async def test_invalid_input_never_reaches_stripe(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    with pytest.raises(InvalidPaymentRequestError, match="eight digits"):
        await stripe.create_payment(topup(amount_minor=100_000_000))
    for bad_id in ("../../v1/charges", "pi_1?expand=x", "", "pi 1"):
        with pytest.raises(InvalidPaymentRequestError, match="not a Stripe PaymentIntent id"):
            await stripe.get_payment(bad_id)
    assert fake_stripe.seen == []


async def test_largest_stripe_amount_is_sent(
    stripe: StripeProvider, fake_stripe: FakeStripe
) -> None:
    fake_stripe.replies.append(Reply(body=pi(amount=99_999_999)))
    intent = await stripe.create_payment(topup(amount_minor=99_999_999))
    assert intent.amount_minor == 99_999_999


# --- the webhook deliverer against a local receiver -------------------------------------------


@dataclass
class Receiver:
    """A webhook endpoint that answers with scripted statuses and keeps what it got."""

    statuses: deque[int] = field(default_factory=deque)
    default_status: int = 200
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        self.got.set()
        status = self.statuses.popleft() if self.statuses else self.default_status
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": "/elsewhere"})
        return web.Response(status=status)


@pytest.fixture
async def receiver(serve: Callable[[web.Application], Awaitable[TestServer]]) -> Receiver:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/payments", rec.handle)
    server = await serve(app)
    rec.url = str(server.make_url("/hooks/payments"))
    return rec


SECRET = secrets.token_bytes(32)


def signer(stamps: list[int]) -> Callable[[], dict[str, str]]:
    """A headers callback that signs with a clock that moves 7 s per attempt."""

    def headers() -> dict[str, str]:
        stamp = 1_700_000_000 + 7 * len(stamps)
        stamps.append(stamp)
        return {
            SIGNATURE_HEADER: f"t={stamp},v1=" + "0" * 64,
            "X-Attempt": str(len(stamps)),
        }

    return headers


def fast_deliverer(session: aiohttp.ClientSession, **kwargs: Any) -> WebhookDeliverer:
    options: dict[str, Any] = {
        "max_attempts": 4,
        "base_delay_s": 0.01,
        "max_delay_s": 0.05,
        "attempt_timeout_s": 1.0,
    }
    options.update(kwargs)
    return WebhookDeliverer(session, **options)


async def test_delivery_retries_after_a_500_and_stops_on_2xx(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses.extend([500, 204])
    stamps: list[int] = []
    async with fast_deliverer(session) as deliverer:
        delivery = deliverer.deliver(
            receiver.url, b'{"id":"evt_1"}', event_id="evt_1", headers=signer(stamps)
        )
        assert delivery.state is DeliveryState.PENDING  # deliver() returned before any POST
        assert await delivery.wait() is DeliveryState.DELIVERED
    assert [a.status for a in delivery.attempts] == [500, 204]
    assert [a.number for a in delivery.attempts] == [1, 2]
    assert all(a.error is None for a in delivery.attempts)
    assert receiver.bodies == [b'{"id":"evt_1"}'] * 2
    # Each attempt is signed afresh, with that attempt's time.
    assert [parse_signature_header(h[SIGNATURE_HEADER]).timestamp for h in receiver.headers] == (
        stamps
    )
    assert stamps[1] - stamps[0] == 7
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert deliverer.in_flight == 0


async def test_delivery_gives_up_after_max_attempts(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.default_status = 503
    async with fast_deliverer(session, max_attempts=3) as deliverer:
        delivery = deliverer.deliver(receiver.url, b"{}", event_id="evt_2", headers=dict)
        await deliverer.drain()
    assert delivery.state is DeliveryState.GAVE_UP
    assert [a.status for a in delivery.attempts] == [503, 503, 503]
    assert len(receiver.bodies) == 3


async def test_redirect_counts_as_a_failure(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses.extend([301, 200])
    async with fast_deliverer(session) as deliverer:
        delivery = deliverer.deliver(receiver.url, b"{}", event_id="evt_3", headers=dict)
        assert await delivery.wait() is DeliveryState.DELIVERED
    assert [a.status for a in delivery.attempts] == [301, 200]


async def test_unreachable_endpoint_records_the_error(session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{unused_port()}/hooks"
    async with fast_deliverer(session, max_attempts=2) as deliverer:
        delivery = deliverer.deliver(url, b"{}", event_id="evt_4", headers=dict)
        assert await delivery.wait() is DeliveryState.GAVE_UP
    assert [a.status for a in delivery.attempts] == [None, None]
    assert all(a.error and "ClientConnectorError" in a.error for a in delivery.attempts)


async def test_slow_endpoint_times_out_per_attempt(
    session: aiohttp.ClientSession, serve: Callable[[web.Application], Awaitable[TestServer]]
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response()

    app = web.Application()
    app.router.add_post("/slow", slow)
    server = await serve(app)
    async with fast_deliverer(session, max_attempts=1, attempt_timeout_s=0.1) as deliverer:
        delivery = deliverer.deliver(
            str(server.make_url("/slow")), b"{}", event_id="evt_5", headers=dict
        )
        assert await delivery.wait() is DeliveryState.GAVE_UP
    assert delivery.attempts[0].error is not None
    assert "Timeout" in delivery.attempts[0].error


async def test_close_cancels_unfinished_deliveries(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.default_status = 500
    deliverer = fast_deliverer(session, max_attempts=50, base_delay_s=10, max_delay_s=10)
    delivery = deliverer.deliver(receiver.url, b"{}", event_id="evt_6", headers=dict)
    await receiver.got.wait()
    await deliverer.aclose()
    assert delivery.state is DeliveryState.CANCELLED
    assert await delivery.wait() is DeliveryState.CANCELLED
    with pytest.raises(RuntimeError, match="closed"):
        deliverer.deliver(receiver.url, b"{}", event_id="evt_7", headers=dict)


async def test_a_failing_headers_callback_gives_up_instead_of_hanging(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("signing key unavailable")

    async with fast_deliverer(session) as deliverer:
        delivery = deliverer.deliver(receiver.url, b"{}", event_id="evt_8", headers=broken)
        assert await delivery.wait() is DeliveryState.GAVE_UP
    assert receiver.bodies == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"base_delay_s": -1}, "delays"),
        ({"base_delay_s": 2, "max_delay_s": 1}, "delays"),
        ({"attempt_timeout_s": 0}, "attempt_timeout_s"),
    ],
)
async def test_deliverer_refuses_bad_settings(
    session: aiohttp.ClientSession, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WebhookDeliverer(session, **kwargs)


# --- the sandbox end to end: create → delay → signed webhook → verified --------------------


@dataclass
class Endpoint:
    """Our side: a webhook endpoint verifying with the sandbox's parse_webhook."""

    sandbox: SandboxProvider | None = None
    events: list[WebhookEvent] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    fail_first: int = 0
    arrived: asyncio.Queue[WebhookEvent] = field(default_factory=asyncio.Queue)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.sandbox is not None
        body = await request.read()
        try:
            event = self.sandbox.parse_webhook(request.headers, body, datetime.now(UTC))
        except WebhookError as exc:
            self.rejected.append(str(exc))
            return web.Response(status=400)
        if self.fail_first:
            self.fail_first -= 1
            return web.Response(status=500)  # say, the database was down
        self.events.append(event)
        self.arrived.put_nowait(event)
        return web.Response(status=200)


@pytest.fixture
async def live_sandbox(
    session: aiohttp.ClientSession, serve: Callable[[web.Application], Awaitable[TestServer]]
) -> AsyncIterator[tuple[SandboxProvider, Endpoint, WebhookDeliverer]]:
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_post("/v1/webhooks/sandbox", endpoint.handle)
    server = await serve(app)
    async with (
        fast_deliverer(session) as deliverer,
        SandboxProvider(
            secret=SECRET,
            webhook_url=str(server.make_url("/v1/webhooks/sandbox")),
            deliverer=deliverer,
            completion_delay_s=0.02,
        ) as sandbox,
    ):
        endpoint.sandbox = sandbox
        yield sandbox, endpoint, deliverer


async def next_event(endpoint: Endpoint) -> WebhookEvent:
    async with asyncio.timeout(5):
        return await endpoint.arrived.get()


async def test_sandbox_success_arrives_as_a_verified_webhook(
    live_sandbox: tuple[SandboxProvider, Endpoint, WebhookDeliverer],
) -> None:
    sandbox, endpoint, _ = live_sandbox
    assert sandbox.asynchronous is True
    intent = await sandbox.create_payment(
        PaymentRequest(
            idempotency_key="k1", account_ref="acct-1", amount_minor=2500, currency="EUR"
        )
    )
    assert intent.status is PaymentStatus.PENDING
    event = await next_event(endpoint)
    assert (event.provider_payment_id, event.status, event.amount_minor) == (
        intent.provider_payment_id,
        PaymentStatus.SUCCEEDED,
        2500,
    )
    assert (await sandbox.get_payment(intent.provider_payment_id)).status is (
        PaymentStatus.SUCCEEDED
    )
    assert endpoint.rejected == []


async def test_sandbox_decline_arrives_as_payment_failed(
    live_sandbox: tuple[SandboxProvider, Endpoint, WebhookDeliverer],
) -> None:
    sandbox, endpoint, _ = live_sandbox
    await sandbox.create_payment(
        PaymentRequest(
            idempotency_key="k2", account_ref="acct-1", amount_minor=2502, currency="EUR"
        )
    )
    event = await next_event(endpoint)
    assert (event.type, event.status) == ("payment.failed", PaymentStatus.FAILED)


async def test_sandbox_requires_action_waits_for_the_customer(
    live_sandbox: tuple[SandboxProvider, Endpoint, WebhookDeliverer],
) -> None:
    sandbox, endpoint, deliverer = live_sandbox
    intent = await sandbox.create_payment(
        PaymentRequest(
            idempotency_key="k3", account_ref="acct-1", amount_minor=2503, currency="EUR"
        )
    )
    assert intent.status is PaymentStatus.REQUIRES_ACTION
    await asyncio.sleep(0.1)  # five completion delays: nothing may happen meanwhile
    assert endpoint.events == []
    assert deliverer.in_flight == 0
    sandbox.authenticate(intent.provider_payment_id, approve=True)
    event = await next_event(endpoint)
    assert event.status is PaymentStatus.SUCCEEDED


async def test_sandbox_webhook_is_redelivered_after_our_500(
    live_sandbox: tuple[SandboxProvider, Endpoint, WebhookDeliverer],
) -> None:
    sandbox, endpoint, deliverer = live_sandbox
    endpoint.fail_first = 1
    await sandbox.create_payment(
        PaymentRequest(
            idempotency_key="k4", account_ref="acct-1", amount_minor=2600, currency="EUR"
        )
    )
    event = await next_event(endpoint)
    await deliverer.drain()
    assert endpoint.events == [event]
    assert endpoint.rejected == []


async def test_manual_complete_in_async_mode_sends_once(
    live_sandbox: tuple[SandboxProvider, Endpoint, WebhookDeliverer],
) -> None:
    sandbox, endpoint, deliverer = live_sandbox
    intent = await sandbox.create_payment(
        PaymentRequest(
            idempotency_key="k5", account_ref="acct-1", amount_minor=2504, currency="EUR"
        )
    )
    webhook = sandbox.complete(intent.provider_payment_id)  # the stalled payment, pushed along
    event = await next_event(endpoint)
    again = sandbox.complete(intent.provider_payment_id)  # a redelivery for the caller only
    await deliverer.drain()
    assert again.body == webhook.body
    assert endpoint.events == [event]
    verify_signature(
        webhook.headers[SIGNATURE_HEADER],
        webhook.body,
        secrets=[SECRET],
        now=datetime.now(UTC),
    )


async def test_complete_before_the_timer_cancels_it(
    live_sandbox: tuple[SandboxProvider, Endpoint, WebhookDeliverer],
) -> None:
    sandbox, endpoint, deliverer = live_sandbox
    intent = await sandbox.create_payment(
        PaymentRequest(
            idempotency_key="k6", account_ref="acct-1", amount_minor=2700, currency="EUR"
        )
    )
    sandbox.complete(intent.provider_payment_id)
    await next_event(endpoint)
    await asyncio.sleep(0.1)
    await deliverer.drain()
    assert len(endpoint.events) == 1  # the timer did not send a second, different event


async def test_closing_the_sandbox_cancels_pending_completions(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    async with fast_deliverer(session) as deliverer:
        sandbox = SandboxProvider(
            secret=SECRET, webhook_url=receiver.url, deliverer=deliverer, completion_delay_s=10
        )
        intent = await sandbox.create_payment(
            PaymentRequest(
                idempotency_key="k7", account_ref="acct-1", amount_minor=2800, currency="EUR"
            )
        )
        await sandbox.aclose()
        assert (await sandbox.get_payment(intent.provider_payment_id)).status is (
            PaymentStatus.PENDING
        )
    assert receiver.bodies == []
