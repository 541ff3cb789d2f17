"""The payment provider interface and its value types: requests, intents, statuses, webhook events.

A top-up (DESIGN §6 step 1) asks a :class:`PaymentProvider` to create a payment, keyed by the
caller's idempotency key, and gets a :class:`PaymentIntent` back — normally still
``PENDING``: money moves later, and the provider says so with a signed webhook that
:meth:`PaymentProvider.parse_webhook` verifies and turns into a :class:`WebhookEvent`.
Crediting the ledger happens only on a verified ``SUCCEEDED`` event (or a
``get_payment`` that says so), exactly once per ``(provider, provider_payment_id)``; the
de-duplication on ``(provider, event_id)`` is the caller's database job.

Value types are frozen and validated on construction. Requests that break the rules raise
:class:`~backend.payments.errors.InvalidPaymentRequestError` (the caller's fault). Intents
and events raise :class:`ValueError` (:class:`TypeError` for a field of the wrong kind):
adapters build them from provider data they have already read field by field, and
translate a failure into the provider's error — a bad intent or event is a bug or a
misbehaving provider, never the customer's input.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final, Protocol

from backend.payments.errors import InvalidPaymentRequestError

#: Idempotency keys are HTTP header values: printable ASCII without spaces, at most 255
#: characters, Stripe's limit (https://docs.stripe.com/api/idempotent_requests).
MAX_IDEMPOTENCY_KEY_LEN: Final = 255
#: Metadata limits are Stripe's (https://docs.stripe.com/api/metadata): we keep to the
#: strictest provider so a request valid for the sandbox is valid everywhere.
MAX_METADATA_KEYS: Final = 50
MAX_METADATA_KEY_LEN: Final = 40
MAX_METADATA_VALUE_LEN: Final = 500
#: Metadata keys the adapters set themselves; a caller may not supply them.
RESERVED_METADATA_KEYS: Final = frozenset({"account_ref"})
#: Amounts are minor units in a signed 64-bit range, like the ledger's.
MAX_AMOUNT_MINOR: Final = 2**63 - 1

_IDEMPOTENCY_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_LEN}}}")
_CURRENCY = re.compile(r"[A-Z]{3}")  # ISO 4217 alphabetic code, upper case


class PaymentStatus(enum.StrEnum):
    """Where a payment stands, as far as the provider has told us.

    Only ``SUCCEEDED`` means money. ``FAILED`` means the latest attempt failed: the sandbox
    never changes it again, but a Stripe customer may retry on the same PaymentIntent,
    which can still succeed later — so a ``SUCCEEDED`` after a ``FAILED`` for the same
    payment must still be credited. ``CANCELED`` is final everywhere.
    """

    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


def _check_currency(currency: object) -> bool:
    return isinstance(currency, str) and _CURRENCY.fullmatch(currency) is not None


def _check_amount(amount: object, *, minimum: int) -> bool:
    # bool is an int subclass; True is not an amount.
    return (
        isinstance(amount, int)
        and not isinstance(amount, bool)
        and minimum <= amount <= MAX_AMOUNT_MINOR
    )


def _is_aware(moment: object) -> bool:
    return isinstance(moment, datetime) and moment.utcoffset() is not None


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """What the caller wants paid: ``amount_minor`` of ``currency`` towards ``account_ref``.

    ``idempotency_key`` is sent to the provider so that repeating the request (after a
    crash or a timeout) never charges twice; the same key with different content is a
    conflict.
    """

    idempotency_key: str
    account_ref: str
    amount_minor: int
    currency: str
    description: str = ""
    # Left out of the hash (a mapping is not hashable) but not out of equality.
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.idempotency_key, str) or not _IDEMPOTENCY_KEY.fullmatch(
            self.idempotency_key
        ):
            raise InvalidPaymentRequestError(
                "idempotency_key must be 1..255 printable ASCII characters without spaces"
            )
        if (
            not isinstance(self.account_ref, str)
            or not self.account_ref
            or len(self.account_ref) > MAX_METADATA_VALUE_LEN
        ):
            raise InvalidPaymentRequestError(
                f"account_ref must be a string of 1..{MAX_METADATA_VALUE_LEN} characters"
            )
        if not _check_amount(self.amount_minor, minimum=1):
            raise InvalidPaymentRequestError(
                f"amount_minor must be a positive integer, got {self.amount_minor!r}"
            )
        if not _check_currency(self.currency):
            raise InvalidPaymentRequestError(
                f"currency must be an upper-case ISO 4217 code, got {self.currency!r}"
            )
        if not isinstance(self.description, str):
            raise InvalidPaymentRequestError("description must be a string")
        object.__setattr__(self, "metadata", _checked_metadata(self.metadata))


def _checked_metadata(metadata: object) -> Mapping[str, str]:
    if not isinstance(metadata, Mapping):
        raise InvalidPaymentRequestError("metadata must be a mapping of strings to strings")
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidPaymentRequestError(f"metadata has more than {MAX_METADATA_KEYS} keys")
    copy: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_METADATA_KEY_LEN:
            raise InvalidPaymentRequestError(
                f"metadata key {key!r} must be a string of 1..{MAX_METADATA_KEY_LEN} characters"
            )
        # Square brackets would break the form encoding ``metadata[key]=value``.
        if "[" in key or "]" in key:
            raise InvalidPaymentRequestError(f"metadata key {key!r} may not contain brackets")
        if key in RESERVED_METADATA_KEYS:
            raise InvalidPaymentRequestError(f"metadata key {key!r} is reserved")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_LEN:
            raise InvalidPaymentRequestError(
                f"metadata value of {key!r} must be a string of at most "
                f"{MAX_METADATA_VALUE_LEN} characters"
            )
        copy[key] = value
    # A private copy behind a read-only view: the caller's dict may change afterwards.
    return MappingProxyType(copy)


@dataclass(frozen=True, slots=True)
class PaymentIntent:
    """The provider's answer: its id for the payment, its status, and what the customer needs.

    ``client_secret`` lets a browser or app finish the payment with the provider's own
    client library; ``next_action_url`` is where to send the customer when the status is
    ``REQUIRES_ACTION`` (3-D Secure and the like).
    """

    provider: str
    provider_payment_id: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    client_secret: str | None = None
    next_action_url: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.provider, str) or not self.provider:
            raise ValueError("provider must be a non-empty string")
        if not isinstance(self.provider_payment_id, str) or not self.provider_payment_id:
            raise ValueError("provider_payment_id must be a non-empty string")
        if not isinstance(self.status, PaymentStatus):
            raise TypeError(f"status must be a PaymentStatus, got {self.status!r}")
        if not _check_amount(self.amount_minor, minimum=1):
            raise ValueError(f"amount_minor must be a positive integer, got {self.amount_minor!r}")
        if not _check_currency(self.currency):
            raise ValueError(f"currency must be an upper-case ISO 4217 code, got {self.currency!r}")
        for name in ("client_secret", "next_action_url"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be None or a non-empty string")


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified provider event about one payment.

    ``event_id`` is unique per provider and the same on every redelivery: de-duplicate on
    ``(provider, event_id)``. ``created_at`` is when the provider created the event (not
    when it was delivered). ``raw`` is the exact signed body, for the audit log.
    """

    provider: str
    event_id: str
    type: str
    provider_payment_id: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    created_at: datetime
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("provider", "event_id", "type", "provider_payment_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if not isinstance(self.status, PaymentStatus):
            raise TypeError(f"status must be a PaymentStatus, got {self.status!r}")
        # Zero is allowed: a failed or canceled attempt may report nothing collected.
        if not _check_amount(self.amount_minor, minimum=0):
            raise ValueError(f"amount_minor must be a non-negative integer: {self.amount_minor!r}")
        if not _check_currency(self.currency):
            raise ValueError(f"currency must be an upper-case ISO 4217 code, got {self.currency!r}")
        if not _is_aware(self.created_at):
            raise ValueError("created_at must be a timezone-aware datetime")
        if not isinstance(self.raw, bytes):
            raise TypeError("raw must be the body's bytes")


class PaymentProvider(Protocol):
    """What every payment provider adapter offers (sandbox, Stripe, …)."""

    @property
    def name(self) -> str:
        """Short stable name stored with payments and events, e.g. ``"stripe"``."""
        ...

    async def create_payment(self, request: PaymentRequest) -> PaymentIntent:
        """Create a payment; idempotent on ``request.idempotency_key`` at the provider.

        Raises ``PaymentConflictError`` for a reused key with different content and
        ``PaymentProviderError`` when the provider refuses or cannot be reached.
        """
        ...

    async def get_payment(self, provider_payment_id: str) -> PaymentIntent:
        """The payment's current state; ``PaymentNotFoundError`` if the provider has none."""
        ...

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: datetime) -> WebhookEvent:
        """Verify a webhook (signature first, then the timestamp window) and parse it.

        Raises ``WebhookSignatureError``, ``WebhookTooOldError`` or
        ``WebhookMalformedError`` for a rejected delivery, and
        ``UnhandledWebhookEventError`` for a genuine event of a type we do not act on.
        """
        ...


# --- JSON field readers shared by the adapters ------------------------------------------
# Providers talk JSON; every field we use is read through these so a missing or mistyped
# field raises the caller-chosen error naming the field, never a KeyError or TypeError.

ErrorFactory = Callable[[str], Exception]
JsonObject = Mapping[str, object]


def _reject_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def json_object(raw: bytes, *, what: str, error: ErrorFactory) -> JsonObject:
    """Parse ``raw`` as a UTF-8 JSON object, or raise ``error`` naming ``what``."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object")
    return value


def get_object(obj: JsonObject, key: str, *, where: str, error: ErrorFactory) -> JsonObject:
    """The JSON object at ``obj[key]``."""
    value = obj.get(key)
    if not isinstance(value, dict):
        raise error(f"{where}.{key} must be an object")
    return value


def get_str(obj: JsonObject, key: str, *, where: str, error: ErrorFactory) -> str:
    """The non-empty string at ``obj[key]``."""
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise error(f"{where}.{key} must be a non-empty string")
    return value


def get_optional_str(obj: JsonObject, key: str, *, where: str, error: ErrorFactory) -> str | None:
    """The string at ``obj[key]``, or ``None`` when it is absent, null or empty."""
    value = obj.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise error(f"{where}.{key} must be a string or null")
    return value


def get_int(obj: JsonObject, key: str, *, where: str, error: ErrorFactory) -> int:
    """The integer at ``obj[key]`` (not a bool, not a float)."""
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{where}.{key} must be an integer")
    return value
