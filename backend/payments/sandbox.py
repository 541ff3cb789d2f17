"""The sandbox payment provider: acts like a real one (pending, then a signed webhook), no money.

It is the default provider, so the demo and the tests exercise the same asynchronous path
as production: ``create_payment`` answers ``PENDING`` (or ``REQUIRES_ACTION``), the payment
completes a little later, and a signed ``payment.succeeded`` / ``payment.failed`` webhook
arrives at ``webhook_url``. Webhooks are signed exactly like Stripe's (see
:mod:`backend.payments.webhooks`) but in a ``Voltcredit-Signature`` header.

Magic amounts, like a card processor's test cards, choose the outcome by the last two
digits of ``amount_minor`` (e.g. 10.02 EUR = 1002 ends in ``02``):

====== ====================================================================================
ends   outcome
====== ====================================================================================
``02`` declined: completes as ``FAILED`` and sends ``payment.failed`` (cf. Stripe's
       generic-decline test card 4000 0000 0000 0002)
``03`` needs customer action (3-D Secure): ``REQUIRES_ACTION`` with a ``next_action_url``;
       nothing happens until :meth:`SandboxProvider.authenticate` approves (then succeeds)
       or declines (then fails)
``04`` stalls: stays ``PENDING`` and sends nothing until :meth:`SandboxProvider.complete`
       (a lost or very slow payment, for reconciliation tests); then succeeds
``09`` provider unavailable: ``create_payment`` raises a retryable
       ``PaymentProviderError`` and records nothing
others succeeds: completes as ``SUCCEEDED`` and sends ``payment.succeeded``
====== ====================================================================================

Two modes:

- **Asynchronous** (``webhook_url`` and ``deliverer`` given): payments complete by
  themselves ``completion_delay_s`` after creation (or after approval) and the webhook is
  POSTed through the :class:`~backend.payments.webhooks.WebhookDeliverer`, with retries.
- **Synchronous** (neither given, for tests): nothing completes by itself and nothing is
  POSTed; the caller completes a payment with :meth:`SandboxProvider.complete`, which
  returns the signed webhook (headers and body) for the caller to feed to its endpoint or
  to :meth:`SandboxProvider.parse_webhook`.

Like Stripe, a repeated ``create_payment`` with the same idempotency key and the same
content replays the *first* answer (https://docs.stripe.com/api/idempotent_requests); use
``get_payment`` for the current state. The record is in memory: a restart forgets it, which
is fine for a sandbox and is exactly the "provider lost the payment" case callers must
survive anyway.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import secrets as _secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Final, Self

from backend.payments.base import (
    PaymentIntent,
    PaymentRequest,
    PaymentStatus,
    WebhookEvent,
    get_int,
    get_object,
    get_str,
    json_object,
)
from backend.payments.errors import (
    PaymentConflictError,
    PaymentNotFoundError,
    PaymentProviderError,
    PaymentStateError,
    UnhandledWebhookEventError,
    WebhookMalformedError,
)
from backend.payments.webhooks import (
    DEFAULT_TOLERANCE_S,
    WebhookDeliverer,
    format_signature_header,
    header_value,
    verify_signature,
)

logger = logging.getLogger(__name__)

PROVIDER_NAME: Final = "sandbox"
SIGNATURE_HEADER: Final = "Voltcredit-Signature"
EVENT_SUCCEEDED: Final = "payment.succeeded"
EVENT_FAILED: Final = "payment.failed"
#: Event type → the status it reports.
EVENT_STATUS: Final[Mapping[str, PaymentStatus]] = MappingProxyType(
    {EVENT_SUCCEEDED: PaymentStatus.SUCCEEDED, EVENT_FAILED: PaymentStatus.FAILED}
)
DEFAULT_ACTION_URL: Final = "/sandbox/payments/{payment_id}/authenticate"


class SandboxOutcome(enum.Enum):
    """What the sandbox will do with a payment, chosen by its amount (module docstring)."""

    SUCCEED = "succeed"
    DECLINE = "decline"
    REQUIRE_ACTION = "require_action"
    STALL = "stall"
    UNAVAILABLE = "unavailable"


_MAGIC_CENTS: Final[Mapping[int, SandboxOutcome]] = MappingProxyType(
    {
        2: SandboxOutcome.DECLINE,
        3: SandboxOutcome.REQUIRE_ACTION,
        4: SandboxOutcome.STALL,
        9: SandboxOutcome.UNAVAILABLE,
    }
)


def magic_outcome(amount_minor: int) -> SandboxOutcome:
    """The sandbox outcome for an amount: by its last two digits, ``SUCCEED`` by default."""
    return _MAGIC_CENTS.get(amount_minor % 100, SandboxOutcome.SUCCEED)


@dataclass(frozen=True, slots=True)
class SignedWebhook:
    """A webhook as it would go over the wire: the headers to send and the exact body."""

    headers: Mapping[str, str]
    body: bytes


@dataclass(slots=True)
class _Payment:
    request: PaymentRequest
    payment_id: str
    client_secret: str
    outcome: SandboxOutcome
    status: PaymentStatus
    event_id: str | None = None
    event_body: bytes | None = None
    timer: asyncio.Task[None] | None = None
    first_answer: PaymentIntent = field(init=False)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _random_id(prefix: str) -> str:
    return f"{prefix}_{_secrets.token_hex(12)}"


class SandboxProvider:
    """A :class:`~backend.payments.base.PaymentProvider` that simulates a card processor."""

    def __init__(
        self,
        *,
        secret: bytes,
        webhook_url: str | None = None,
        deliverer: WebhookDeliverer | None = None,
        clock: Callable[[], datetime] = _utc_now,
        completion_delay_s: float = 0.2,
        tolerance_s: int = DEFAULT_TOLERANCE_S,
        action_url_template: str = DEFAULT_ACTION_URL,
    ) -> None:
        if not secret:
            raise ValueError("the sandbox webhook secret must not be empty")
        if (webhook_url is None) != (deliverer is None):
            raise ValueError("give both webhook_url and deliverer (asynchronous mode) or neither")
        if completion_delay_s < 0:
            raise ValueError("completion_delay_s must be >= 0")
        self._secret = secret
        self._webhook_url = webhook_url
        self._deliverer = deliverer
        self._clock = clock
        self._completion_delay_s = completion_delay_s
        self._tolerance_s = tolerance_s
        self._action_url_template = action_url_template
        self._by_key: dict[str, _Payment] = {}
        self._by_id: dict[str, _Payment] = {}
        self._timers: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        """``"sandbox"``."""
        return PROVIDER_NAME

    @property
    def asynchronous(self) -> bool:
        """True when payments complete by themselves and webhooks are POSTed."""
        return self._deliverer is not None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel pending completions (the deliverer, owned by the caller, stays open)."""
        timers = list(self._timers)
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)

    # --- PaymentProvider ------------------------------------------------------------------

    async def create_payment(self, request: PaymentRequest) -> PaymentIntent:
        """Record a payment and answer ``PENDING`` (or ``REQUIRES_ACTION``); see magic amounts."""
        existing = self._by_key.get(request.idempotency_key)
        if existing is not None:
            if existing.request != request:
                raise PaymentConflictError(
                    f"idempotency key {request.idempotency_key!r} was used for a different payment"
                )
            return existing.first_answer
        outcome = magic_outcome(request.amount_minor)
        if outcome is SandboxOutcome.UNAVAILABLE:
            raise PaymentProviderError(
                "sandbox simulates an outage for amounts ending in 09",
                provider=PROVIDER_NAME,
                retryable=True,
                status=503,
                code="sandbox_unavailable",
            )
        payment_id = _random_id("sbx_pay")
        status = (
            PaymentStatus.REQUIRES_ACTION
            if outcome is SandboxOutcome.REQUIRE_ACTION
            else PaymentStatus.PENDING
        )
        payment = _Payment(
            request=request,
            payment_id=payment_id,
            client_secret=f"{payment_id}_secret_{_secrets.token_hex(12)}",
            outcome=outcome,
            status=status,
        )
        payment.first_answer = self._intent(payment)
        self._by_key[request.idempotency_key] = payment
        self._by_id[payment_id] = payment
        if outcome in (SandboxOutcome.SUCCEED, SandboxOutcome.DECLINE):
            self._schedule_completion(payment)
        return payment.first_answer

    async def get_payment(self, provider_payment_id: str) -> PaymentIntent:
        """The payment's current state."""
        return self._intent(self._payment(provider_payment_id))

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: datetime) -> WebhookEvent:
        """Verify a ``Voltcredit-Signature`` webhook, then parse the event it carries."""
        verify_signature(
            header_value(headers, SIGNATURE_HEADER),
            body,
            secrets=[self._secret],
            now=now,
            tolerance_s=self._tolerance_s,
        )
        event = json_object(body, what="webhook body", error=WebhookMalformedError)
        where = "event"
        event_id = get_str(event, "id", where=where, error=WebhookMalformedError)
        event_type = get_str(event, "type", where=where, error=WebhookMalformedError)
        created = get_int(event, "created", where=where, error=WebhookMalformedError)
        status = EVENT_STATUS.get(event_type)
        if status is None:
            raise UnhandledWebhookEventError(PROVIDER_NAME, event_id, event_type)
        data = get_object(event, "data", where=where, error=WebhookMalformedError)
        where = "event.data.object"
        payment = get_object(data, "object", where="event.data", error=WebhookMalformedError)
        try:
            return WebhookEvent(
                provider=PROVIDER_NAME,
                event_id=event_id,
                type=event_type,
                provider_payment_id=get_str(
                    payment, "id", where=where, error=WebhookMalformedError
                ),
                status=status,
                amount_minor=get_int(payment, "amount", where=where, error=WebhookMalformedError),
                currency=get_str(payment, "currency", where=where, error=WebhookMalformedError),
                created_at=datetime.fromtimestamp(created, UTC),
                raw=body,
            )
        except (ValueError, OverflowError, OSError) as exc:
            raise WebhookMalformedError(f"sandbox event {event_id!r}: {exc}") from exc

    # --- sandbox controls (what the customer or the card network would do) -----------------

    def authenticate(self, provider_payment_id: str, *, approve: bool) -> PaymentIntent:
        """The customer finishes (``approve``) or abandons the action a ``03`` payment needs.

        The payment goes back to ``PENDING`` and then completes as it would otherwise:
        succeeded if approved, failed if not (by itself in asynchronous mode, through
        :meth:`complete` in synchronous mode).
        """
        payment = self._payment(provider_payment_id)
        if payment.status is not PaymentStatus.REQUIRES_ACTION:
            raise PaymentStateError(
                f"sandbox payment {provider_payment_id!r} is {payment.status}, not requires_action"
            )
        payment.status = PaymentStatus.PENDING
        payment.outcome = SandboxOutcome.SUCCEED if approve else SandboxOutcome.DECLINE
        self._schedule_completion(payment)
        return self._intent(payment)

    def complete(self, provider_payment_id: str) -> SignedWebhook:
        """Complete the payment now and return its signed webhook.

        For a payment already completed this returns the same event again, freshly
        signed (a redelivery, for de-duplication tests). In asynchronous mode a first
        completion is also POSTed to ``webhook_url``.
        """
        payment = self._payment(provider_payment_id)
        if payment.status is PaymentStatus.REQUIRES_ACTION:
            raise PaymentStateError(
                f"sandbox payment {provider_payment_id!r} needs authenticate() first"
            )
        if payment.timer is not None:
            payment.timer.cancel()
            payment.timer = None
        body = payment.event_body if payment.event_body is not None else self._finalise(payment)
        return self._signed(body)

    # --- internals ------------------------------------------------------------------------

    def _payment(self, provider_payment_id: str) -> _Payment:
        payment = self._by_id.get(provider_payment_id)
        if payment is None:
            raise PaymentNotFoundError(PROVIDER_NAME, provider_payment_id)
        return payment

    def _intent(self, payment: _Payment) -> PaymentIntent:
        return PaymentIntent(
            provider=PROVIDER_NAME,
            provider_payment_id=payment.payment_id,
            status=payment.status,
            amount_minor=payment.request.amount_minor,
            currency=payment.request.currency,
            client_secret=payment.client_secret,
            next_action_url=(
                self._action_url_template.format(payment_id=payment.payment_id)
                if payment.status is PaymentStatus.REQUIRES_ACTION
                else None
            ),
        )

    def _schedule_completion(self, payment: _Payment) -> None:
        if self._deliverer is None:
            return  # synchronous mode: the caller completes with complete()
        timer = asyncio.get_running_loop().create_task(
            self._complete_later(payment), name=f"sandbox-complete:{payment.payment_id}"
        )
        payment.timer = timer
        self._timers.add(timer)
        timer.add_done_callback(self._timers.discard)

    async def _complete_later(self, payment: _Payment) -> None:
        await asyncio.sleep(self._completion_delay_s)
        payment.timer = None
        self._finalise(payment)

    def _finalise(self, payment: _Payment) -> bytes:
        """Move the payment to its final status, build its event and (asynchronously) send it."""
        declined = payment.outcome is SandboxOutcome.DECLINE
        payment.status = PaymentStatus.FAILED if declined else PaymentStatus.SUCCEEDED
        payment.event_id = _random_id("evt_sbx")
        event = {
            "id": payment.event_id,
            "object": "event",
            "type": EVENT_FAILED if declined else EVENT_SUCCEEDED,
            "created": int(self._clock().timestamp()),
            "data": {
                "object": {
                    "id": payment.payment_id,
                    "object": "payment",
                    "amount": payment.request.amount_minor,
                    "currency": payment.request.currency,
                    "status": str(payment.status),
                    "account_ref": payment.request.account_ref,
                    "idempotency_key": payment.request.idempotency_key,
                    "metadata": dict(payment.request.metadata),
                }
            },
        }
        body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
        payment.event_body = body
        logger.info(
            "sandbox payment %s %s (event %s)", payment.payment_id, payment.status, payment.event_id
        )
        if self._deliverer is not None and self._webhook_url is not None:
            self._deliverer.deliver(
                self._webhook_url,
                body,
                event_id=payment.event_id,
                headers=lambda: self._signed(body).headers,
            )
        return body

    def _signed(self, body: bytes) -> SignedWebhook:
        """Sign ``body`` now: every (re)delivery carries the time it was sent, as Stripe's do."""
        timestamp = int(self._clock().timestamp())
        header = format_signature_header(body, timestamp=timestamp, secrets=[self._secret])
        return SignedWebhook(headers=MappingProxyType({SIGNATURE_HEADER: header}), body=body)
