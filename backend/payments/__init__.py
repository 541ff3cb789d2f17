"""Payments: the provider interface, the sandbox provider, the Stripe adapter and webhook signing.

Callers (the top-up use case, the webhook endpoint) depend on :class:`PaymentProvider`
and the value types only; the composition root picks the provider from configuration —
:class:`SandboxProvider` by default, :class:`StripeProvider` when Stripe keys are set.
"""

from __future__ import annotations

from backend.payments.base import (
    PaymentIntent,
    PaymentProvider,
    PaymentRequest,
    PaymentStatus,
    WebhookEvent,
)
from backend.payments.errors import (
    InvalidPaymentRequestError,
    PaymentConflictError,
    PaymentError,
    PaymentNotFoundError,
    PaymentProviderError,
    PaymentStateError,
    UnhandledWebhookEventError,
    WebhookError,
    WebhookMalformedError,
    WebhookSignatureError,
    WebhookTooOldError,
)
from backend.payments.sandbox import SandboxOutcome, SandboxProvider, SignedWebhook, magic_outcome
from backend.payments.stripe import StripeProvider, map_stripe_status
from backend.payments.webhooks import (
    DEFAULT_TOLERANCE_S,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    WebhookDeliverer,
    compute_signature,
    format_signature_header,
    parse_signature_header,
    verify_signature,
)

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryState",
    "InvalidPaymentRequestError",
    "PaymentConflictError",
    "PaymentError",
    "PaymentIntent",
    "PaymentNotFoundError",
    "PaymentProvider",
    "PaymentProviderError",
    "PaymentRequest",
    "PaymentStateError",
    "PaymentStatus",
    "SandboxOutcome",
    "SandboxProvider",
    "SignedWebhook",
    "StripeProvider",
    "UnhandledWebhookEventError",
    "WebhookDeliverer",
    "WebhookError",
    "WebhookEvent",
    "WebhookMalformedError",
    "WebhookSignatureError",
    "WebhookTooOldError",
    "compute_signature",
    "format_signature_header",
    "magic_outcome",
    "map_stripe_status",
    "parse_signature_header",
    "verify_signature",
]
