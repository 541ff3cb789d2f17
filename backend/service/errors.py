"""Refusals of the top-up → token use cases: their branch of the backend's exception tree.

BackendError                           (backend/errors.py)
├── ServiceError                       a use case refused a request
│   ├── NotFoundError                  no such thing, or not visible to the caller (404)
│   │   └── UnknownProviderError       no payment provider by that name (404)
│   ├── UnknownPaymentError            a verified event names a payment we do not know (409)
│   ├── SettlementMismatchError        the provider reports another amount/currency (409)
│   └── …                              access and provisioning refusals (service/refusals.py)
└── PaymentError                       (backend/payments/errors.py)
    ├── InvalidPaymentRequestError
    │   └── TopupRefusedError          amount, currency, key or account breaks the rules (422)
    └── PaymentConflictError
        └── IdempotencyKeyReusedError  the same Idempotency-Key with another request (409)

The top-up refusals sit under the payment layer's classes so one HTTP mapping covers both.
``UnknownPaymentError`` answers a webhook with a non-2xx status on purpose: the provider
redelivers it, and by then reconciliation may have recorded the payment (a crash between
creating the payment at the provider and storing its id leaves exactly this window).
"""

from __future__ import annotations

from backend.errors import BackendError
from backend.payments.errors import InvalidPaymentRequestError, PaymentConflictError


class ServiceError(BackendError):
    """A use case refused a request; nothing was changed."""


class NotFoundError(ServiceError):
    """No such thing, or the caller may not see it (the two are indistinguishable on purpose)."""


class UnknownProviderError(NotFoundError):
    """No payment provider is configured under that name."""


class UnknownPaymentError(ServiceError):
    """A verified provider event names a payment id we have not recorded (yet)."""


class SettlementMismatchError(ServiceError):
    """A provider reports success for another amount or currency than we asked for."""


class TopupRefusedError(InvalidPaymentRequestError):
    """A top-up request that breaks the rules (amount range, currency, key, no meter)."""


class IdempotencyKeyReusedError(PaymentConflictError):
    """An Idempotency-Key already used on this account for a different top-up."""
