"""Queries of the customer view, scoped in SQL: consumption slots, statement rows, live snapshots.

Read-only. Every query that serves a caller starts from a supply account found through
:func:`backend.adapters.db.topup_repo.scope_filter` (the balance and token history's own
rule), so another tenant's, reseller's or customer's account is simply not found; the
queries after that are keyed by that account's ids. Queries made by the system itself
(the live poller reading every watched account) are unscoped and say so in their names.

Sums of ``BIGINT`` columns come back as ``Decimal`` on PostgreSQL (``NUMERIC``); they are
integral and converted with ``int``. Per-band lists are JSON arrays; their elements are
summed in SQL (``->>`` on PostgreSQL, ``JSON_EXTRACT`` on SQLite) so a month of
ten-second readings is never loaded row by row.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import BigInteger, ColumnElement, cast, func, literal_column, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.adapters.db.ledger_tables import AccountRow, TransferRow
from backend.adapters.db.tables import MeterRow, PartnerRow, SupplyAccountRow, TariffRow, TenantRow
from backend.adapters.db.topup_repo import scope_filter
from backend.domain.auth import Scope
from backend.errors import StorageError
from firmware_protocol.tariff import MAX_BANDS

#: Most ids in one ``IN`` list (well under SQLite's and asyncpg's parameter limits).
IN_CHUNK: Final = 500
#: Rows fetched per round trip when a query streams.
STREAM_ROWS: Final = 2_000

_C = ConsumptionIntervalRow


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Map driver failures to :class:`~backend.errors.StorageError` (house style rule 9)."""
    try:
        yield
    except DBAPIError as exc:
        raise StorageError(f"{what}: database error: {exc.orig}") from exc


def _element(column: Any, index: int) -> ColumnElement[int]:
    """Element ``index`` of a JSON integer array as a ``BIGINT`` (``NULL`` past its end)."""
    return cast(column[index].as_string(), BigInteger)


def _sums() -> list[ColumnElement[Any]]:
    """The sums of an interval group, in :class:`IntervalSums` field order."""
    return [
        func.count(),
        func.sum(_C.import_wh),
        func.sum(_C.block_milli),
        func.sum(_C.days),
        func.sum(_C.standing_milli),
        func.sum(_C.total_milli),
        func.sum(_C.payer_minor),
        func.sum(_C.unrated_block_wh),
        *(func.sum(_element(_C.band_wh, i)) for i in range(MAX_BANDS)),
        *(func.sum(_element(_C.band_milli, i)) for i in range(MAX_BANDS)),
    ]


def _int(value: Any) -> int:
    return 0 if value is None else int(value)


def _trimmed(values: Sequence[Any]) -> tuple[int, ...]:
    out = [_int(v) for v in values]
    while out and values[len(out) - 1] is None:
        out.pop()
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class IntervalSums:
    """Sums over a group of billed intervals of one tariff."""

    tariff_id: int
    readings: int
    import_wh: int
    block_milli: int
    days: int
    standing_milli: int
    total_milli: int
    payer_minor: int
    unrated_block_wh: int
    #: Per band, in the tariff's band order (as long as the tariff's band list).
    band_wh: tuple[int, ...]
    band_milli: tuple[int, ...]

    @classmethod
    def of(cls, tariff_id: Any, values: Sequence[Any]) -> IntervalSums:
        scalars = [_int(v) for v in values[:8]]
        bands = values[8:]
        return cls(
            tariff_id=int(tariff_id),
            readings=scalars[0],
            import_wh=scalars[1],
            block_milli=scalars[2],
            days=scalars[3],
            standing_milli=scalars[4],
            total_milli=scalars[5],
            payer_minor=scalars[6],
            unrated_block_wh=scalars[7],
            band_wh=_trimmed(bands[:MAX_BANDS]),
            band_milli=_trimmed(bands[MAX_BANDS:]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotSums:
    """The sums of one time slot: intervals whose ``to_ts - 1`` lies in ``[start, start+size)``."""

    start: int
    sums: IntervalSums


@dataclass(frozen=True, slots=True, kw_only=True)
class TariffInfo:
    """What a statement or history shows of a tariff version (by its wire id)."""

    wire_id: int
    code: str
    version: int
    bands: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PostedTransfer:
    """A ledger transfer touching a prepaid account."""

    id: uuid.UUID
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: str
    reference: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareRow:
    """One billed interval's reading key, payer minor units and rule shares."""

    meter_id: int
    to_ts: int
    payer_minor: int
    shares: list[list[int]]


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveRow:
    """The raw values a live snapshot is made of (one query per batch of accounts)."""

    supply_account_id: int
    currency: str
    ledger_balance_minor: int
    ledger_version: int
    meter_id: int | None
    meter_credit_milli: int | None
    meter_credit_at: datetime | None
    ingest_ts: int | None
    ingest_credit_milli: int | None
    relay: str | None
    power_w: int | None


class HistoryRepository:
    """The customer view's reads in one session."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    # --- the account ----------------------------------------------------------------------

    async def account(
        self, scope: Scope, account_id: int
    ) -> tuple[SupplyAccountRow, TenantRow] | None:
        """The supply account and its tenant, if ``scope`` may see the account."""
        stmt = (
            select(SupplyAccountRow, TenantRow)
            .join(TenantRow, TenantRow.id == SupplyAccountRow.tenant_id)
            .where(SupplyAccountRow.id == account_id, scope_filter(scope))
        )
        with translated("account"):
            row = (await self._session.execute(stmt)).first()
        return None if row is None else (row[0], row[1])

    async def tariffs(self, tenant_id: int, wire_ids: set[int]) -> dict[int, TariffInfo]:
        """The tenant's tariff versions with these wire ids."""
        if not wire_ids:
            return {}
        stmt = select(TariffRow.wire_id, TariffRow.code, TariffRow.version, TariffRow.body).where(
            TariffRow.tenant_id == tenant_id, TariffRow.wire_id.in_(sorted(wire_ids))
        )
        with translated("tariffs"):
            rows = (await self._session.execute(stmt)).all()
        out = {}
        for wire_id, code, version, body in rows:
            bands = body.get("bands", []) if isinstance(body, dict) else []
            names = tuple(
                str(b.get("name", f"#{i}")) if isinstance(b, dict) else f"#{i}"
                for i, b in enumerate(bands)
            )
            out[int(wire_id)] = TariffInfo(
                wire_id=int(wire_id), code=code, version=int(version), bands=names
            )
        return out

    # --- consumption history --------------------------------------------------------------

    async def slot_sums(
        self, account_id: int, *, after: int, until: int, size: int, phase: int
    ) -> list[SlotSums]:
        """Interval sums per slot and tariff for intervals with ``after < to_ts <= until``.

        Slot ``k`` holds the intervals with ``phase + k*size <= to_ts - 1 < phase + (k+1)*size``
        (integer division in SQL: ``to_ts > after >= phase``, so it never sees a negative).
        ``size`` and ``phase`` are integers computed by the caller and inlined, so the
        ``GROUP BY`` expression is textually the selected one on PostgreSQL.
        """
        if size <= 0 or not 0 <= phase < size or after < phase:
            raise ValueError("slots need size > 0, 0 <= phase < size and after >= phase")
        offset = literal_column(str(int(phase) + 1), BigInteger)
        slot = (_C.to_ts - offset) // literal_column(str(int(size)), BigInteger)
        stmt = (
            select(slot, _C.tariff_id, *_sums())
            .where(_C.supply_account_id == account_id, _C.to_ts > after, _C.to_ts <= until)
            .group_by(slot, _C.tariff_id)
        )
        with translated("slot_sums"):
            rows = (await self._session.execute(stmt)).all()
        return [
            SlotSums(start=phase + int(r[0]) * size, sums=IntervalSums.of(r[1], r[2:]))
            for r in rows
        ]

    # --- statements -----------------------------------------------------------------------

    async def billed_sums(
        self, account_id: int, start: datetime, end: datetime
    ) -> list[IntervalSums]:
        """Interval sums per tariff of the intervals billed (created) in ``[start, end)``."""
        stmt = (
            select(_C.tariff_id, *_sums())
            .where(_C.supply_account_id == account_id, _C.created_at >= start, _C.created_at < end)
            .group_by(_C.tariff_id)
            .order_by(_C.tariff_id)
        )
        with translated("billed_sums"):
            rows = (await self._session.execute(stmt)).all()
        return [IntervalSums.of(r[0], r[1:]) for r in rows]

    async def billed_shares(
        self, account_id: int, start: datetime, end: datetime
    ) -> AsyncIterator[ShareRow]:
        """The intervals billed in ``[start, end)``: reading key, payer minor, shares (streamed)."""
        stmt = (
            select(_C.meter_id, _C.to_ts, _C.payer_minor, _C.shares)
            .where(_C.supply_account_id == account_id, _C.created_at >= start, _C.created_at < end)
            .order_by(_C.id)
            .execution_options(yield_per=STREAM_ROWS)
        )
        with translated("billed_shares"):
            result = await self._session.stream(stmt)
            async for meter_id, to_ts, payer_minor, shares in result:
                yield ShareRow(
                    meter_id=int(meter_id),
                    to_ts=int(to_ts),
                    payer_minor=int(payer_minor),
                    shares=shares if isinstance(shares, list) else [],
                )

    async def payer_carry(self, account_id: int, before: datetime) -> int:
        """The payer's carry (milli) before ``before``: each meter's last billed interval's."""
        last = (
            select(func.max(_C.id))
            .where(_C.supply_account_id == account_id, _C.created_at < before)
            .group_by(_C.meter_id)
        )
        stmt = select(func.coalesce(func.sum(_C.carry_milli), 0)).where(_C.id.in_(last))
        with translated("payer_carry"):
            return _int(await self._session.scalar(stmt))

    async def tax_accounts(self, tenant_id: int, kind: str) -> dict[int, str]:
        """Ledger account → name of the tenant's partners of ``kind`` (e.g. TAX_AUTHORITY)."""
        stmt = select(PartnerRow.ledger_account_id, PartnerRow.name).where(
            PartnerRow.tenant_id == tenant_id, PartnerRow.kind == kind
        )
        with translated("tax_accounts"):
            rows = (await self._session.execute(stmt)).all()
        return {int(account): str(name) for account, name in rows}

    async def balance_at(self, ledger_account_id: int, at: datetime) -> int:
        """The account's balance from the transfers created before ``at``.

        Read as the posted balance less what was posted since ``at`` (index on
        ``(account, created_at)``): a statement is usually of a recent month.
        """
        with translated("balance_at"):
            current = await self._session.scalar(
                select(AccountRow.credits_posted - AccountRow.debits_posted).where(
                    AccountRow.id == ledger_account_id
                )
            )
            if current is None:
                raise StorageError(f"ledger account {ledger_account_id} vanished")
            credited = await self._session.scalar(
                select(func.coalesce(func.sum(TransferRow.amount), 0)).where(
                    TransferRow.credit_account_id == ledger_account_id,
                    TransferRow.created_at >= at,
                )
            )
            debited = await self._session.scalar(
                select(func.coalesce(func.sum(TransferRow.amount), 0)).where(
                    TransferRow.debit_account_id == ledger_account_id,
                    TransferRow.created_at >= at,
                )
            )
        return int(current) - _int(credited) + _int(debited)

    async def transfers(
        self, ledger_account_id: int, start: datetime, end: datetime
    ) -> list[PostedTransfer]:
        """The transfers debiting or crediting the account created in ``[start, end)``, in order."""
        touching = TransferRow.debit_account_id == ledger_account_id
        touching = touching | (TransferRow.credit_account_id == ledger_account_id)
        stmt = (
            select(TransferRow)
            .where(touching, TransferRow.created_at >= start, TransferRow.created_at < end)
            .order_by(TransferRow.created_at, TransferRow.id)
        )
        with translated("transfers"):
            rows = (await self._session.scalars(stmt)).all()
        return [
            PostedTransfer(
                id=r.id,
                debit_account_id=r.debit_account_id,
                credit_account_id=r.credit_account_id,
                amount=r.amount,
                code=r.code,
                reference=r.reference,
                created_at=r.created_at,
            )
            for r in rows
        ]

    # --- live snapshots -------------------------------------------------------------------

    def _live_select(self) -> Any:
        return (
            select(
                SupplyAccountRow.id,
                TenantRow.currency,
                AccountRow.credits_posted - AccountRow.debits_posted,
                AccountRow.version,
                MeterRow.id,
                MeterRow.last_credit_milli,
                MeterRow.last_reading_at,
                MeterIngestRow.last_ts,
                MeterIngestRow.last_credit_milli,
                MeterIngestRow.last_relay,
                MeterIngestRow.last_power_w,
            )
            .join(TenantRow, TenantRow.id == SupplyAccountRow.tenant_id)
            .join(AccountRow, AccountRow.id == SupplyAccountRow.ledger_account_id)
            .outerjoin(MeterRow, MeterRow.supply_account_id == SupplyAccountRow.id)
            .outerjoin(MeterIngestRow, MeterIngestRow.meter_id == MeterRow.id)
        )

    @staticmethod
    def _live_row(r: Any) -> LiveRow:
        return LiveRow(
            supply_account_id=int(r[0]),
            currency=str(r[1]),
            ledger_balance_minor=int(r[2]),
            ledger_version=int(r[3]),
            meter_id=None if r[4] is None else int(r[4]),
            meter_credit_milli=r[5],
            meter_credit_at=r[6],
            ingest_ts=r[7],
            ingest_credit_milli=r[8],
            relay=r[9],
            power_w=r[10],
        )

    async def live(self, scope: Scope, account_id: int) -> LiveRow | None:
        """The live values of one account, if ``scope`` may see it."""
        stmt = self._live_select().where(SupplyAccountRow.id == account_id, scope_filter(scope))
        with translated("live"):
            row = (await self._session.execute(stmt)).first()
        return None if row is None else self._live_row(row)

    async def live_unscoped(self, account_ids: Sequence[int]) -> list[LiveRow]:
        """The live values of these accounts (system use: the live poller)."""
        out: list[LiveRow] = []
        ids = sorted(set(account_ids))
        for i in range(0, len(ids), IN_CHUNK):
            stmt = self._live_select().where(SupplyAccountRow.id.in_(ids[i : i + IN_CHUNK]))
            with translated("live_unscoped"):
                rows = (await self._session.execute(stmt)).all()
            out.extend(self._live_row(r) for r in rows)
        return out
