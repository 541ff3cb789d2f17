"""Consumption ingest's repository: bulk reads and writes of one ingest unit of work.

Ingest writes tens of thousands of rows a second, so this repository speaks SQLAlchemy
Core with ``executemany`` (one statement, many parameter sets) rather than the ORM's
unit of work, which costs several times more per row (NOTES.md: ~60 k rows/s for Core
batches against ~610 single-row transactions/s). Every method runs in the caller's
write transaction from :meth:`~backend.adapters.db.engine.Database.write`; nothing here
commits. Locking follows the ledger repository: PostgreSQL ``SELECT … FOR UPDATE`` in
ascending key order (meter ingest rows, then ledger accounts); SQLite is already
write-locked by ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.alert_tables import AlertRow
from backend.adapters.db.base import Base
from backend.adapters.db.ingest_tables import (
    ConsumptionIntervalRow,
    MeterIngestRow,
    ReadingBatchRow,
)
from backend.adapters.db.ledger_tables import AccountRow, TransferRow
from backend.adapters.db.repos import translated
from backend.adapters.db.tables import (
    GatewayRow,
    MeterRow,
    PartnerRow,
    SplitRuleRow,
    SupplyAccountRow,
    TariffRow,
    TenantRow,
    TokenRow,
)
from backend.domain.ledger import Account, AccountCode, AccountSpec, Transfer

_CONSUMPTION = "CONSUMPTION"


def _table(model: type[Base]) -> Table:
    """A mapped class's Core table (typed for Core statements)."""
    return cast(Table, model.__table__)


_CREDIT = "CREDIT"


@dataclass(frozen=True, slots=True)
class MeterInfo:
    """What ingest needs to know of a provisioned meter."""

    meter_id: int
    gateway_id: str
    tenant_id: int
    reseller_id: int | None
    supply_account_id: int
    prepaid_account_id: int
    tariff_code: str
    created_at: datetime
    timezone: str


@dataclass(frozen=True, slots=True)
class TariffVersion:
    """One published version of a tariff code."""

    wire_id: int
    body: dict[str, Any]
    activation_at: datetime


@dataclass(frozen=True, slots=True)
class RuleRow:
    """A CONSUMPTION rule with its partner's ledger account and reseller."""

    rule_id: int
    kind: str
    value: int
    partner_account_id: int
    partner_reseller_id: int | None


@dataclass(frozen=True, slots=True)
class IngestRow:
    """A ``meter_ingest`` row as ingest reads it (a plain value: no ORM instrumentation)."""

    meter_id: int
    state: dict[str, Any]
    rule_set: str
    totals: dict[str, Any]
    carry: dict[str, Any]
    pending: dict[str, Any]
    last_ts: int | None
    last_credit_milli: int | None
    last_relay: str | None
    last_power_w: int | None
    last_import_wh: int | None
    last_token_id: int | None
    quarantine: str | None
    reconcile_diff_milli: int | None


_INGEST_COLUMNS = tuple(IngestRow.__dataclass_fields__)


class IngestRepository:
    """Bulk statements of the ingest unit of work."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._pg = session.bind is not None and session.bind.dialect.name == "postgresql"

    # ------------------------------------------------------------------ batches

    async def seen_batches(self, keys: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """The ``(gateway, seq)`` keys among ``keys`` already ingested."""
        if not keys:
            return set()
        gateways = sorted({g for g, _ in keys})
        seqs = sorted({s for _, s in keys})
        stmt = select(ReadingBatchRow.gateway_id, ReadingBatchRow.seq).where(
            ReadingBatchRow.gateway_id.in_(gateways), ReadingBatchRow.seq.in_(seqs)
        )
        with translated("seen_batches"):
            rows = (await self._session.execute(stmt)).all()
        wanted = set(keys)
        return {(g, s) for g, s in rows if (g, s) in wanted}

    async def add_batches(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record batches as ingested (a concurrent duplicate raises a conflict)."""
        if rows:
            with translated("add_batches"):
                await self._session.execute(insert(_table(ReadingBatchRow)), list(rows))

    # ------------------------------------------------------------------ reference data

    async def meters(self, ids: Iterable[int]) -> dict[int, MeterInfo]:
        """Provisioned meters among ``ids`` with their account, tariff code and zone."""
        ids = sorted(set(ids))
        if not ids:
            return {}
        stmt = (
            select(
                MeterRow.id,
                MeterRow.gateway_id,
                MeterRow.tenant_id,
                SupplyAccountRow.reseller_id,
                MeterRow.supply_account_id,
                SupplyAccountRow.ledger_account_id,
                SupplyAccountRow.tariff_code,
                MeterRow.created_at,
                TenantRow.timezone,
            )
            .join(SupplyAccountRow, SupplyAccountRow.id == MeterRow.supply_account_id)
            .join(TenantRow, TenantRow.id == MeterRow.tenant_id)
            .where(MeterRow.id.in_(ids))
        )
        with translated("meters"):
            rows = (await self._session.execute(stmt)).all()
        return {r[0]: MeterInfo(*r) for r in rows}

    async def tariff_versions(
        self, keys: Iterable[tuple[int, str]]
    ) -> dict[tuple[int, str], list[TariffVersion]]:
        """Every published version of each ``(tenant, code)``, by activation."""
        keys = sorted(set(keys))
        if not keys:
            return {}
        stmt = (
            select(
                TariffRow.tenant_id,
                TariffRow.code,
                TariffRow.wire_id,
                TariffRow.body,
                TariffRow.activation_at,
            )
            .where(or_(*(and_(TariffRow.tenant_id == t, TariffRow.code == c) for t, c in keys)))
            .order_by(TariffRow.activation_at, TariffRow.version)
        )
        out: dict[tuple[int, str], list[TariffVersion]] = {k: [] for k in keys}
        with translated("tariff_versions"):
            for tenant, code, wire, body, at in await self._session.execute(stmt):
                out[(tenant, code)].append(TariffVersion(wire, body, at))
        return out

    async def tariff_signature(self) -> tuple[int, int]:
        """A cheap change detector for cached tariffs and rules: (tariff rows, max id)."""
        stmt = select(func.count(TariffRow.id), func.coalesce(func.max(TariffRow.id), 0))
        with translated("tariff_signature"):
            count, top = (await self._session.execute(stmt)).one()
        return int(count), int(top)

    async def consumption_rules(
        self, keys: Iterable[tuple[int, str]]
    ) -> dict[tuple[int, str], list[RuleRow]]:
        """CONSUMPTION rules per ``(tenant, tariff code)`` in rule order."""
        keys = sorted(set(keys))
        if not keys:
            return {}
        stmt = (
            select(
                SplitRuleRow.tenant_id,
                SplitRuleRow.tariff_code,
                SplitRuleRow.id,
                SplitRuleRow.kind,
                SplitRuleRow.value,
                PartnerRow.ledger_account_id,
                PartnerRow.reseller_id,
            )
            .join(PartnerRow, PartnerRow.id == SplitRuleRow.partner_id)
            .where(
                SplitRuleRow.applies_to == _CONSUMPTION,
                or_(
                    *(
                        and_(SplitRuleRow.tenant_id == t, SplitRuleRow.tariff_code == c)
                        for t, c in keys
                    )
                ),
            )
            .order_by(SplitRuleRow.position, SplitRuleRow.id)
        )
        out: dict[tuple[int, str], list[RuleRow]] = {k: [] for k in keys}
        with translated("consumption_rules"):
            for tenant, code, rid, kind, value, account, reseller in await self._session.execute(
                stmt
            ):
                out[(tenant, code)].append(RuleRow(rid, kind, value, account, reseller))
        return out

    async def last_credit_tokens(self, meter_ids: Iterable[int]) -> dict[int, int]:
        """The highest credit-token message id issued per meter (meters without: absent)."""
        ids = sorted(set(meter_ids))
        if not ids:
            return {}
        stmt = (
            select(TokenRow.meter_id, func.max(TokenRow.msg_id))
            .where(TokenRow.kind == _CREDIT, TokenRow.meter_id.in_(ids))
            .group_by(TokenRow.meter_id)
        )
        with translated("last_credit_tokens"):
            return {m: int(x) for m, x in await self._session.execute(stmt)}

    # ------------------------------------------------------------------ meter state

    async def ingest_rows(self, meter_ids: Iterable[int]) -> dict[int, IngestRow]:
        """The ``meter_ingest`` rows of these meters, locked (PostgreSQL) in id order."""
        ids = sorted(set(meter_ids))
        if not ids:
            return {}
        t = _table(MeterIngestRow)
        stmt = (
            select(*(t.c[name] for name in _INGEST_COLUMNS))
            .where(t.c.meter_id.in_(ids))
            .order_by(t.c.meter_id)
        )
        if self._pg:
            stmt = stmt.with_for_update()
        with translated("ingest_rows"):
            rows = (await self._session.execute(stmt)).all()
        return {r[0]: IngestRow(*r) for r in rows}

    async def save_ingest_rows(
        self, new: Sequence[dict[str, Any]], changed: Sequence[dict[str, Any]]
    ) -> None:
        """Insert new ``meter_ingest`` rows and update changed ones (all columns)."""
        table = _table(MeterIngestRow)
        with translated("save_ingest_rows"):
            if new:
                await self._session.execute(insert(table), list(new))
            if changed:
                cols: dict[str, Any] = {c: bindparam(c) for c in changed[0] if c != "meter_id"}
                stmt = (
                    update(table).where(table.c.meter_id == bindparam("b_meter_id")).values(**cols)
                )
                params = [{**row, "b_meter_id": row["meter_id"]} for row in changed]
                for row in params:
                    del row["meter_id"]
                await self._session.execute(stmt, params)

    async def touch_meters(self, rows: Sequence[dict[str, Any]]) -> None:
        """Newest credit and reading time on ``meters`` (only when newer than stored)."""
        if not rows:
            return
        table = _table(MeterRow)
        stmt = (
            update(table)
            .where(
                table.c.id == bindparam("b_id"),
                or_(
                    table.c.last_reading_at.is_(None),
                    table.c.last_reading_at
                    <= bindparam("b_at", type_=MeterRow.last_reading_at.type),
                ),
            )
            .values(
                last_credit_milli=bindparam("b_credit"),
                last_reading_at=bindparam("b_at2", type_=MeterRow.last_reading_at.type),
            )
        )
        params = [
            {"b_id": r["id"], "b_at": r["at"], "b_at2": r["at"], "b_credit": r["credit"]}
            for r in rows
        ]
        with translated("touch_meters"):
            await self._session.execute(stmt, params)

    async def add_intervals(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert billed intervals."""
        if rows:
            with translated("add_intervals"):
                await self._session.execute(insert(_table(ConsumptionIntervalRow)), list(rows))

    async def add_alerts(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert alerts."""
        if rows:
            with translated("add_alerts"):
                await self._session.execute(insert(_table(AlertRow)), list(rows))

    # ------------------------------------------------------------------ ledger

    async def lock_accounts(self, ids: Iterable[int]) -> dict[int, Account]:
        """Ledger accounts, locked in ascending id order (PostgreSQL)."""
        ids = sorted(set(ids))
        if not ids:
            return {}
        t = _table(AccountRow)
        stmt = (
            select(
                t.c.id,
                t.c.currency,
                t.c.code,
                t.c.min_balance,
                t.c.debits_posted,
                t.c.credits_posted,
            )
            .where(t.c.id.in_(ids))
            .order_by(t.c.id)
        )
        if self._pg:
            stmt = stmt.with_for_update()
        with translated("lock_accounts"):
            rows = (await self._session.execute(stmt)).all()
        return {
            r[0]: Account(
                AccountSpec(id=r[0], currency=r[1], code=AccountCode(r[2]), min_balance=r[3]),
                r[4],
                r[5],
            )
            for r in rows
        }

    async def post(self, accounts: Sequence[Account], transfers: Sequence[Transfer]) -> None:
        """Write transfers checked by :func:`backend.domain.ledger.apply` and their accounts.

        The caller applied the transfers to the accounts it locked with
        :meth:`lock_accounts`; ids are derived from business keys and never posted before
        (the batch and reading de-duplication guarantee it; a collision raises).
        """
        if not transfers:
            return
        t = _table(AccountRow)
        stmt = (
            update(t)
            .where(t.c.id == bindparam("b_id"))
            .values(
                debits_posted=bindparam("b_debits"),
                credits_posted=bindparam("b_credits"),
                version=t.c.version + 1,
            )
        )
        with translated("post"):
            await self._session.execute(
                insert(_table(TransferRow)),
                [
                    {
                        "id": x.id,
                        "debit_account_id": x.debit_account_id,
                        "credit_account_id": x.credit_account_id,
                        "amount": x.amount,
                        "currency": x.currency,
                        "code": x.code.value,
                        "reference": x.reference,
                        "linked_group": x.linked_group,
                        "created_at": x.created_at,
                    }
                    for x in transfers
                ],
            )
            await self._session.execute(
                stmt,
                [
                    {"b_id": a.id, "b_debits": a.debits_posted, "b_credits": a.credits_posted}
                    for a in accounts
                ],
            )

    # ------------------------------------------------------------------ gateways

    async def gateway_state(
        self, gateway_id: str, *, online: bool, boot_seq: int, at: datetime
    ) -> bool:
        """Record a gateway's presence unless an older boot's message; True if stored."""
        t = _table(GatewayRow)
        stmt = (
            update(t)
            .where(
                t.c.id == gateway_id,
                or_(
                    t.c.boot_seq < boot_seq,
                    and_(
                        t.c.boot_seq == boot_seq,
                        or_(
                            t.c.state_at.is_(None),
                            t.c.state_at <= bindparam("b_at", at, type_=GatewayRow.state_at.type),
                        ),
                    ),
                ),
            )
            .values(online=online, boot_seq=boot_seq, state_at=at)
        )
        with translated("gateway_state"):
            result = await self._session.execute(stmt)
        return bool(getattr(result, "rowcount", 0))
