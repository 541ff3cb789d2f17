"""The Stripe adapter's pure parts: the status table and ``Stripe-Signature`` webhooks."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from backend.payments.base import PaymentProvider, PaymentStatus
from backend.payments.errors import (
    UnhandledWebhookEventError,
    WebhookMalformedError,
    WebhookSignatureError,
    WebhookTooOldError,
)
from backend.payments.stripe import (
    STRIPE_EVENT_STATUS,
    STRIPE_STATUS_MAP,
    StripeProvider,
    map_stripe_status,
)
from backend.payments.webhooks import format_signature_header

# The documented example event's time and PaymentIntent (docs.stripe.com/api/events/object,
# docs.stripe.com/api/payment_intents/object), trimmed to the fields that matter here.
CREATED = 1680064028
NOW = datetime.fromtimestamp(CREATED + 5, UTC)
PAYMENT_INTENT: dict[str, Any] = {
    "id": "pi_3MtwBwLkdIwHu7ix28a3tqPa",
    "object": "payment_intent",
    "amount": 2000,
    "amount_received": 2000,
    "client_secret": "pi_3MtwBwLkdIwHu7ix28a3tqPa_secret_YrKJUKribcBjcG8HVhfZluoGH",
    "created": 1680800504,
    "currency": "usd",
    "last_payment_error": None,
    "livemode": False,
    "metadata": {"account_ref": "acct-42"},
    "next_action": None,
    "status": "succeeded",
}


def stripe_event(event_type: str, **intent: Any) -> dict[str, Any]:
    obj = copy.deepcopy(PAYMENT_INTENT)
    obj.update(intent)
    return {
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "object": "event",
        "api_version": "2019-02-19",
        "created": CREATED,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 0,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


@pytest.fixture
def webhook_secret() -> str:
    return "whsec_" + secrets.token_hex(16)


@pytest.fixture
async def stripe(webhook_secret: str) -> AsyncIterator[StripeProvider]:
    # The session is never used by parse_webhook; no request leaves the process here.
    async with aiohttp.ClientSession() as session:
        yield StripeProvider(
            api_key="sk_test_" + secrets.token_hex(12),
            webhook_secret=webhook_secret,
            session=session,
        )


def signed(
    secret: str, event: dict[str, Any] | bytes, when: int = CREATED
) -> tuple[dict[str, str], bytes]:
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    header = format_signature_header(body, timestamp=when, secrets=[secret.encode()])
    return {"Stripe-Signature": header}, body


# --- status table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "has_error", "expected"),
    [
        ("requires_payment_method", False, PaymentStatus.PENDING),
        ("requires_payment_method", True, PaymentStatus.FAILED),
        ("requires_confirmation", False, PaymentStatus.PENDING),
        ("requires_action", False, PaymentStatus.REQUIRES_ACTION),
        ("requires_action", True, PaymentStatus.REQUIRES_ACTION),
        ("processing", False, PaymentStatus.PENDING),
        ("requires_capture", False, PaymentStatus.PENDING),
        ("succeeded", False, PaymentStatus.SUCCEEDED),
        ("succeeded", True, PaymentStatus.SUCCEEDED),
        ("canceled", False, PaymentStatus.CANCELED),
        ("canceled", True, PaymentStatus.CANCELED),
    ],
)
def test_status_mapping_table(status: str, has_error: bool, expected: PaymentStatus) -> None:
    assert map_stripe_status(status, has_payment_error=has_error) is expected


def test_table_covers_exactly_the_documented_statuses() -> None:
    assert set(STRIPE_STATUS_MAP) == {
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "processing",
        "requires_capture",
        "succeeded",
        "canceled",
    }


@pytest.mark.parametrize("status", ["failed", "", "SUCCEEDED"])
def test_unknown_status_is_refused(status: str) -> None:
    with pytest.raises(ValueError, match="unknown PaymentIntent status"):
        map_stripe_status(status)


# --- webhooks --------------------------------------------------------------------------------


def test_adapter_satisfies_the_provider_protocol(stripe: StripeProvider) -> None:
    provider: PaymentProvider = stripe
    assert provider.name == "stripe"


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("payment_intent.succeeded", PaymentStatus.SUCCEEDED),
        ("payment_intent.payment_failed", PaymentStatus.FAILED),
        ("payment_intent.canceled", PaymentStatus.CANCELED),
    ],
)
def test_payment_intent_events_are_mapped(
    stripe: StripeProvider, webhook_secret: str, event_type: str, status: PaymentStatus
) -> None:
    headers, body = signed(webhook_secret, stripe_event(event_type))
    event = stripe.parse_webhook(headers, body, NOW)
    assert event.provider == "stripe"
    assert event.event_id == "evt_1NG8Du2eZvKYlo2CUI79vXWy"
    assert event.type == event_type
    assert event.status is status
    assert event.provider_payment_id == "pi_3MtwBwLkdIwHu7ix28a3tqPa"
    assert (event.amount_minor, event.currency) == (2000, "USD")
    assert event.created_at == datetime.fromtimestamp(CREATED, UTC)
    assert event.raw == body


def test_event_table_is_the_three_we_act_on() -> None:
    assert set(STRIPE_EVENT_STATUS) == {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
    }


def test_header_lookup_ignores_case(stripe: StripeProvider, webhook_secret: str) -> None:
    headers, body = signed(webhook_secret, stripe_event("payment_intent.succeeded"))
    lower = {"stripe-signature": headers["Stripe-Signature"]}
    assert stripe.parse_webhook(lower, body, NOW).status is PaymentStatus.SUCCEEDED


@pytest.mark.parametrize(
    "event_type", ["payment_intent.created", "payment_intent.processing", "charge.succeeded"]
)
def test_other_event_types_are_unhandled_not_rejected(
    stripe: StripeProvider, webhook_secret: str, event_type: str
) -> None:
    headers, body = signed(webhook_secret, stripe_event(event_type, object="charge"))
    with pytest.raises(UnhandledWebhookEventError) as caught:
        stripe.parse_webhook(headers, body, NOW)
    assert caught.value.event_type == event_type
    assert caught.value.provider == "stripe"


def test_wrong_secret_is_rejected(stripe: StripeProvider) -> None:
    headers, body = signed(
        "whsec_" + secrets.token_hex(16), stripe_event("payment_intent.succeeded")
    )
    with pytest.raises(WebhookSignatureError):
        stripe.parse_webhook(headers, body, NOW)


def test_sandbox_header_name_is_not_stripes(stripe: StripeProvider, webhook_secret: str) -> None:
    headers, body = signed(webhook_secret, stripe_event("payment_intent.succeeded"))
    with pytest.raises(WebhookSignatureError, match="no signature header"):
        stripe.parse_webhook({"Voltcredit-Signature": headers["Stripe-Signature"]}, body, NOW)


def test_stale_delivery_is_rejected(stripe: StripeProvider, webhook_secret: str) -> None:
    headers, body = signed(webhook_secret, stripe_event("payment_intent.succeeded"))
    with pytest.raises(WebhookTooOldError):
        stripe.parse_webhook(headers, body, NOW + timedelta(seconds=300))


def test_tolerance_is_configurable(webhook_secret: str) -> None:
    provider = StripeProvider(
        api_key="sk_test_x",
        webhook_secret=webhook_secret,
        session=None,  # type: ignore[arg-type]  # parse_webhook needs no session
        tolerance_s=3600,
    )
    headers, body = signed(webhook_secret, stripe_event("payment_intent.succeeded"))
    assert provider.parse_webhook(headers, body, NOW + timedelta(minutes=30)).event_id


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (b"{", "not valid JSON"),
        ({"type": "payment_intent.succeeded", "created": 1}, r"event\.id"),
        ({"id": "evt_1", "type": "payment_intent.succeeded"}, r"event\.created"),
        ({"id": "evt_1", "type": "payment_intent.succeeded", "created": 1}, r"event\.data"),
        (stripe_event("payment_intent.succeeded", object="charge"), "must be 'payment_intent'"),
        (stripe_event("payment_intent.succeeded", id=""), r"object\.id"),
        (stripe_event("payment_intent.succeeded", amount="2000"), r"object\.amount"),
        (stripe_event("payment_intent.succeeded", currency=None), r"object\.currency"),
        (stripe_event("payment_intent.succeeded", currency="dollars"), "currency"),
    ],
)
def test_malformed_but_signed_events_are_rejected(
    stripe: StripeProvider, webhook_secret: str, event: dict[str, Any] | bytes, message: str
) -> None:
    headers, body = signed(webhook_secret, event)
    with pytest.raises(WebhookMalformedError, match=message):
        stripe.parse_webhook(headers, body, NOW)


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "webhook_secret", "message"),
    [("", "whsec_x", "API key"), ("sk_test_x", "", "webhook secret")],
)
def test_empty_keys_are_refused(api_key: str, webhook_secret: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StripeProvider(api_key=api_key, webhook_secret=webhook_secret, session=None)  # type: ignore[arg-type]


def test_repr_never_shows_the_key() -> None:
    key, hook_secret = secrets.token_hex(16), secrets.token_hex(16)
    provider = StripeProvider(
        api_key=key,
        webhook_secret=hook_secret,
        session=None,  # type: ignore[arg-type]
        base_url="http://127.0.0.1:1/",
    )
    assert key not in repr(provider)
    assert hook_secret not in repr(provider)
    assert "http://127.0.0.1:1'" in repr(provider)
