"""What a customer sees of a supply account: balance, token history, a receipt per top-up.

Read-only use cases, each one read transaction, scoped to the caller in SQL
(:func:`backend.adapters.db.topup_repo.scope_filter`): an account or payment the caller
may not see is :class:`~backend.service.errors.NotFoundError`, exactly like a missing one.

- **Balance**: the ledger's PREPAID balance (authoritative money, minor units), the
  meter's last reported credit (rating units) and when it was reported, and the tokens
  still in flight (issued, not yet applied or rejected) with their total — the gap
  between the two balances a customer may notice right after a top-up.
- **Token history**: the meter's signed messages, newest first, paged by message id.
- **Receipt**: one top-up as paid, credited and shared out, read back from the ledger
  transfers of its linked batch (so it shows what was posted, even if split rules changed
  since), with its token's id and status.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from backend.adapters.db.engine import Database
from backend.adapters.db.tables import SupplyAccountRow, TokenRow
from backend.adapters.db.topup_repo import TopupRepository
from backend.domain.auth import Action
from backend.domain.ledger import AccountCode, TransferCode, derive_id
from backend.domain.topups import TAX_PARTNER_KIND, PaymentState, TokenState
from backend.service.context import Call, Page, PageRequest, require
from backend.service.errors import NotFoundError

#: How receipt lines are ordered by transfer code.
_LINE_ORDER: Final = tuple(TransferCode)


@dataclass(frozen=True, slots=True, kw_only=True)
class BalanceView:
    """A supply account's money as the ledger and the meter see it."""

    supply_account_id: int
    currency: str
    ledger_balance_minor: int
    meter_id: int | None
    meter_credit_milli: int | None
    meter_credit_at: datetime | None
    tokens_in_flight: int
    in_flight_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenView:
    """One signed message of a meter, as listed in its history."""

    meter_id: int
    msg_id: int
    kind: str
    payment_id: uuid.UUID | None
    amount_minor: int | None
    status: TokenState
    result_status: str | None
    credit_after_milli: int | None
    attempts: int
    created_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptLine:
    """One ledger transfer of a top-up: who got how much, and why."""

    code: TransferCode
    #: The partner paid (``""`` for the customer's own credit).
    payee: str
    #: The partner's kind (``UTILITY``, ``RESELLER``, ``PAYMENT_FEE``, …; ``""`` for credit).
    payee_kind: str
    payee_account_code: AccountCode
    amount_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptView:
    """One top-up: paid, credited, fees, taxes, the shares paid out, and its token."""

    payment_id: uuid.UUID
    supply_account_id: int
    status: PaymentState
    amount_minor: int
    currency: str
    provider: str
    provider_payment_id: str | None
    created_at: datetime
    settled_at: datetime | None
    #: What reached the customer's credit (the whole amount: splits are the utility's).
    credited_minor: int
    #: Payment fees within this top-up's transfers (paid by the utility, see the lines).
    fees_minor: int
    #: Taxes within this top-up's transfers (levies and VAT are posted on consumption).
    taxes_minor: int
    lines: list[ReceiptLine]
    token_msg_id: int | None
    token_status: TokenState | None


def _token_view(row: TokenRow) -> TokenView:
    return TokenView(
        meter_id=row.meter_id,
        msg_id=row.msg_id,
        kind=row.kind,
        payment_id=row.payment_id,
        amount_minor=row.amount_minor,
        status=TokenState(row.status),
        result_status=row.result_status,
        credit_after_milli=row.credit_after_milli,
        attempts=row.attempts,
        created_at=row.created_at,
        completed_at=row.completed_at,
    )


class AccountService:
    """Read-only views of supply accounts and their top-ups."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def _account(
        self, repo: TopupRepository, call: Call, account_id: int
    ) -> SupplyAccountRow:
        account = await repo.supply_account(call.scope, account_id)
        if account is None:
            raise NotFoundError(f"no supply account {account_id}")
        return account

    async def balance(self, call: Call, supply_account_id: int) -> BalanceView:
        """Ledger balance, meter credit and tokens in flight of one supply account."""
        require(call, Action.SUPPLY_ACCOUNT_READ)
        async with self._db.read() as session:
            repo = TopupRepository(session)
            context = await repo.account_context(call.scope, supply_account_id)
            if context is None:
                raise NotFoundError(f"no supply account {supply_account_id}")
            account, tenant, meter, _ = context
            ledger = await repo.ledger_balance(account.ledger_account_id)
            count, amount = (0, 0) if meter is None else await repo.tokens_in_flight(meter.id)
        return BalanceView(
            supply_account_id=account.id,
            currency=tenant.currency,
            ledger_balance_minor=ledger,
            meter_id=None if meter is None else meter.id,
            meter_credit_milli=None if meter is None else meter.last_credit_milli,
            meter_credit_at=None if meter is None else meter.last_reading_at,
            tokens_in_flight=count,
            in_flight_minor=amount,
        )

    async def token_history(
        self, call: Call, supply_account_id: int, page: PageRequest | None = None
    ) -> Page[TokenView]:
        """The account's meter's tokens, newest first.

        The cursor is a message id: ``after`` continues the list after it (with older
        tokens); ``next_after`` is ``None`` on the last page.
        """
        require(call, Action.TOPUP_READ)
        page = page or PageRequest()
        before = page.after if isinstance(page.after, int) else None
        async with self._db.read() as session:
            repo = TopupRepository(session)
            account = await self._account(repo, call, supply_account_id)
            meter = await repo.meter_of(account.id)
            rows = (
                []
                if meter is None
                else await repo.token_history(meter.id, limit=page.limit, before_msg_id=before)
            )
        items = [_token_view(row) for row in rows]
        next_after = items[-1].msg_id if len(items) == page.limit else None
        return Page(items=items, next_after=next_after)

    async def receipt(self, call: Call, payment_id: uuid.UUID) -> ReceiptView:
        """The receipt of one top-up payment."""
        require(call, Action.TOPUP_READ)
        async with self._db.read() as session:
            repo = TopupRepository(session)
            payment = await repo.payment(call.scope, payment_id)
            if payment is None:
                raise NotFoundError(f"no payment {payment_id}")
            transfers = await repo.transfers_of_group(derive_id("topup-batch", str(payment.id)))
            token = await repo.token_of_payment(payment.id)
        lines = sorted(
            (
                ReceiptLine(
                    code=TransferCode(t.code),
                    payee=name,
                    payee_kind=kind,
                    payee_account_code=AccountCode(code),
                    amount_minor=t.amount,
                )
                for t, code, name, kind in transfers
            ),
            # The credit first, then the shares; a batch's transfers share one timestamp.
            key=lambda x: (_LINE_ORDER.index(x.code), x.payee, x.amount_minor),
        )
        return ReceiptView(
            payment_id=payment.id,
            supply_account_id=payment.supply_account_id,
            status=PaymentState(payment.status),
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            provider=payment.provider,
            provider_payment_id=payment.provider_payment_id,
            created_at=payment.created_at,
            settled_at=payment.settled_at,
            credited_minor=sum(x.amount_minor for x in lines if x.code is TransferCode.TOPUP),
            fees_minor=sum(x.amount_minor for x in lines if x.code is TransferCode.FEE),
            taxes_minor=sum(
                x.amount_minor
                for x in lines
                if x.payee_kind == TAX_PARTNER_KIND or x.payee_account_code is AccountCode.TAX
            ),
            lines=lines,
            token_msg_id=None if token is None else token.msg_id,
            token_status=None if token is None else TokenState(token.status),
        )
