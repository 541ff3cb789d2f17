"""Webhook signatures (Stripe's t=…,v1=… scheme): known answers, every rejection, the window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from multidict import CIMultiDict

from backend.payments.errors import (
    WebhookError,
    WebhookMalformedError,
    WebhookSignatureError,
    WebhookTooOldError,
)
from backend.payments.webhooks import (
    DEFAULT_TOLERANCE_S,
    MAX_HEADER_LEN,
    SignatureHeader,
    backoff_delay,
    compute_signature,
    format_signature_header,
    header_value,
    parse_signature_header,
    verify_signature,
)

SECRET = b"whsec_known_answer"
OTHER = b"other_secret"
T = 1492774577  # the timestamp of Stripe's documented example header
BODY = b'{"id":"evt_1","object":"event"}'
# Known answers computed independently with
#   printf '%s' '1492774577.{"id":"evt_1","object":"event"}' | openssl dgst -sha256 -hmac <key>
KAT = "c4ec483707e0180bb08856b99eb411d5c8fb3ab3452c4aa1754d7a32ae213d71"
KAT_OTHER = "7d6460337d47905fb8df856a3334983e42149b3919d64f23f843e2c3223b3846"
NOW = datetime.fromtimestamp(T, UTC)


def verify(header: str | None, body: bytes = BODY, **kwargs: Any) -> int:
    options: dict[str, Any] = {"secrets": [SECRET], "now": NOW}
    options.update(kwargs)
    return verify_signature(header, body, **options)


def test_tolerance_default_is_stripes_300_seconds() -> None:
    assert DEFAULT_TOLERANCE_S == 300


def test_signature_matches_openssl_known_answers() -> None:
    assert compute_signature(SECRET, T, BODY) == KAT
    assert compute_signature(OTHER, T, BODY) == KAT_OTHER


def test_header_has_one_v1_per_secret_in_order() -> None:
    assert format_signature_header(BODY, timestamp=T, secrets=[SECRET]) == f"t={T},v1={KAT}"
    assert (
        format_signature_header(BODY, timestamp=T, secrets=[SECRET, OTHER])
        == f"t={T},v1={KAT},v1={KAT_OTHER}"
    )


@pytest.mark.parametrize(
    ("secrets", "timestamp"), [([], T), ([SECRET], -1)], ids=["no-secret", "negative-time"]
)
def test_format_refuses_bad_arguments(secrets: list[bytes], timestamp: int) -> None:
    with pytest.raises(ValueError, match=r"secret|timestamp"):
        format_signature_header(BODY, timestamp=timestamp, secrets=secrets)


def test_parse_round_trips_the_formatted_header() -> None:
    header = format_signature_header(BODY, timestamp=T, secrets=[SECRET, OTHER])
    assert parse_signature_header(header) == SignatureHeader(T, (KAT, KAT_OTHER))


def test_parse_drops_other_schemes_and_tolerates_spaces() -> None:
    # Stripe's documented test-mode header carries a fake v0 beside the real v1.
    parsed = parse_signature_header(f"t={T}, v1={KAT}, v0=6ffbb59b2300aae63f272406069a9788")
    assert parsed == SignatureHeader(T, (KAT,))


def test_valid_signature_returns_the_signed_timestamp() -> None:
    assert verify(f"t={T},v1={KAT}") == T


def test_tampered_body_is_rejected() -> None:
    with pytest.raises(WebhookSignatureError, match="no signature matches"):
        verify(f"t={T},v1={KAT}", body=BODY.replace(b"evt_1", b"evt_2"))


def test_tampered_timestamp_is_rejected() -> None:
    # The timestamp is part of what is signed: moving it breaks the signature.
    with pytest.raises(WebhookSignatureError):
        verify(f"t={T + 1},v1={KAT}", now=NOW + timedelta(seconds=1))


def test_wrong_secret_is_rejected() -> None:
    with pytest.raises(WebhookSignatureError):
        verify(f"t={T},v1={KAT_OTHER}")


@pytest.mark.parametrize(
    "header",
    [f"t={T},v1={'0' * 64},v1={KAT}", f"t={T},v1={KAT},v1=deadbeef", f"v1=zz,v1={KAT},t={T}"],
    ids=["valid-last", "valid-first", "t-last"],
)
def test_one_valid_v1_among_several_is_enough(header: str) -> None:
    assert verify(header) == T


def test_rolled_secret_verifies_with_either_active_secret() -> None:
    header = format_signature_header(BODY, timestamp=T, secrets=[OTHER])
    assert verify(header, secrets=[SECRET, OTHER]) == T


def test_valid_v0_does_not_count_downgrade_is_refused() -> None:
    with pytest.raises(WebhookSignatureError):
        verify(f"t={T},v1={'0' * 64},v0={KAT}")


def test_missing_header_is_a_signature_error() -> None:
    with pytest.raises(WebhookSignatureError, match="no signature header"):
        verify(None)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("", "not prefix=value"),
        ("garbage", "not prefix=value"),
        (f"=1,t={T},v1={KAT}", "not prefix=value"),
        (f"t=abc,v1={KAT}", "not an integer"),
        (f"t=-5,v1={KAT}", "not an integer"),
        (f"t=+{T},v1={KAT}", "not an integer"),
        (f"t=1_0,v1={KAT}", "not an integer"),
        (f"t=,v1={KAT}", "not an integer"),
        (f"t={'9' * 16},v1={KAT}", "not an integer"),
        (f"v1={KAT}", "no timestamp"),
        (f"t={T}", "no v1 signature"),
        (f"t={T},v0={KAT}", "no v1 signature"),
        (f"t={T},t={T},v1={KAT}", "more than one timestamp"),
        (f"t={T},v1={KAT}," + "x" * MAX_HEADER_LEN, "longer than"),
    ],
    ids=[
        "empty",
        "no-equals",
        "empty-prefix",
        "t-letters",
        "t-negative",
        "t-plus",
        "t-underscore",
        "t-empty",
        "t-too-long",
        "no-t",
        "no-v1",
        "only-v0",
        "two-t",
        "huge",
    ],
)
def test_malformed_header_is_rejected_naming_the_problem(header: str, message: str) -> None:
    with pytest.raises(WebhookMalformedError, match=message):
        verify(header)


@pytest.mark.parametrize("offset", [0, 1, 299, 300, -1, -300])
def test_timestamps_within_the_window_are_accepted(offset: int) -> None:
    assert verify(f"t={T},v1={KAT}", now=NOW + timedelta(seconds=offset)) == T


def test_too_old_is_rejected() -> None:
    with pytest.raises(WebhookTooOldError, match="301 s ago"):
        verify(f"t={T},v1={KAT}", now=NOW + timedelta(seconds=301))


def test_from_the_future_beyond_tolerance_is_rejected() -> None:
    with pytest.raises(WebhookTooOldError, match="in the future"):
        verify(f"t={T},v1={KAT}", now=NOW - timedelta(seconds=301))


def test_custom_tolerance_applies() -> None:
    header = f"t={T},v1={KAT}"
    assert verify(header, now=NOW + timedelta(seconds=3600), tolerance_s=3600) == T
    with pytest.raises(WebhookTooOldError):
        verify(header, now=NOW + timedelta(seconds=11), tolerance_s=10)


def test_sub_second_now_counts_exactly() -> None:
    with pytest.raises(WebhookTooOldError):
        verify(f"t={T},v1={KAT}", now=NOW + timedelta(seconds=300, microseconds=1))


def test_now_in_another_zone_is_the_same_instant() -> None:
    now = NOW.astimezone(timezone(timedelta(hours=-5)))
    assert verify(f"t={T},v1={KAT}", now=now) == T


def test_signature_is_checked_before_the_timestamp() -> None:
    # A forged, stale header must say "bad signature": its timestamp is not to be trusted.
    with pytest.raises(WebhookSignatureError):
        verify(f"t={T},v1={KAT_OTHER}", now=NOW + timedelta(days=1))


def test_every_rejection_is_a_webhook_error() -> None:
    for header in (None, "junk", f"t={T},v1={KAT_OTHER}"):
        with pytest.raises(WebhookError):
            verify(header)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secrets": []}, "secret"),
        ({"secrets": [b""]}, "secret"),
        ({"now": datetime(2017, 4, 21, 11, 49, 37)}, "timezone-aware"),  # noqa: DTZ001
    ],
    ids=["no-secret", "empty-secret", "naive-now"],
)
def test_misconfiguration_is_a_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        verify(f"t={T},v1={KAT}", **kwargs)


def test_header_lookup_is_case_insensitive() -> None:
    assert header_value({"Stripe-Signature": "a"}, "Stripe-Signature") == "a"
    assert header_value({"stripe-signature": "b"}, "Stripe-Signature") == "b"
    assert header_value({"STRIPE-SIGNATURE": "c"}, "stripe-signature") == "c"
    assert header_value(CIMultiDict({"stripe-signature": "d"}), "Stripe-Signature") == "d"
    assert header_value({"Other": "x"}, "Stripe-Signature") is None


def test_backoff_doubles_then_caps_with_equal_jitter() -> None:
    def bounds(low: float, high: float) -> float:
        return low * 1000 + high  # encodes both ends so one assert checks the interval

    assert backoff_delay(0, base_s=1, cap_s=10, uniform=bounds) == 0.5 * 1000 + 1
    assert backoff_delay(3, base_s=1, cap_s=10, uniform=bounds) == 4 * 1000 + 8
    assert backoff_delay(4, base_s=1, cap_s=10, uniform=bounds) == 5 * 1000 + 10
    assert backoff_delay(10_000, base_s=1, cap_s=10, uniform=bounds) == 5 * 1000 + 10


def test_backoff_refuses_a_negative_retry() -> None:
    with pytest.raises(ValueError, match="retry"):
        backoff_delay(-1, base_s=1, cap_s=10, uniform=min)
