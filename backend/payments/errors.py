"""Exceptions of the payment layer: its branch of the backend tree under ``BackendError``.

BackendError                        (backend/errors.py)
└── PaymentError                    the payment layer refused or failed at something
    ├── InvalidPaymentRequestError  a request breaking the rules, refused before sending (caller)
    ├── PaymentConflictError        an idempotency key reused with different content (caller)
    ├── PaymentNotFoundError        the provider knows no payment with that id
    ├── PaymentStateError           a sandbox control used in the wrong payment state (caller)
    ├── PaymentProviderError        the provider refused or was unreachable; ``.retryable``
    ├── UnhandledWebhookEventError  a verified, well-formed event of a type we do not act on
    └── WebhookError                an incoming webhook was rejected; nothing may change
        ├── WebhookSignatureError   no signature header, or no signature matches (peer)
        ├── WebhookTooOldError      signed timestamp outside the tolerance window (peer)
        └── WebhookMalformedError   header or body unparseable or missing a field (peer)

Suggested HTTP mapping for the API middleware (issue 6): ``InvalidPaymentRequestError`` 422,
``PaymentConflictError`` and ``PaymentStateError`` 409, ``PaymentNotFoundError`` 404,
``PaymentProviderError`` 503 when ``retryable`` else 502, ``WebhookError`` 400 (the provider
retries; a forger learns nothing), and ``UnhandledWebhookEventError`` **200**: the event is
genuine, we simply do not need it, and a non-2xx answer would make the provider redeliver it
for up to three days (https://docs.stripe.com/webhooks#automatic-retries).
"""

from __future__ import annotations

from backend.errors import BackendError


class PaymentError(BackendError):
    """Root of everything the payment layer refuses or fails at."""


class InvalidPaymentRequestError(PaymentError):
    """A payment request or id that breaks the rules (amount, currency, key, metadata)."""


class PaymentConflictError(PaymentError):
    """An idempotency key was reused for a payment with different content."""


class PaymentNotFoundError(PaymentError):
    """The provider has no payment with this id."""

    def __init__(self, provider: str, provider_payment_id: str) -> None:
        super().__init__(f"{provider}: no payment {provider_payment_id!r}")
        self.provider = provider
        self.provider_payment_id = provider_payment_id


class PaymentStateError(PaymentError):
    """A sandbox control (complete, authenticate) does not apply to the payment's state."""


class PaymentProviderError(PaymentError):
    """The provider refused a request or could not be reached.

    ``retryable`` says whether repeating the *same* request (same idempotency key) may
    succeed: network failures, rate limits and provider-side 5xx are; our own mistakes
    (bad parameters, bad key) are not. ``status`` is the HTTP status if one arrived,
    ``code`` the provider's machine-readable error code if it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        retryable: bool,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.retryable = retryable
        self.status = status
        self.code = code


class UnhandledWebhookEventError(PaymentError):
    """A verified, well-formed webhook whose event type the payment layer does not act on.

    Not a ``WebhookError``: the event is genuine and must be acknowledged with a 2xx so the
    provider stops redelivering it.
    """

    def __init__(self, provider: str, event_id: str, event_type: str) -> None:
        super().__init__(f"{provider}: event {event_id!r} of type {event_type!r} is not handled")
        self.provider = provider
        self.event_id = event_id
        self.event_type = event_type


class WebhookError(PaymentError):
    """An incoming webhook was rejected; nothing it says may be acted on."""


class WebhookSignatureError(WebhookError):
    """The signature header is missing, or none of its signatures matches the body."""


class WebhookTooOldError(WebhookError):
    """The signed timestamp is outside the tolerance window: too old (a replay) or too far ahead."""


class WebhookMalformedError(WebhookError):
    """The signature header or the event body cannot be parsed, or lacks a required field."""
