"""Payment value types: construction rules for requests, intents and events; the JSON readers."""

from __future__ import annotations

import secrets
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime
from typing import Any

import pytest

from backend.errors import BackendError
from backend.payments.base import (
    MAX_METADATA_KEYS,
    PaymentIntent,
    PaymentRequest,
    PaymentStatus,
    WebhookEvent,
    get_int,
    get_object,
    get_optional_str,
    get_str,
    json_object,
)
from backend.payments.errors import (
    InvalidPaymentRequestError,
    PaymentError,
    WebhookError,
    WebhookMalformedError,
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def request(**overrides: Any) -> PaymentRequest:
    fields: dict[str, Any] = {
        "idempotency_key": "topup-7f3a",
        "account_ref": "acct-42",
        "amount_minor": 1000,
        "currency": "EUR",
        "description": "Prepaid electricity",
        "metadata": {"meter": "M-1"},
    }
    fields.update(overrides)
    return PaymentRequest(**fields)


def test_errors_hang_under_the_backend_root() -> None:
    assert issubclass(PaymentError, BackendError)
    assert issubclass(WebhookMalformedError, WebhookError)
    assert issubclass(InvalidPaymentRequestError, PaymentError)


def test_status_values_are_stable_strings() -> None:
    assert [str(s) for s in PaymentStatus] == [
        "pending",
        "requires_action",
        "succeeded",
        "failed",
        "canceled",
    ]


def test_valid_request_keeps_its_fields_and_freezes_metadata() -> None:
    source = {"meter": "M-1"}
    req = request(metadata=source)
    source["meter"] = "changed"
    assert req.metadata == {"meter": "M-1"}
    with pytest.raises(TypeError):
        req.metadata["x"] = "y"  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        req.amount_minor = 1  # type: ignore[misc]


def test_request_defaults_and_equality() -> None:
    bare = PaymentRequest(idempotency_key="k", account_ref="a", amount_minor=1, currency="USD")
    assert bare.description == ""
    assert dict(bare.metadata) == {}
    assert request() == request()
    assert request() != request(amount_minor=1001)
    assert request(metadata={"a": "1"}) != request(metadata={"a": "2"})
    assert hash(request()) == hash(request())


def test_longest_allowed_values_pass() -> None:
    req = request(
        idempotency_key="k" * 255,
        account_ref="a" * 500,
        amount_minor=2**63 - 1,
        metadata={f"k{i}": "v" * 500 for i in range(MAX_METADATA_KEYS)},
    )
    assert len(req.metadata) == MAX_METADATA_KEYS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"idempotency_key": "has space"}, "idempotency_key"),
        ({"idempotency_key": "line\r\nbreak"}, "idempotency_key"),
        ({"idempotency_key": "clé"}, "idempotency_key"),
        ({"idempotency_key": 5}, "idempotency_key"),
        ({"account_ref": ""}, "account_ref"),
        ({"account_ref": "a" * 501}, "account_ref"),
        ({"account_ref": None}, "account_ref"),
        ({"amount_minor": 0}, "amount_minor"),
        ({"amount_minor": -1}, "amount_minor"),
        ({"amount_minor": 2**63}, "amount_minor"),
        ({"amount_minor": 10.0}, "amount_minor"),
        ({"amount_minor": True}, "amount_minor"),
        ({"currency": "eur"}, "currency"),
        ({"currency": "EURO"}, "currency"),
        ({"currency": "E1R"}, "currency"),
        ({"currency": None}, "currency"),
        ({"description": None}, "description"),
        ({"metadata": [("a", "b")]}, "mapping"),
        ({"metadata": {f"k{i}": "v" for i in range(51)}}, "more than 50"),
        ({"metadata": {"": "v"}}, "metadata key"),
        ({"metadata": {"k" * 41: "v"}}, "metadata key"),
        ({"metadata": {1: "v"}}, "metadata key"),
        ({"metadata": {"a[b]": "v"}}, "brackets"),
        ({"metadata": {"account_ref": "v"}}, "reserved"),
        ({"metadata": {"k": 1}}, "metadata value"),
        ({"metadata": {"k": "v" * 501}}, "metadata value"),
    ],
)
def test_request_rejections_name_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPaymentRequestError, match=message):
        request(**overrides)


def intent(**overrides: Any) -> PaymentIntent:
    fields: dict[str, Any] = {
        "provider": "sandbox",
        "provider_payment_id": "sbx_pay_1",
        "status": PaymentStatus.PENDING,
        "amount_minor": 1000,
        "currency": "EUR",
    }
    fields.update(overrides)
    return PaymentIntent(**fields)


def test_intent_optional_fields_default_to_none() -> None:
    plain = intent()
    assert (plain.client_secret, plain.next_action_url) == (None, None)
    full = intent(client_secret=secrets.token_hex(8), next_action_url="https://x/3ds")
    assert full.next_action_url == "https://x/3ds"


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"provider": ""}, ValueError, "provider"),
        ({"provider_payment_id": ""}, ValueError, "provider_payment_id"),
        ({"status": "pending"}, TypeError, "status"),
        ({"amount_minor": 0}, ValueError, "amount_minor"),
        ({"currency": "usd"}, ValueError, "currency"),
        ({"client_secret": ""}, ValueError, "client_secret"),
        ({"next_action_url": 3}, ValueError, "next_action_url"),
    ],
)
def test_intent_rejections(overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        intent(**overrides)


def event(**overrides: Any) -> WebhookEvent:
    fields: dict[str, Any] = {
        "provider": "stripe",
        "event_id": "evt_1",
        "type": "payment_intent.succeeded",
        "provider_payment_id": "pi_1",
        "status": PaymentStatus.SUCCEEDED,
        "amount_minor": 2000,
        "currency": "USD",
        "created_at": T0,
        "raw": b"{}",
    }
    fields.update(overrides)
    return WebhookEvent(**fields)


def test_event_allows_zero_amount_and_hides_raw_from_repr() -> None:
    assert event(amount_minor=0, status=PaymentStatus.FAILED).amount_minor == 0
    assert "raw" not in repr(event())


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"provider": ""}, ValueError, "provider"),
        ({"event_id": None}, ValueError, "event_id"),
        ({"type": ""}, ValueError, "type"),
        ({"provider_payment_id": ""}, ValueError, "provider_payment_id"),
        ({"status": "succeeded"}, TypeError, "status"),
        ({"amount_minor": -1}, ValueError, "amount_minor"),
        ({"currency": "US"}, ValueError, "currency"),
        ({"created_at": datetime(2026, 11, 1)}, ValueError, "timezone-aware"),  # noqa: DTZ001
        ({"created_at": 1_700_000_000}, ValueError, "timezone-aware"),
        ({"raw": "{}"}, TypeError, "raw"),
    ],
)
def test_event_rejections(overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        event(**overrides)


# --- JSON readers --------------------------------------------------------------------------


def test_json_object_parses_an_object() -> None:
    assert json_object(b'{"a": 1}', what="body", error=WebhookMalformedError) == {"a": 1}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "body is not valid JSON"),
        (b"\xff\xfe", "body is not valid JSON"),
        (b'{"a": NaN}', "body is not valid JSON"),
        (b"[1, 2]", "body is not a JSON object"),
        (b'"text"', "body is not a JSON object"),
    ],
)
def test_json_object_rejections(raw: bytes, message: str) -> None:
    with pytest.raises(WebhookMalformedError, match=message):
        json_object(raw, what="body", error=WebhookMalformedError)


OBJ: dict[str, object] = {
    "s": "x",
    "empty": "",
    "null": None,
    "n": 5,
    "b": True,
    "f": 1.5,
    "o": {"k": 1},
}


def test_field_readers_return_typed_values() -> None:
    e = WebhookMalformedError
    assert get_str(OBJ, "s", where="ev", error=e) == "x"
    assert get_int(OBJ, "n", where="ev", error=e) == 5
    assert get_object(OBJ, "o", where="ev", error=e) == {"k": 1}
    assert get_optional_str(OBJ, "s", where="ev", error=e) == "x"
    for key in ("empty", "null", "absent"):
        assert get_optional_str(OBJ, key, where="ev", error=e) is None


@pytest.mark.parametrize(
    ("reader", "key", "message"),
    [
        (get_str, "empty", r"ev\.empty must be a non-empty string"),
        (get_str, "n", r"ev\.n must be a non-empty string"),
        (get_str, "absent", r"ev\.absent must be a non-empty string"),
        (get_int, "b", r"ev\.b must be an integer"),
        (get_int, "f", r"ev\.f must be an integer"),
        (get_int, "s", r"ev\.s must be an integer"),
        (get_object, "s", r"ev\.s must be an object"),
        (get_optional_str, "n", r"ev\.n must be a string or null"),
    ],
)
def test_field_readers_name_the_bad_field(reader: Any, key: str, message: str) -> None:
    with pytest.raises(WebhookMalformedError, match=message):
        reader(OBJ, key, where="ev", error=WebhookMalformedError)
