"""The sandbox provider in synchronous mode: magic amounts, idempotency, signed webhooks."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backend.payments.base import PaymentProvider, PaymentRequest, PaymentStatus
from backend.payments.errors import (
    PaymentConflictError,
    PaymentNotFoundError,
    PaymentProviderError,
    PaymentStateError,
    UnhandledWebhookEventError,
    WebhookMalformedError,
    WebhookSignatureError,
    WebhookTooOldError,
)
from backend.payments.sandbox import (
    SIGNATURE_HEADER,
    SandboxOutcome,
    SandboxProvider,
    SignedWebhook,
    magic_outcome,
)
from backend.payments.webhooks import format_signature_header, parse_signature_header

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def secret() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def sandbox(secret: bytes, clock: Clock) -> SandboxProvider:
    return SandboxProvider(secret=secret, clock=clock)


def req(amount_minor: int = 1000, key: str = "topup-1", **overrides: Any) -> PaymentRequest:
    fields: dict[str, Any] = {
        "idempotency_key": key,
        "account_ref": "acct-42",
        "amount_minor": amount_minor,
        "currency": "EUR",
        "description": "Prepaid electricity",
        "metadata": {"meter": "M-1"},
    }
    fields.update(overrides)
    return PaymentRequest(**fields)


def sign(secret: bytes, body: bytes, when: datetime = T0) -> dict[str, str]:
    return {
        SIGNATURE_HEADER: format_signature_header(
            body, timestamp=int(when.timestamp()), secrets=[secret]
        )
    }


def test_sandbox_satisfies_the_provider_protocol(sandbox: SandboxProvider) -> None:
    provider: PaymentProvider = sandbox
    assert provider.name == "sandbox"
    assert sandbox.asynchronous is False


@pytest.mark.parametrize(
    ("amount", "outcome"),
    [
        (1000, SandboxOutcome.SUCCEED),
        (1001, SandboxOutcome.SUCCEED),
        (1002, SandboxOutcome.DECLINE),
        (2, SandboxOutcome.DECLINE),
        (99902, SandboxOutcome.DECLINE),
        (1003, SandboxOutcome.REQUIRE_ACTION),
        (1004, SandboxOutcome.STALL),
        (1005, SandboxOutcome.SUCCEED),
        (1009, SandboxOutcome.UNAVAILABLE),
        (1012, SandboxOutcome.SUCCEED),
        (1102, SandboxOutcome.DECLINE),
    ],
)
def test_magic_amounts_by_last_two_digits(amount: int, outcome: SandboxOutcome) -> None:
    assert magic_outcome(amount) is outcome


async def test_success_pending_then_signed_succeeded_webhook(
    sandbox: SandboxProvider, clock: Clock
) -> None:
    intent = await sandbox.create_payment(req())
    assert intent.status is PaymentStatus.PENDING
    assert intent.provider == "sandbox"
    assert intent.provider_payment_id.startswith("sbx_pay_")
    assert intent.client_secret is not None
    assert intent.client_secret.startswith(f"{intent.provider_payment_id}_secret_")
    assert intent.next_action_url is None
    assert (intent.amount_minor, intent.currency) == (1000, "EUR")
    assert await sandbox.get_payment(intent.provider_payment_id) == intent

    clock.now = T0 + timedelta(seconds=2)
    webhook = sandbox.complete(intent.provider_payment_id)
    event = sandbox.parse_webhook(webhook.headers, webhook.body, clock.now)
    assert event.provider == "sandbox"
    assert event.type == "payment.succeeded"
    assert event.status is PaymentStatus.SUCCEEDED
    assert event.provider_payment_id == intent.provider_payment_id
    assert (event.amount_minor, event.currency) == (1000, "EUR")
    assert event.created_at == T0 + timedelta(seconds=2)
    assert event.event_id.startswith("evt_sbx_")
    assert event.raw == webhook.body
    assert (await sandbox.get_payment(intent.provider_payment_id)).status is (
        PaymentStatus.SUCCEEDED
    )


async def test_webhook_body_looks_like_a_provider_event(sandbox: SandboxProvider) -> None:
    intent = await sandbox.create_payment(req())
    body = json.loads(sandbox.complete(intent.provider_payment_id).body)
    assert body["object"] == "event"
    assert body["data"]["object"] == {
        "id": intent.provider_payment_id,
        "object": "payment",
        "amount": 1000,
        "currency": "EUR",
        "status": "succeeded",
        "account_ref": "acct-42",
        "idempotency_key": "topup-1",
        "metadata": {"meter": "M-1"},
    }


async def test_signature_header_is_stripes_format_under_our_name(
    sandbox: SandboxProvider, secret: bytes
) -> None:
    intent = await sandbox.create_payment(req())
    webhook = sandbox.complete(intent.provider_payment_id)
    assert list(webhook.headers) == ["Voltcredit-Signature"]
    assert webhook.headers["Voltcredit-Signature"] == format_signature_header(
        webhook.body, timestamp=int(T0.timestamp()), secrets=[secret]
    )


async def test_declined_amount_fails_with_payment_failed(sandbox: SandboxProvider) -> None:
    intent = await sandbox.create_payment(req(1002))
    assert intent.status is PaymentStatus.PENDING  # a decline is only known later
    webhook = sandbox.complete(intent.provider_payment_id)
    event = sandbox.parse_webhook(webhook.headers, webhook.body, T0)
    assert (event.type, event.status) == ("payment.failed", PaymentStatus.FAILED)
    assert (await sandbox.get_payment(intent.provider_payment_id)).status is PaymentStatus.FAILED


@pytest.mark.parametrize(
    ("approve", "final", "event_type"),
    [
        (True, PaymentStatus.SUCCEEDED, "payment.succeeded"),
        (False, PaymentStatus.FAILED, "payment.failed"),
    ],
)
async def test_requires_action_until_the_customer_authenticates(
    sandbox: SandboxProvider, approve: bool, final: PaymentStatus, event_type: str
) -> None:
    intent = await sandbox.create_payment(req(1003))
    pid = intent.provider_payment_id
    assert intent.status is PaymentStatus.REQUIRES_ACTION
    assert intent.next_action_url == f"/sandbox/payments/{pid}/authenticate"
    with pytest.raises(PaymentStateError, match="authenticate"):
        sandbox.complete(pid)

    after = sandbox.authenticate(pid, approve=approve)
    assert (after.status, after.next_action_url) == (PaymentStatus.PENDING, None)
    with pytest.raises(PaymentStateError, match="not requires_action"):
        sandbox.authenticate(pid, approve=True)

    webhook = sandbox.complete(pid)
    event = sandbox.parse_webhook(webhook.headers, webhook.body, T0)
    assert (event.status, event.type) == (final, event_type)


async def test_action_url_template_is_configurable(secret: bytes) -> None:
    sandbox = SandboxProvider(
        secret=secret, action_url_template="https://pay.example/3ds/{payment_id}"
    )
    intent = await sandbox.create_payment(req(1003))
    assert intent.next_action_url == f"https://pay.example/3ds/{intent.provider_payment_id}"


async def test_stalled_amount_stays_pending_until_completed(sandbox: SandboxProvider) -> None:
    intent = await sandbox.create_payment(req(1004))
    assert (await sandbox.get_payment(intent.provider_payment_id)).status is PaymentStatus.PENDING
    webhook = sandbox.complete(intent.provider_payment_id)
    assert sandbox.parse_webhook(webhook.headers, webhook.body, T0).status is (
        PaymentStatus.SUCCEEDED
    )


async def test_unavailable_amount_raises_retryable_and_records_nothing(
    sandbox: SandboxProvider,
) -> None:
    with pytest.raises(PaymentProviderError) as caught:
        await sandbox.create_payment(req(1009))
    assert (caught.value.retryable, caught.value.status, caught.value.provider) == (
        True,
        503,
        "sandbox",
    )
    assert caught.value.code == "sandbox_unavailable"
    # Nothing was recorded under the key, so a corrected request with it goes through.
    assert (await sandbox.create_payment(req(1000))).status is PaymentStatus.PENDING


async def test_repeated_create_replays_the_first_answer(sandbox: SandboxProvider) -> None:
    first = await sandbox.create_payment(req())
    again = await sandbox.create_payment(req())
    assert again == first
    sandbox.complete(first.provider_payment_id)
    # Like Stripe: the replay is the first response; get_payment has the current state.
    assert await sandbox.create_payment(req()) == first
    assert (await sandbox.get_payment(first.provider_payment_id)).status is (
        PaymentStatus.SUCCEEDED
    )


@pytest.mark.parametrize(
    "changed",
    [{"amount_minor": 1001}, {"currency": "USD"}, {"account_ref": "other"}, {"metadata": {}}],
)
async def test_same_key_different_content_is_a_conflict(
    sandbox: SandboxProvider, changed: dict[str, Any]
) -> None:
    await sandbox.create_payment(req())
    with pytest.raises(PaymentConflictError, match="topup-1"):
        await sandbox.create_payment(req(**changed))


async def test_different_keys_make_different_payments(sandbox: SandboxProvider) -> None:
    a = await sandbox.create_payment(req(key="a"))
    b = await sandbox.create_payment(req(key="b"))
    assert a.provider_payment_id != b.provider_payment_id
    assert a.client_secret != b.client_secret


async def test_completing_twice_redelivers_the_same_event_freshly_signed(
    sandbox: SandboxProvider, clock: Clock
) -> None:
    intent = await sandbox.create_payment(req())
    first = sandbox.complete(intent.provider_payment_id)
    clock.now = T0 + timedelta(hours=1)
    second = sandbox.complete(intent.provider_payment_id)
    assert second.body == first.body  # same event id, same content
    t1 = parse_signature_header(first.headers[SIGNATURE_HEADER]).timestamp
    t2 = parse_signature_header(second.headers[SIGNATURE_HEADER]).timestamp
    assert t2 - t1 == 3600
    # The redelivery verifies an hour later; the first signature no longer would.
    assert sandbox.parse_webhook(second.headers, second.body, clock.now).event_id == (
        sandbox.parse_webhook(first.headers, first.body, T0).event_id
    )
    with pytest.raises(WebhookTooOldError):
        sandbox.parse_webhook(first.headers, first.body, clock.now)


async def test_unknown_payment_id_is_not_found(sandbox: SandboxProvider) -> None:
    with pytest.raises(PaymentNotFoundError) as caught:
        await sandbox.get_payment("sbx_pay_nope")
    assert (caught.value.provider, caught.value.provider_payment_id) == ("sandbox", "sbx_pay_nope")
    with pytest.raises(PaymentNotFoundError):
        sandbox.complete("sbx_pay_nope")
    with pytest.raises(PaymentNotFoundError):
        sandbox.authenticate("sbx_pay_nope", approve=True)


# --- parse_webhook rejections ----------------------------------------------------------------


@pytest.fixture
async def completed(sandbox: SandboxProvider) -> SignedWebhook:
    intent = await sandbox.create_payment(req())
    return sandbox.complete(intent.provider_payment_id)


def test_header_name_is_case_insensitive(
    sandbox: SandboxProvider, completed: SignedWebhook
) -> None:
    headers = {"voltcredit-signature": completed.headers[SIGNATURE_HEADER]}
    assert sandbox.parse_webhook(headers, completed.body, T0).status is PaymentStatus.SUCCEEDED


def test_stripe_header_name_is_not_ours(sandbox: SandboxProvider, completed: SignedWebhook) -> None:
    headers = {"Stripe-Signature": completed.headers[SIGNATURE_HEADER]}
    with pytest.raises(WebhookSignatureError, match="no signature header"):
        sandbox.parse_webhook(headers, completed.body, T0)


def test_tampered_body_is_rejected(sandbox: SandboxProvider, completed: SignedWebhook) -> None:
    body = completed.body.replace(b'"amount":1000', b'"amount":9000')
    assert body != completed.body
    with pytest.raises(WebhookSignatureError):
        sandbox.parse_webhook(completed.headers, body, T0)


def test_another_sandboxs_secret_is_rejected(clock: Clock, completed: SignedWebhook) -> None:
    stranger = SandboxProvider(secret=secrets.token_bytes(32), clock=clock)
    with pytest.raises(WebhookSignatureError):
        stranger.parse_webhook(completed.headers, completed.body, T0)


@pytest.mark.parametrize("offset_s", [301, -301])
def test_outside_the_window_is_rejected(
    sandbox: SandboxProvider, completed: SignedWebhook, offset_s: int
) -> None:
    with pytest.raises(WebhookTooOldError):
        sandbox.parse_webhook(completed.headers, completed.body, T0 + timedelta(seconds=offset_s))


def test_tolerance_is_configurable(secret: bytes, clock: Clock) -> None:
    sandbox = SandboxProvider(secret=secret, clock=clock, tolerance_s=10)
    body = json.dumps({"id": "evt_1", "type": "payment.refunded", "created": 1}).encode()
    with pytest.raises(WebhookTooOldError):
        sandbox.parse_webhook(sign(secret, body), body, T0 + timedelta(seconds=11))


def test_unhandled_event_type_is_told_apart(sandbox: SandboxProvider, secret: bytes) -> None:
    body = json.dumps({"id": "evt_x", "type": "payment.refunded", "created": 1}).encode()
    with pytest.raises(UnhandledWebhookEventError) as caught:
        sandbox.parse_webhook(sign(secret, body), body, T0)
    assert (caught.value.event_id, caught.value.event_type) == ("evt_x", "payment.refunded")


def good_event(**payment: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": "sbx_pay_1", "amount": 1000, "currency": "EUR"}
    obj.update(payment)
    return {"id": "evt_1", "type": "payment.succeeded", "created": 1, "data": {"object": obj}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        ({"type": "payment.succeeded", "created": 1}, r"event\.id"),
        ({"id": "evt_1", "created": 1}, r"event\.type"),
        ({"id": "evt_1", "type": "payment.succeeded", "created": "1"}, r"event\.created"),
        ({"id": "evt_1", "type": "payment.succeeded", "created": 1}, r"event\.data"),
        (
            {"id": "evt_1", "type": "payment.succeeded", "created": 1, "data": {}},
            r"event\.data\.object",
        ),
        (good_event(id=None), r"object\.id"),
        (good_event(amount=True), r"object\.amount"),
        (good_event(amount=-5), "amount_minor"),
        (good_event(currency="eur"), "currency"),
        ({**good_event(), "created": 10**20}, "evt_1"),
    ],
)
def test_malformed_but_signed_bodies_are_rejected(
    sandbox: SandboxProvider, secret: bytes, body: bytes | dict[str, Any], message: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(WebhookMalformedError, match=message):
        sandbox.parse_webhook(sign(secret, raw), raw, T0)


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secret": b""}, "secret"),
        ({"webhook_url": "http://127.0.0.1/hook"}, "both"),
        ({"completion_delay_s": -1}, "completion_delay_s"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"secret": b"s"}
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SandboxProvider(**options)


async def test_closing_a_synchronous_sandbox_is_harmless(secret: bytes) -> None:
    async with SandboxProvider(secret=secret) as sandbox:
        await sandbox.create_payment(req())
    assert (await sandbox.create_payment(req())).status is PaymentStatus.PENDING
