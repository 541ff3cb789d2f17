"""Queries of partner settlement: a partner's ledger movements, consumption shares and carries.

Every method starts from a partner row found through the scoped partner repository
(:meth:`SettlementRepository.partner`), so a caller never reaches another tenant's
ledger account, intervals or ingest state: the account id and tenant id they filter on
are the visible partner's own.

* :meth:`ledger_groups` sums the partner account's transfers before a period (the
  opening balance) and inside it (statement lines), grouped by transfer code, direction
  and source, in **one** statement — so one snapshot even under PostgreSQL's READ
  COMMITTED, and opening plus lines is the closing balance by construction.
* :meth:`intervals` streams the ``consumption_intervals`` of the partner's tenant whose
  interval ends inside a period; their JSON ``shares`` are read in Python (JSON queries
  differ between SQLite and PostgreSQL).
* :meth:`ingest_carries` reads the ``carry`` and ``pending`` of the tenant's meters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import case, func, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.adapters.db.ledger_tables import AccountRow, TransferRow
from backend.adapters.db.repos import translated, visible
from backend.adapters.db.tables import PartnerRow, TenantRow
from backend.domain.auth import Scope

#: Transfer references of a top-up settlement and of a consumption posting.
TOPUP_REFERENCE: Final = "payment:"
CONSUMPTION_REFERENCE: Final = "consumption:"
#: Rows fetched per round trip when streaming intervals.
_STREAM_BATCH: Final = 2000


@dataclass(frozen=True, slots=True, kw_only=True)
class PartnerAccount:
    """A visible partner with its tenant and its ledger account."""

    partner: PartnerRow
    tenant: TenantRow
    account: AccountRow


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerGroup:
    """Transfers of one account with the same code, direction and source, in one bucket.

    ``before`` is ``True`` for transfers before the period (the opening balance),
    ``False`` for those inside it. ``amount_minor`` is signed: credits ``+``, debits ``-``.
    """

    before: bool
    code: str
    incoming: bool
    source: str
    transfers: int
    amount_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IntervalShares:
    """What a statement needs of one billed interval."""

    import_wh: int
    shares: list[list[int]]


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestCarry:
    """One meter's unposted money: its ``carry`` and ``pending`` JSON as stored."""

    meter_id: int
    carry: dict[str, Any]
    pending: dict[str, Any]


class SettlementRepository:
    """Read-only settlement queries of one unit of work."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def partner(self, scope: Scope, partner_id: int) -> PartnerAccount | None:
        """The partner if ``scope`` may see it, with its tenant and ledger account."""
        stmt = (
            select(PartnerRow, TenantRow, AccountRow)
            .join(TenantRow, TenantRow.id == PartnerRow.tenant_id)
            .join(AccountRow, AccountRow.id == PartnerRow.ledger_account_id)
            .where(PartnerRow.id == partner_id, visible(PartnerRow, scope))
            .execution_options(populate_existing=True)
        )
        with translated("read partners"):
            row = (await self._session.execute(stmt)).one_or_none()
        if row is None:
            return None
        partner, tenant, account = row
        return PartnerAccount(partner=partner, tenant=tenant, account=account)

    async def ledger_groups(
        self, owner: PartnerAccount, start: datetime, end: datetime
    ) -> list[LedgerGroup]:
        """The partner account's transfers created before ``end``, summed per bucket.

        Buckets: before ``start`` or not, transfer code, direction, source (the reference
        of a top-up settlement, of a consumption posting, or anything else).
        """
        account_id = owner.account.id
        incoming = TransferRow.credit_account_id == account_id
        # One inner select labels every derived column; the outer one groups by those
        # columns, so PostgreSQL sees identical GROUP BY expressions (bound parameters
        # inside CASE would otherwise be numbered apart and not match).
        inner = (
            select(
                case((TransferRow.created_at < start, 1), else_=0).label("before"),
                TransferRow.code.label("code"),
                case((incoming, 1), else_=0).label("incoming"),
                case(
                    (TransferRow.reference.startswith(TOPUP_REFERENCE), literal_column("'TOPUP'")),
                    (
                        TransferRow.reference.startswith(CONSUMPTION_REFERENCE),
                        literal_column("'CONSUMPTION'"),
                    ),
                    else_=literal_column("'OTHER'"),
                ).label("source"),
                case((incoming, TransferRow.amount), else_=-TransferRow.amount).label("signed"),
            )
            .where(
                or_(
                    TransferRow.credit_account_id == account_id,
                    TransferRow.debit_account_id == account_id,
                ),
                TransferRow.created_at < end,
            )
            .subquery()
        )
        stmt = select(
            inner.c.before,
            inner.c.code,
            inner.c.incoming,
            inner.c.source,
            func.count(),
            func.sum(inner.c.signed),
        ).group_by(inner.c.before, inner.c.code, inner.c.incoming, inner.c.source)
        with translated("read ledger_transfers"):
            rows = (await self._session.execute(stmt)).all()
        # PostgreSQL sums BIGINT into NUMERIC (a Decimal here); the values are integral.
        return [
            LedgerGroup(
                before=bool(before),
                code=str(code),
                incoming=bool(incoming_),
                source=str(source),
                transfers=int(count),
                amount_minor=int(total),
            )
            for before, code, incoming_, source, count, total in rows
        ]

    async def intervals(
        self, owner: PartnerAccount, start_ts: int, end_ts: int
    ) -> AsyncIterator[IntervalShares]:
        """The tenant's billed intervals ending in ``(start_ts, end_ts]`` (Unix seconds).

        An interval is ``(from_ts, to_ts]``: one ending exactly at ``start_ts`` lies wholly
        before the period, one ending at ``end_ts`` wholly inside it.
        """
        stmt = (
            select(ConsumptionIntervalRow.import_wh, ConsumptionIntervalRow.shares)
            .where(
                ConsumptionIntervalRow.tenant_id == owner.tenant.id,
                ConsumptionIntervalRow.to_ts > start_ts,
                ConsumptionIntervalRow.to_ts <= end_ts,
            )
            .order_by(ConsumptionIntervalRow.id)
            .execution_options(yield_per=_STREAM_BATCH)
        )
        with translated("read consumption_intervals"):
            result = await self._session.stream(stmt)
            try:
                async for import_wh, shares in result:
                    yield IntervalShares(import_wh=int(import_wh), shares=shares)
            finally:
                await result.close()

    async def ingest_carries(self, owner: PartnerAccount) -> list[IngestCarry]:
        """Every meter of the partner's tenant with its carry and pending money."""
        stmt = (
            select(MeterIngestRow.meter_id, MeterIngestRow.carry, MeterIngestRow.pending)
            .where(MeterIngestRow.tenant_id == owner.tenant.id)
            .order_by(MeterIngestRow.meter_id)
        )
        with translated("read meter_ingest"):
            rows = (await self._session.execute(stmt)).all()
        return [
            IngestCarry(meter_id=int(meter), carry=dict(carry), pending=dict(pending))
            for meter, carry, pending in rows
        ]
