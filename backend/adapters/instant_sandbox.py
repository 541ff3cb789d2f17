"""The sandbox provider in *instant* mode: every payment completes inside ``create_payment``.

For benchmarks, crash tests and a demo without webhooks: the top-up request gets a
``SUCCEEDED`` answer at once and settles in the same HTTP request (the provider-answer
path of :meth:`backend.service.topups.TopupService.settle_intent`), so the path
measured is HTTP → payment → ledger + token in the outbox, with no webhook round trip.
Magic amounts keep their meaning (``02`` declines, ``09`` is unavailable, ``03`` still
waits for :meth:`~backend.payments.sandbox.SandboxProvider.authenticate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from backend.payments.base import PaymentIntent, PaymentRequest, PaymentStatus, WebhookEvent
from backend.payments.sandbox import SandboxProvider


class InstantSandbox:
    """A :class:`~backend.payments.base.PaymentProvider` wrapping a synchronous sandbox."""

    def __init__(self, sandbox: SandboxProvider) -> None:
        if sandbox.asynchronous:
            raise ValueError("InstantSandbox wraps a sandbox in synchronous mode")
        self.sandbox = sandbox

    @property
    def name(self) -> str:
        """The wrapped sandbox's name (``"sandbox"``)."""
        return self.sandbox.name

    async def create_payment(self, request: PaymentRequest) -> PaymentIntent:
        """Create the payment and complete it now, unless it waits for the customer."""
        intent = await self.sandbox.create_payment(request)
        if intent.status is PaymentStatus.PENDING:
            self.sandbox.complete(intent.provider_payment_id)
            return await self.sandbox.get_payment(intent.provider_payment_id)
        return intent

    async def get_payment(self, provider_payment_id: str) -> PaymentIntent:
        """The payment's current state."""
        return await self.sandbox.get_payment(provider_payment_id)

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: datetime) -> WebhookEvent:
        """Verify and parse a sandbox webhook (redeliveries of completed payments)."""
        return self.sandbox.parse_webhook(headers, body, now)
