"""Top-up use cases: request a payment idempotently, settle it exactly once (DESIGN §6, steps 1-2).

**Request** (:meth:`TopupService.request_topup`): the payment row for
``(supply account, Idempotency-Key)`` is created in one short transaction — the unique key
makes ten concurrent identical requests create one row (the losers catch the duplicate
and re-read) — then the provider is called *outside* any transaction, with our payment id
as *its* idempotency key, so repeating the call (a retried request, reconciliation after a
crash) never charges twice. A replay of a request returns the same payment; the same key
with another amount, currency or account is refused.

**Settlement** (:meth:`TopupService.settle_event` for a verified webhook,
:meth:`TopupService.settle_intent` for a provider answer or a status poll) is **one**
write unit of work: record the webhook event (a seen event is a no-op), move the payment
by the table in :mod:`backend.domain.topups`, and on success take the meter's next
message id under a row lock, sign a credit token with the active key, put it in the
outbox, and post the linked ledger batch (ids derived from the payment id, so a replay is
a no-op too; money flow in that module's docstring). On SQLite, concurrent units of work
share commits (:mod:`backend.adapters.db.group_commit`). Nothing is published inside the
transaction; the dispatcher is woken after the commit. Any failure (a signer that is
down, a broken split rule, a crash) rolls back all of it, and the provider's redelivery
tries again.

Top-ups need an attached meter: a request for an account without one is refused, because
the token could not be issued. (A meter removed between request and settlement leaves the
ledger credited and raises a ``NO_METER`` alert.)
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.alert_tables import AlertKind
from backend.adapters.db.engine import Database
from backend.adapters.db.group_commit import GroupCommitter
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.repos import Repositories
from backend.adapters.db.tables import PaymentRow, TokenRow, WebhookEventRow
from backend.adapters.db.topup_repo import (
    DuplicateKeyError,
    TopupRepository,
    is_unique_violation,
)
from backend.domain.auth import Action, Role, Scope
from backend.domain.ledger import Transfer, TransferCode, derive_id
from backend.domain.split import SplitError
from backend.domain.topups import (
    FEE_PARTNER_KIND,
    MAX_MSG_ID,
    MAX_TOKEN_AMOUNT_MINOR,
    TOKEN_TTL_S,
    PaymentState,
    Report,
    TokenState,
    payment_step,
    topup_split,
)
from backend.errors import LimitExceededError, StorageError
from backend.payments.base import (
    PaymentIntent,
    PaymentProvider,
    PaymentRequest,
    PaymentStatus,
    WebhookEvent,
)
from backend.payments.errors import (
    PaymentNotFoundError,
    PaymentProviderError,
    UnhandledWebhookEventError,
)
from backend.service.context import Call, audit, require, utc_now
from backend.service.errors import (
    IdempotencyKeyReusedError,
    NotFoundError,
    SettlementMismatchError,
    TopupRefusedError,
    UnknownPaymentError,
    UnknownProviderError,
)
from firmware_protocol import messages, units

log = logging.getLogger(__name__)

#: ``Idempotency-Key``: printable ASCII without spaces, as long as ``payments`` stores.
MAX_KEY_LEN: Final = 128
_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_LEN}}}")
#: ``tokens.kind`` of a credit token.
CREDIT_KIND: Final = "CREDIT"
_FINAL: Final = (PaymentState.SUCCEEDED, PaymentState.FAILED, PaymentState.CANCELED)
#: Settlement refusals an operator must see: recorded as alerts, then re-raised (the
#: provider gets a non-2xx answer and redelivers once the cause is fixed).
_ALERTED: Final = (SettlementMismatchError, SplitError, LimitExceededError)
_REPORT: Final[Mapping[PaymentStatus, Report]] = {
    PaymentStatus.PENDING: Report.PENDING,
    PaymentStatus.REQUIRES_ACTION: Report.REQUIRES_ACTION,
    PaymentStatus.SUCCEEDED: Report.SUCCEEDED,
    PaymentStatus.FAILED: Report.FAILED,
    PaymentStatus.CANCELED: Report.CANCELED,
}


class SignerSource(Protocol):
    """Where the key signing new tokens comes from (``backend.keys`` ``KeyStore`` fits)."""

    def active_signer(self) -> messages.Signer: ...


def system_call(actor: str, now: datetime, request_id: str = "system") -> Call:
    """The :class:`Call` of a change the system makes on its own (a webhook, a poll)."""
    return Call(scope=Scope(role=Role.PLATFORM_ADMIN, actor=actor), request_id=request_id, now=now)


class SettleOutcome(enum.StrEnum):
    """What a settlement call did."""

    SETTLED = "SETTLED"  #: this call credited the money (and issued the token)
    UPDATED = "UPDATED"  #: the payment moved to another state; no money
    UNCHANGED = "UNCHANGED"  #: nothing to do (same state, or already final)
    DUPLICATE = "DUPLICATE"  #: this webhook event was processed before
    IGNORED = "IGNORED"  #: a genuine event of a type we do not act on


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of a settlement call, and the payment it concerned (if known)."""

    outcome: SettleOutcome
    payment_id: uuid.UUID | None = None
    status: PaymentState | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TopupResult:
    """A top-up as the caller sees it after a request (new or replayed)."""

    payment_id: uuid.UUID
    supply_account_id: int
    status: PaymentState
    amount_minor: int
    currency: str
    provider: str
    provider_payment_id: str | None
    client_secret: str | None
    next_action_url: str | None
    replayed: bool


def request_hash(supply_account_id: int, amount_minor: int, currency: str) -> str:
    """Fingerprint of a top-up request: the same key must come with the same one."""
    return hashlib.sha256(
        f"topup|{supply_account_id}|{amount_minor}|{currency}".encode()
    ).hexdigest()


class TopupService:
    """Top-up requests and settlements over one database and a set of payment providers."""

    def __init__(
        self,
        db: Database,
        *,
        providers: Mapping[str, PaymentProvider],
        default_provider: str,
        signers: SignerSource,
        clock: Callable[[], datetime] = utc_now,
        token_ttl_s: int = TOKEN_TTL_S,
        on_token_issued: Callable[[], None] | None = None,
    ) -> None:
        if default_provider not in providers:
            raise ValueError(f"default provider {default_provider!r} is not configured")
        self._db = db
        # Concurrent requests and webhooks share commits on SQLite (one fsync for many).
        self._writer = GroupCommitter(db)
        self._providers = dict(providers)
        self._default = default_provider
        self._signers = signers
        self._clock = clock
        self._ttl_s = token_ttl_s
        self._on_token_issued = on_token_issued

    # --- request --------------------------------------------------------------------------

    async def request_topup(
        self,
        call: Call,
        supply_account_id: int,
        *,
        amount_minor: int,
        currency: str,
        idempotency_key: str,
    ) -> TopupResult:
        """Create (or replay) a top-up payment and ask the provider for it."""
        require(call, Action.TOPUP_CREATE)
        if not isinstance(idempotency_key, str) or not _KEY.fullmatch(idempotency_key):
            raise TopupRefusedError(
                f"Idempotency-Key must be 1..{MAX_KEY_LEN} printable ASCII characters "
                "without spaces"
            )
        if type(amount_minor) is not int or amount_minor < 1:
            raise TopupRefusedError(
                f"amount_minor must be a positive integer, got {amount_minor!r}"
            )
        if not isinstance(currency, str):
            raise TopupRefusedError("currency must be an ISO 4217 code")
        fingerprint = request_hash(supply_account_id, amount_minor, currency)
        row, created = await self._open_payment(
            call,
            account_id=supply_account_id,
            amount_minor=amount_minor,
            currency=currency,
            key=idempotency_key,
            fingerprint=fingerprint,
        )
        if PaymentState(row.status) in _FINAL:
            return _result(row, replayed=not created)
        provider = self._provider(row.provider)
        intent = await self._create_at_provider(provider, row, now=call.now)
        row, _ = await self._record_intent(row.id, intent, call)
        return _result(row, replayed=not created, intent=intent)

    async def _open_payment(
        self,
        call: Call,
        *,
        account_id: int,
        amount_minor: int,
        currency: str,
        key: str,
        fingerprint: str,
    ) -> tuple[PaymentRow, bool]:
        """The payment for (account, key): the existing one, or a new CREATED one."""

        async def unit(session: AsyncSession) -> tuple[PaymentRow, bool]:
            repo = TopupRepository(session)
            context = await repo.account_context(call.scope, account_id, key=key)
            if context is None:
                raise NotFoundError(f"no supply account {account_id}")
            account, tenant, meter, existing = context
            if existing is not None:
                return _same_request(existing, fingerprint), False
            _validate_amount(
                amount_minor,
                currency,
                tenant.currency,
                tenant.min_topup_minor,
                tenant.max_topup_minor,
            )
            if meter is None:
                raise TopupRefusedError(
                    f"supply account {account_id} has no meter yet: a top-up could not be delivered"
                )
            now = call.now
            row = PaymentRow(
                id=uuid.uuid4(),
                tenant_id=account.tenant_id,
                reseller_id=account.reseller_id,
                supply_account_id=account_id,
                idempotency_key=key,
                request_hash=fingerprint,
                provider=self._default,
                provider_payment_id=None,
                amount_minor=amount_minor,
                currency=currency,
                status=PaymentState.CREATED.value,
                created_at=now,
                updated_at=now,
                settled_at=None,
            )
            await repo.add_payment(row)
            await audit(
                Repositories(session),
                call,
                action=Action.TOPUP_CREATE,
                target=f"payment:{row.id}",
                tenant_id=row.tenant_id,
                detail={
                    "supply_account_id": account_id,
                    "amount_minor": amount_minor,
                    "currency": currency,
                    "idempotency_key": key,
                },
            )
            return row, True

        try:
            return await self._writer.run(unit)
        except DuplicateKeyError:
            # A concurrent identical request inserted first (PostgreSQL, or another
            # process on the same SQLite file): what it committed is our answer.
            async with self._db.read() as session:
                existing = await TopupRepository(session).payment_by_key(account_id, key)
            if existing is None:
                raise StorageError("payment vanished after a duplicate-key race") from None
            return _same_request(existing, fingerprint), False

    async def _create_at_provider(
        self, provider: PaymentProvider, row: PaymentRow, *, now: datetime
    ) -> PaymentIntent:
        request = PaymentRequest(
            # Our payment id, unique forever: the provider deduplicates repeats of this call.
            idempotency_key=str(row.id),
            account_ref=f"supply-account:{row.supply_account_id}",
            amount_minor=row.amount_minor,
            currency=row.currency,
            description=f"voltcredit top-up {row.id}",
            metadata={"payment_id": str(row.id), "tenant_id": str(row.tenant_id)},
        )
        try:
            return await provider.create_payment(request)
        except PaymentProviderError as exc:
            if not exc.retryable:
                await self._mark_failed(row.id, now)
            raise

    async def _mark_failed(self, payment_id: uuid.UUID, now: datetime) -> None:
        async with self._db.write() as session:
            row = await TopupRepository(session).lock_payment(payment_id)
            if row is not None:
                step = payment_step(PaymentState(row.status), Report.FAILED)
                row.status = step.state.value
                row.updated_at = now

    # --- settlement -----------------------------------------------------------------------

    async def handle_webhook(
        self,
        provider_name: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        request_id: str = "webhook",
    ) -> Settlement:
        """Verify a webhook with its provider (signature, time window), then settle it.

        ``WebhookError`` subclasses propagate (nothing changed); a genuine event of a type
        we do not act on is :attr:`SettleOutcome.IGNORED`.
        """
        provider = self._provider(provider_name)
        try:
            event = provider.parse_webhook(headers, body, self._clock())
        except UnhandledWebhookEventError as exc:
            log.info(
                "webhook %s/%s of type %s ignored", provider_name, exc.event_id, exc.event_type
            )
            return Settlement(SettleOutcome.IGNORED)
        return await self.settle_event(event, request_id=request_id)

    async def settle_event(self, event: WebhookEvent, *, request_id: str = "webhook") -> Settlement:
        """Apply a verified webhook event once (de-duplicated on its provider event id)."""
        report = _REPORT[event.status]
        call = system_call(f"provider:{event.provider}", self._clock(), request_id)

        async def unit(session: AsyncSession) -> Settlement:
            repo = TopupRepository(session)
            if await repo.event_seen(event.provider, event.event_id):
                return Settlement(SettleOutcome.DUPLICATE)
            row = await repo.lock_payment_by_provider_id(event.provider, event.provider_payment_id)
            if row is None:
                raise UnknownPaymentError(
                    f"{event.provider} event {event.event_id} names payment "
                    f"{event.provider_payment_id!r}, which we have not recorded (yet)"
                )
            await repo.add_event(
                WebhookEventRow(
                    provider=event.provider,
                    event_id=event.event_id,
                    payment_id=row.id,
                    received_at=call.now,
                )
            )
            outcome = await self._apply(
                repo,
                row,
                report,
                amount_minor=event.amount_minor,
                currency=event.currency,
                call=call,
            )
            return Settlement(outcome, row.id, PaymentState(row.status))

        try:
            settlement = await self._writer.run(unit)
        except DuplicateKeyError:
            return Settlement(SettleOutcome.DUPLICATE)
        except IntegrityError as exc:  # the event row raced at commit (PostgreSQL)
            if not is_unique_violation(exc):
                raise StorageError(f"settle_event: {exc.orig}") from exc
            return Settlement(SettleOutcome.DUPLICATE)
        except _ALERTED as exc:
            await self._payment_alert(exc, event.provider, event.provider_payment_id, call.now)
            raise
        self._after(settlement)
        return settlement

    async def settle_intent(self, payment_id: uuid.UUID, intent: PaymentIntent) -> Settlement:
        """Apply what the provider answered for our payment (a status poll)."""
        call = system_call(f"provider:{intent.provider}", self._clock())
        row, outcome = await self._record_intent(payment_id, intent, call)
        return Settlement(outcome, row.id, PaymentState(row.status))

    async def _record_intent(
        self, payment_id: uuid.UUID, intent: PaymentIntent, call: Call
    ) -> tuple[PaymentRow, SettleOutcome]:
        async def unit(session: AsyncSession) -> tuple[PaymentRow, SettleOutcome]:
            repo = TopupRepository(session)
            row = _adopt_provider_id(payment_id, await repo.lock_payment(payment_id), intent)
            row.updated_at = call.now  # reconciliation polls by this: the provider answered
            outcome = await self._apply(
                repo,
                row,
                _REPORT[intent.status],
                amount_minor=intent.amount_minor,
                currency=intent.currency,
                call=call,
            )
            return row, outcome

        try:
            row, outcome = await self._writer.run(unit)
        except _ALERTED as exc:
            await self._payment_alert(
                exc, intent.provider, intent.provider_payment_id, call.now, payment_id
            )
            raise
        self._after(Settlement(outcome, row.id, PaymentState(row.status)))
        return row, outcome

    async def _apply(
        self,
        repo: TopupRepository,
        row: PaymentRow,
        report: Report,
        *,
        amount_minor: int,
        currency: str,
        call: Call,
    ) -> SettleOutcome:
        """Move a locked payment by one provider report; settle it if that is the step."""
        if report is Report.SUCCEEDED and (
            amount_minor != row.amount_minor or currency != row.currency
        ):
            raise SettlementMismatchError(
                f"payment {row.id}: provider reports {amount_minor} {currency} succeeded, "
                f"we asked for {row.amount_minor} {row.currency}"
            )
        before = PaymentState(row.status)
        step = payment_step(before, report)
        if step.state is before and not step.settle:
            return SettleOutcome.UNCHANGED
        if before is PaymentState.CANCELED and step.settle:
            log.warning(
                "payment %s: provider reports success after cancellation; crediting", row.id
            )
        row.status = step.state.value
        row.updated_at = call.now
        await audit(
            Repositories(repo.session),
            call,
            action=f"payment.{step.state.value.lower()}",
            target=f"payment:{row.id}",
            tenant_id=row.tenant_id,
            detail={"from": before.value, "amount_minor": row.amount_minor},
        )
        if not step.settle:
            return SettleOutcome.UPDATED
        await self._settle(repo, row, call.now)
        return SettleOutcome.SETTLED

    async def _settle(self, repo: TopupRepository, row: PaymentRow, now: datetime) -> None:
        """Token + ledger batch for a payment that just succeeded (caller's transaction).

        The ledger batch goes last: it locks the tenant's CLEARING account and the split
        payer's, which every settlement of the tenant needs, so on PostgreSQL they are
        held only from the post to the commit.
        """
        context = await repo.account_context(None, row.supply_account_id)
        if context is None:
            raise StorageError(f"supply account {row.supply_account_id} vanished")
        account, tenant, _, _ = context
        group = derive_id("topup-batch", str(row.id))
        reference = f"payment:{row.id}"
        transfers = [
            Transfer(
                id=derive_id("topup", str(row.id)),
                debit_account_id=tenant.clearing_account_id,
                credit_account_id=account.ledger_account_id,
                amount=row.amount_minor,
                currency=row.currency,
                code=TransferCode.TOPUP,
                reference=reference,
                created_at=now,
                linked_group=group,
            )
        ]
        shares = topup_split(row.amount_minor, await repo.topup_rules(account))
        if shares is not None:
            payer = shares.payer_account_id
            for line in shares.lines:
                fee = line.partner_kind == FEE_PARTNER_KIND
                transfers.append(
                    Transfer(
                        id=derive_id("topup-split", str(row.id), str(line.partner_account_id)),
                        debit_account_id=payer,
                        credit_account_id=line.partner_account_id,
                        amount=line.amount_minor,
                        currency=row.currency,
                        code=TransferCode.FEE if fee else TransferCode.SPLIT,
                        reference=reference,
                        created_at=now,
                        linked_group=group,
                    )
                )
        await self._issue_token(repo, row, account_id=account.id, tenant_id=tenant.id, now=now)
        await LedgerRepository(repo.session).post(transfers)
        row.settled_at = now

    async def _issue_token(
        self,
        repo: TopupRepository,
        row: PaymentRow,
        *,
        account_id: int,
        tenant_id: int,
        now: datetime,
    ) -> None:
        """Sign the credit token of a payment under the meter's next message id (outbox)."""
        meter = await repo.meter_of(account_id, lock=True)
        if meter is None:
            repo.add_alert(
                tenant_id=tenant_id,
                kind=AlertKind.NO_METER,
                at=now,
                payment_id=row.id,
                detail={"supply_account_id": account_id, "amount_minor": row.amount_minor},
            )
            log.warning("payment %s settled for account %d without a meter", row.id, account_id)
            return
        msg_id = meter.next_msg_id
        if msg_id > MAX_MSG_ID:
            raise StorageError(f"meter {meter.id} has used every message id (u32)")
        meter.next_msg_id = msg_id + 1
        signer = self._signers.active_signer()
        issued = int(now.timestamp())
        token = messages.CreditToken(
            header=messages.Header(
                key_id=signer.key_id,
                meter_id=meter.id,
                msg_id=msg_id,
                issued_at=issued,
                expires_at=issued + self._ttl_s,
            ),
            currency=units.currency(row.currency),
            amount_minor=row.amount_minor,
        )
        repo.add_token(
            TokenRow(
                tenant_id=tenant_id,
                meter_id=meter.id,
                msg_id=msg_id,
                kind=CREDIT_KIND,
                payment_id=row.id,
                amount_minor=row.amount_minor,
                message=messages.encode(token, signer),
                status=TokenState.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                result_status=None,
                credit_after_milli=None,
                created_at=now,
                completed_at=None,
            )
        )

    def _after(self, settlement: Settlement) -> None:
        """After a commit: wake the dispatcher if a token was issued."""
        if settlement.outcome is SettleOutcome.SETTLED and self._on_token_issued is not None:
            self._on_token_issued()

    async def _payment_alert(
        self,
        exc: Exception,
        provider: str,
        provider_payment_id: str,
        now: datetime,
        payment_id: uuid.UUID | None = None,
    ) -> None:
        """Record why a settlement was refused, in its own transaction (it rolled back)."""
        detail = str(exc)
        kind = (
            AlertKind.PAYMENT_MISMATCH
            if isinstance(exc, SettlementMismatchError)
            else AlertKind.SETTLEMENT_REFUSED
        )
        async with self._db.write() as session:
            repo = TopupRepository(session)
            row = (
                await repo.lock_payment(payment_id)
                if payment_id is not None
                else await repo.lock_payment_by_provider_id(provider, provider_payment_id)
            )
            if row is None:
                return
            repo.add_alert(
                tenant_id=row.tenant_id,
                kind=kind,
                at=now,
                payment_id=row.id,
                detail={
                    "provider": provider,
                    "provider_payment_id": provider_payment_id,
                    "detail": detail,
                },
            )
        log.error("settlement of %s/%s refused: %s", provider, provider_payment_id, detail)

    # --- reconciliation -------------------------------------------------------------------

    async def reconcile(
        self, *, older_than_s: float = 60.0, max_age_s: float = 86_400.0, limit: int = 100
    ) -> int:
        """Ask the providers about payments that have waited ``older_than_s``; settle as told.

        Covers lost webhooks and a crash between the provider call and storing its answer
        (the create is repeated with the same idempotency key). Returns how many settled.
        """
        now = self._clock()
        call = system_call("reconcile", now)
        async with self._db.read() as session:
            rows = await TopupRepository(session).unsettled_payments(
                list(self._providers),
                updated_before=now - timedelta(seconds=older_than_s),
                created_after=now - timedelta(seconds=max_age_s),
                limit=limit,
            )
        settled = 0
        for row in rows:
            provider = self._providers[row.provider]
            try:
                if row.provider_payment_id is None:
                    intent = await self._create_at_provider(provider, row, now=now)
                else:
                    intent = await provider.get_payment(row.provider_payment_id)
            except (PaymentNotFoundError, PaymentProviderError) as exc:
                log.warning("reconcile payment %s: %s", row.id, exc)
                await self._touch(row.id, now)
                continue
            _, outcome = await self._record_intent(row.id, intent, call)
            settled += outcome is SettleOutcome.SETTLED
        return settled

    async def _touch(self, payment_id: uuid.UUID, now: datetime) -> None:
        async with self._db.write() as session:
            row = await TopupRepository(session).lock_payment(payment_id)
            if row is not None:
                row.updated_at = now

    # --- helpers --------------------------------------------------------------------------

    def _provider(self, name: str) -> PaymentProvider:
        provider = self._providers.get(name)
        if provider is None:
            raise UnknownProviderError(f"no payment provider {name!r}")
        return provider


def _validate_amount(
    amount_minor: int, currency: str, tenant_currency: str, minimum: int, maximum: int
) -> None:
    if currency != tenant_currency:
        raise TopupRefusedError(f"currency must be {tenant_currency}, got {currency!r}")
    if currency not in units.CURRENCIES:
        raise TopupRefusedError(f"currency {currency} cannot be carried by a credit token")
    if not minimum <= amount_minor <= maximum:
        raise TopupRefusedError(
            f"amount must be {minimum}..{maximum} minor units of {currency}, got {amount_minor}"
        )
    if amount_minor > MAX_TOKEN_AMOUNT_MINOR:
        raise TopupRefusedError(
            f"amount must be at most {MAX_TOKEN_AMOUNT_MINOR} minor units (one credit token)"
        )


def _adopt_provider_id(
    payment_id: uuid.UUID, row: PaymentRow | None, intent: PaymentIntent
) -> PaymentRow:
    """Record the provider's id for our payment; a different id than before is a mismatch."""
    if row is None:
        raise NotFoundError(f"no payment {payment_id}")
    if row.provider_payment_id is None:
        row.provider_payment_id = intent.provider_payment_id
    elif row.provider_payment_id != intent.provider_payment_id:
        raise SettlementMismatchError(
            f"payment {payment_id}: the provider answered for "
            f"{intent.provider_payment_id!r}, we recorded {row.provider_payment_id!r}"
        )
    return row


def _same_request(row: PaymentRow, fingerprint: str) -> PaymentRow:
    if row.request_hash != fingerprint:
        raise IdempotencyKeyReusedError(
            f"Idempotency-Key {row.idempotency_key!r} was used for a different top-up "
            f"(payment {row.id})"
        )
    return row


def _result(row: PaymentRow, *, replayed: bool, intent: PaymentIntent | None = None) -> TopupResult:
    return TopupResult(
        payment_id=row.id,
        supply_account_id=row.supply_account_id,
        status=PaymentState(row.status),
        amount_minor=row.amount_minor,
        currency=row.currency,
        provider=row.provider,
        provider_payment_id=row.provider_payment_id,
        client_secret=None if intent is None else intent.client_secret,
        next_action_url=None if intent is None else intent.next_action_url,
        replayed=replayed,
    )
