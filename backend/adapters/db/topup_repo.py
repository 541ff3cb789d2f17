"""Queries of the top-up → token path, scoped in SQL: accounts, payments, webhook events, tokens.

Every query that serves a caller takes a :class:`~backend.domain.auth.Scope` and filters
in the ``WHERE`` clause (DESIGN §7: scoping lives in the data layer, not in handlers): a
customer sees their own supply accounts, a reseller its customers', a utility its
tenant's, the platform everything. An account outside the scope is indistinguishable
from one that does not exist. Queries made by the system itself (settlement from a
verified webhook, the dispatcher) are unscoped and say so in their names.

Writes run in the caller's unit of work (``Database.write()``); rows that will change
are read with ``FOR UPDATE`` (PostgreSQL; SQLite holds its write lock already). Database
failures become :class:`~backend.errors.StorageError`; a unique-key race is reported as
:class:`DuplicateKeyError` so a service can re-read what the other writer committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, Select, and_, false, func, or_, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.alert_tables import AlertKind, AlertRow
from backend.adapters.db.engine import WRITE_SESSION
from backend.adapters.db.ledger_tables import AccountRow, TransferRow
from backend.adapters.db.repos import visible
from backend.adapters.db.tables import (
    MeterRow,
    PartnerRow,
    PaymentRow,
    SplitRuleRow,
    SupplyAccountRow,
    TenantRow,
    TokenRow,
    WebhookEventRow,
)
from backend.domain.auth import Scope
from backend.domain.topups import APPLIES_TO_TOPUP, PaymentState, TokenState, TopupRule
from backend.errors import StorageError, WriteTransactionRequiredError

# SQLSTATE unique_violation (PostgreSQL Appendix A); sqlite3 extended result codes.
_PG_UNIQUE_VIOLATION: Final = "23505"
_SQLITE_UNIQUE: Final = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})
_IN_FLIGHT: Final = (TokenState.PENDING.value, TokenState.SENT.value)


class DuplicateKeyError(StorageError):
    """A concurrent transaction committed the same unique key first; re-read and carry on."""


def is_unique_violation(exc: IntegrityError) -> bool:
    """Whether ``exc`` is a unique or primary-key violation (on PostgreSQL or SQLite)."""
    orig = exc.orig
    return (
        getattr(orig, "sqlstate", None) == _PG_UNIQUE_VIOLATION
        or getattr(orig, "sqlite_errorname", None) in _SQLITE_UNIQUE
    )


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Map SQLAlchemy/driver failures to the backend's tree (house style rule 9)."""
    try:
        yield
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise DuplicateKeyError(f"{what}: written concurrently by another transaction") from exc
        raise StorageError(f"{what}: the database refused the write: {exc.orig}") from exc
    except DBAPIError as exc:
        raise StorageError(f"{what}: database error: {exc.orig}") from exc


def scope_filter(scope: Scope) -> ColumnElement[bool]:
    """The ``WHERE`` clause restricting :class:`SupplyAccountRow` to ``scope``.

    The provisioning repositories' own rule (:func:`backend.adapters.db.repos.visible`),
    so a top-up sees exactly the accounts the rest of the API shows the caller.
    """
    return visible(SupplyAccountRow, scope)


class TopupRepository:
    """The top-up path's rows in one session (one unit of work)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @property
    def session(self) -> AsyncSession:
        """The unit of work (for other repositories, e.g. the ledger's, to join it)."""
        return self._session

    def _require_write(self) -> None:
        if not self._session.info.get(WRITE_SESSION):
            raise WriteTransactionRequiredError(
                "top-up writes need a session from Database.write()"
            )

    async def _one(self, stmt: Select[Any], what: str) -> Any:
        with translated(what):
            return (await self._session.scalars(stmt)).first()

    # --- accounts -------------------------------------------------------------------------

    async def supply_account(self, scope: Scope, account_id: int) -> SupplyAccountRow | None:
        """The supply account ``account_id`` if ``scope`` may see it."""
        stmt = select(SupplyAccountRow).where(
            SupplyAccountRow.id == account_id, scope_filter(scope)
        )
        row: SupplyAccountRow | None = await self._one(stmt, "supply_account")
        return row

    async def account_context(
        self, scope: Scope | None, account_id: int, *, key: str | None = None
    ) -> tuple[SupplyAccountRow, TenantRow, MeterRow | None, PaymentRow | None] | None:
        """A supply account with its tenant, its meter and its payment under ``key``.

        One query (these four are read together on every top-up); ``None`` if ``scope``
        may not see the account. ``scope=None`` is system use (settlement).
        """
        payment_on = (
            and_(
                PaymentRow.supply_account_id == SupplyAccountRow.id,
                PaymentRow.idempotency_key == key,
            )
            if key is not None
            else false()
        )
        stmt = (
            select(SupplyAccountRow, TenantRow, MeterRow, PaymentRow)
            .join(TenantRow, TenantRow.id == SupplyAccountRow.tenant_id)
            .outerjoin(MeterRow, MeterRow.supply_account_id == SupplyAccountRow.id)
            .outerjoin(PaymentRow, payment_on)
            .where(SupplyAccountRow.id == account_id)
        )
        if scope is not None:
            stmt = stmt.where(scope_filter(scope))
        with translated("account_context"):
            row = (await self._session.execute(stmt)).first()
        if row is None:
            return None
        account, tenant, meter, payment = row
        return account, tenant, meter, payment

    async def meter_of(self, account_id: int, *, lock: bool = False) -> MeterRow | None:
        """The meter attached to a supply account, locked for update if ``lock``."""
        stmt = select(MeterRow).where(MeterRow.supply_account_id == account_id)
        if lock:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        row: MeterRow | None = await self._one(stmt, "meter_of")
        return row

    async def ledger_balance(self, ledger_account_id: int) -> int:
        """Credits minus debits of one ledger account (minor units)."""
        stmt = select(AccountRow.credits_posted - AccountRow.debits_posted).where(
            AccountRow.id == ledger_account_id
        )
        with translated("ledger_balance"):
            value = await self._session.scalar(stmt)
        if value is None:
            raise StorageError(f"ledger account {ledger_account_id} vanished")
        return int(value)

    # --- split rules ----------------------------------------------------------------------

    async def topup_rules(self, account: SupplyAccountRow) -> list[TopupRule]:
        """The TOPUP rule set that applies to ``account``, in rule order.

        Rules of the account's tenant and tariff; a rule paying a reseller's partner
        account applies only to that reseller's customers.
        """
        stmt = (
            select(SplitRuleRow, PartnerRow.ledger_account_id, PartnerRow.kind)
            .join(PartnerRow, PartnerRow.id == SplitRuleRow.partner_id)
            .where(
                SplitRuleRow.tenant_id == account.tenant_id,
                SplitRuleRow.tariff_code == account.tariff_code,
                SplitRuleRow.applies_to == APPLIES_TO_TOPUP,
                or_(
                    PartnerRow.reseller_id.is_(None),
                    PartnerRow.reseller_id == account.reseller_id,
                ),
            )
            .order_by(SplitRuleRow.position, SplitRuleRow.id)
        )
        with translated("topup_rules"):
            rows = (await self._session.execute(stmt)).all()
        return [
            TopupRule(
                kind=rule.kind,
                value=rule.value,
                partner_account_id=ledger_id,
                partner_kind=partner_kind,
            )
            for rule, ledger_id, partner_kind in rows
        ]

    # --- payments -------------------------------------------------------------------------

    async def payment_by_key(self, account_id: int, key: str) -> PaymentRow | None:
        """The payment made with ``Idempotency-Key`` ``key`` on a supply account."""
        stmt = select(PaymentRow).where(
            PaymentRow.supply_account_id == account_id, PaymentRow.idempotency_key == key
        )
        row: PaymentRow | None = await self._one(stmt, "payment_by_key")
        return row

    async def add_payment(self, row: PaymentRow) -> None:
        """Insert a new payment (flushed now, so a duplicate key raises here)."""
        self._require_write()
        with translated("add_payment"):
            self._session.add(row)
            await self._session.flush()

    async def lock_payment(self, payment_id: uuid.UUID) -> PaymentRow | None:
        """A payment by our id, locked for update (system use)."""
        stmt = (
            select(PaymentRow)
            .where(PaymentRow.id == payment_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        row: PaymentRow | None = await self._one(stmt, "lock_payment")
        return row

    async def lock_payment_by_provider_id(
        self, provider: str, provider_payment_id: str
    ) -> PaymentRow | None:
        """A payment by the provider's id for it, locked for update (system use)."""
        stmt = (
            select(PaymentRow)
            .where(
                PaymentRow.provider == provider,
                PaymentRow.provider_payment_id == provider_payment_id,
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        row: PaymentRow | None = await self._one(stmt, "lock_payment_by_provider_id")
        return row

    async def payment(self, scope: Scope, payment_id: uuid.UUID) -> PaymentRow | None:
        """A payment, if ``scope`` may see its supply account."""
        stmt = (
            select(PaymentRow)
            .join(SupplyAccountRow, SupplyAccountRow.id == PaymentRow.supply_account_id)
            .where(PaymentRow.id == payment_id, scope_filter(scope))
        )
        row: PaymentRow | None = await self._one(stmt, "payment")
        return row

    async def unsettled_payments(
        self,
        providers: Sequence[str],
        *,
        updated_before: datetime,
        created_after: datetime,
        limit: int,
    ) -> list[PaymentRow]:
        """Payments still waiting for the provider (system use: reconciliation), oldest first."""
        stmt = (
            select(PaymentRow)
            .where(
                PaymentRow.status.in_(
                    [PaymentState.CREATED, PaymentState.PENDING, PaymentState.REQUIRES_ACTION]
                ),
                PaymentRow.provider.in_(list(providers)),
                PaymentRow.updated_at < updated_before,
                PaymentRow.created_at > created_after,
            )
            .order_by(PaymentRow.updated_at)
            .limit(limit)
        )
        with translated("unsettled_payments"):
            return list((await self._session.scalars(stmt)).all())

    # --- webhook events -------------------------------------------------------------------

    async def event_seen(self, provider: str, event_id: str) -> bool:
        """Whether a webhook event was processed before."""
        with translated("event_seen"):
            row = await self._session.get(WebhookEventRow, (provider, event_id))
        return row is not None

    async def add_event(self, row: WebhookEventRow) -> None:
        """Record a processed webhook event, flushed now: a concurrent duplicate raises here."""
        self._require_write()
        with translated("add_event"):
            self._session.add(row)
            await self._session.flush()

    # --- tokens ---------------------------------------------------------------------------

    def add_token(self, row: TokenRow) -> None:
        """Put a signed message in the outbox (flushed with the unit of work)."""
        self._require_write()
        self._session.add(row)

    async def token_of_payment(self, payment_id: uuid.UUID) -> TokenRow | None:
        """The credit token issued for a payment, if any."""
        stmt = select(TokenRow).where(TokenRow.payment_id == payment_id)
        row: TokenRow | None = await self._one(stmt, "token_of_payment")
        return row

    async def tokens_in_flight(self, meter_id: int) -> tuple[int, int]:
        """How many of a meter's tokens are not yet applied or rejected, and their amount."""
        stmt = select(func.count(), func.coalesce(func.sum(TokenRow.amount_minor), 0)).where(
            TokenRow.meter_id == meter_id, TokenRow.status.in_(_IN_FLIGHT)
        )
        with translated("tokens_in_flight"):
            count, amount = (await self._session.execute(stmt)).one()
        return int(count or 0), int(amount or 0)

    async def token_history(
        self, meter_id: int, *, limit: int, before_msg_id: int | None
    ) -> list[TokenRow]:
        """A meter's tokens, newest first, ``limit`` at a time (keyset paging on msg_id)."""
        stmt = select(TokenRow).where(TokenRow.meter_id == meter_id)
        if before_msg_id is not None:
            stmt = stmt.where(TokenRow.msg_id < before_msg_id)
        stmt = stmt.order_by(TokenRow.msg_id.desc()).limit(limit)
        with translated("token_history"):
            return list((await self._session.scalars(stmt)).all())

    # --- ledger lines of a payment -------------------------------------------------------

    async def transfers_of_group(self, group: uuid.UUID) -> list[tuple[TransferRow, str, str, str]]:
        """The transfers of one linked batch, each with the credited account's code and the
        name and kind of its partner (``""`` for an account that is not a partner's)."""
        stmt = (
            select(
                TransferRow,
                AccountRow.code,
                func.coalesce(PartnerRow.name, ""),
                func.coalesce(PartnerRow.kind, ""),
            )
            .join(AccountRow, AccountRow.id == TransferRow.credit_account_id)
            .outerjoin(PartnerRow, PartnerRow.ledger_account_id == TransferRow.credit_account_id)
            .where(TransferRow.linked_group == group)
            .order_by(TransferRow.created_at, TransferRow.id)
        )
        with translated("transfers_of_group"):
            rows = (await self._session.execute(stmt)).all()
        return [(t, str(code), str(name), str(kind)) for t, code, name, kind in rows]

    # --- alerts ---------------------------------------------------------------------------

    def add_alert(
        self,
        *,
        tenant_id: int,
        kind: AlertKind,
        at: datetime,
        detail: dict[str, Any],
        meter_id: int | None = None,
        token_id: int | None = None,
        payment_id: uuid.UUID | None = None,
    ) -> None:
        """Raise an alert in this unit of work."""
        self._require_write()
        self._session.add(
            AlertRow(
                tenant_id=tenant_id,
                kind=kind.value,
                meter_id=meter_id,
                token_id=token_id,
                payment_id=payment_id,
                detail=detail,
                created_at=at,
            )
        )
