"""Queries of alerts, webhook endpoints, the notification outbox and the scheduled checks' state.

Two kinds of caller:

* **Scoped** (the API): :class:`AlertRepository` and :class:`WebhookEndpointRepository`
  add the caller's scope to every query, like :mod:`backend.adapters.db.repos`: tenant
  staff (utility admin, support) see their tenant's rows, the platform admin every
  tenant's, resellers and customers none. Another tenant's row is simply not found.
* **System** (background loops serving every tenant): :class:`NotificationOutbox` (fan-out
  of alerts into outbox rows, claims of due deliveries) and :class:`CheckStateRepository`
  (what the scheduled checks read and the state they keep).

Claims lock with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL so several backend instances
take different deliveries; the fan-out locks its cursor row and the checks take a
transaction-level advisory lock, so those run one instance at a time. On SQLite the write
transaction already excludes every other writer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, false, func, select, text, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from backend.adapters.db.alert_tables import AlertKind, AlertRow
from backend.adapters.db.engine import WRITE_SESSION
from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.adapters.db.notify_tables import (
    GatewayAlertStateRow,
    MeterAlertStateRow,
    NotificationRow,
    NotifyCursorRow,
    WebhookEndpointRow,
)
from backend.adapters.db.repos import MAX_PAGE, Page, translated
from backend.adapters.db.tables import GatewayRow, MeterRow, SupplyAccountRow
from backend.domain.alerting import DeliveryStatus, UsageInterval
from backend.domain.auth import Role, Scope, ScopeError
from backend.errors import WriteTransactionRequiredError

#: pg_advisory_xact_lock key serialising the scheduled checks across instances.
_PG_CHECKS_LOCK: Final = 0x766F6C74_616C7274  # "voltalrt"
_CURSOR_ID: Final = 1


def _require_write(session: AsyncSession, what: str) -> None:
    if not session.info.get(WRITE_SESSION):
        raise WriteTransactionRequiredError(f"{what}: writes need a session from Database.write()")


def _staff_tenant(column: InstrumentedAttribute[int], scope: Scope) -> ColumnElement[bool]:
    """Tenant staff see their tenant's rows, the platform every tenant's, others none."""
    if scope.role in (Role.RESELLER, Role.CUSTOMER):
        return false()
    return true() if scope.tenant_id is None else column == scope.tenant_id


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be 1..{MAX_PAGE}")


# ------------------------------------------------------------------------- scoped


class AlertRepository:
    """Alerts as a caller may see them."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def list(
        self,
        scope: Scope,
        *,
        limit: int,
        after: int | None = None,
        kind: AlertKind | None = None,
        open_only: bool | None = None,
    ) -> Page[AlertRow]:
        """Up to ``limit`` visible alerts with ids after ``after``, ascending, filtered."""
        _check_limit(limit)
        stmt = select(AlertRow).where(_staff_tenant(AlertRow.tenant_id, scope))
        if kind is not None:
            stmt = stmt.where(AlertRow.kind == kind.value)
        if open_only is True:
            stmt = stmt.where(AlertRow.resolved_at.is_(None))
        elif open_only is False:
            stmt = stmt.where(AlertRow.resolved_at.is_not(None))
        if after is not None:
            stmt = stmt.where(AlertRow.id > after)
        stmt = stmt.order_by(AlertRow.id).limit(limit + 1)
        with translated("list alerts"):
            rows = list((await self._session.scalars(stmt)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, rows[-1].id if more else None)

    async def get(self, scope: Scope, alert_id: int, *, lock: bool = False) -> AlertRow | None:
        """The alert if ``scope`` may see it."""
        stmt = select(AlertRow).where(
            AlertRow.id == alert_id, _staff_tenant(AlertRow.tenant_id, scope)
        )
        if lock:
            _require_write(self._session, "alerts")
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        with translated("read alerts"):
            return (await self._session.scalars(stmt)).one_or_none()


class WebhookEndpointRepository:
    """Webhook endpoints as a caller may see them."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, scope: Scope, row: WebhookEndpointRow) -> WebhookEndpointRow:
        """Insert an endpoint of a tenant ``scope`` may manage."""
        _require_write(self._session, "webhook_endpoints")
        if scope.tenant_id is not None and row.tenant_id != scope.tenant_id:
            raise ScopeError(f"{scope.actor} may not add an endpoint to tenant {row.tenant_id}")
        self._session.add(row)
        with translated("create webhook_endpoints"):
            await self._session.flush()
        return row

    async def get(
        self, scope: Scope, endpoint_id: int, *, lock: bool = False
    ) -> WebhookEndpointRow | None:
        """The endpoint (deleted or not) if ``scope`` may see it."""
        stmt = select(WebhookEndpointRow).where(
            WebhookEndpointRow.id == endpoint_id,
            _staff_tenant(WebhookEndpointRow.tenant_id, scope),
        )
        if lock:
            _require_write(self._session, "webhook_endpoints")
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        with translated("read webhook_endpoints"):
            return (await self._session.scalars(stmt)).one_or_none()

    async def list(
        self, scope: Scope, *, limit: int, after: int | None = None
    ) -> Page[WebhookEndpointRow]:
        """Up to ``limit`` visible endpoints not deleted, ids after ``after``, ascending."""
        _check_limit(limit)
        stmt = select(WebhookEndpointRow).where(
            _staff_tenant(WebhookEndpointRow.tenant_id, scope),
            WebhookEndpointRow.deleted_at.is_(None),
        )
        if after is not None:
            stmt = stmt.where(WebhookEndpointRow.id > after)
        stmt = stmt.order_by(WebhookEndpointRow.id).limit(limit + 1)
        with translated("list webhook_endpoints"):
            rows = list((await self._session.scalars(stmt)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, rows[-1].id if more else None)

    async def count_active(self, tenant_id: int) -> int:
        """How many endpoints of ``tenant_id`` are not deleted (the caller checked the tenant)."""
        stmt = select(func.count()).where(
            WebhookEndpointRow.tenant_id == tenant_id, WebhookEndpointRow.deleted_at.is_(None)
        )
        with translated("count webhook_endpoints"):
            return int(await self._session.scalar(stmt) or 0)

    async def cancel_pending(self, endpoint_id: int) -> int:
        """Mark the endpoint's undelivered notifications CANCELLED; how many there were."""
        _require_write(self._session, "notifications")
        stmt = (
            select(NotificationRow)
            .where(
                NotificationRow.endpoint_id == endpoint_id,
                NotificationRow.status == DeliveryStatus.PENDING.value,
            )
            .with_for_update()
        )
        with translated("cancel notifications"):
            rows = list((await self._session.scalars(stmt)).all())
            for row in rows:
                row.status = DeliveryStatus.CANCELLED.value
            await self._session.flush()
        return len(rows)


# ------------------------------------------------------------------------- system: outbox


@dataclass(frozen=True, slots=True)
class Claimed:
    """A notification claimed for one attempt, with where and how to send it."""

    id: int
    event_id: uuid.UUID
    alert_id: int
    endpoint_id: int
    attempt: int
    url: str
    secret: str
    payload: dict[str, Any]


class NotificationOutbox:
    """The outbox of alert notifications, for the deliverer (every tenant)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def cursor(self) -> int:
        """The fan-out's high-water mark (0 before the first fan-out)."""
        with translated("read notify_cursor"):
            value = await self._session.scalar(
                select(NotifyCursorRow.alert_id).where(NotifyCursorRow.id == _CURSOR_ID)
            )
        return int(value or 0)

    async def lock_cursor(self, now: datetime) -> NotifyCursorRow:
        """The cursor row, created if missing, locked until the transaction ends."""
        _require_write(self._session, "notify_cursor")
        values = {"id": _CURSOR_ID, "alert_id": 0, "updated_at": now}
        dialect = self._session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = select(NotifyCursorRow).where(NotifyCursorRow.id == _CURSOR_ID).with_for_update()
        with translated("lock notify_cursor"):
            # Two instances starting together may both try to create it: first one wins.
            await self._session.execute(
                insert(NotifyCursorRow).values(**values).on_conflict_do_nothing()
            )
            return (
                await self._session.scalars(stmt.execution_options(populate_existing=True))
            ).one()

    async def relevant_after(self, after_id: int, limit: int) -> list[AlertRow]:
        """Up to ``limit`` alerts after ``after_id`` of tenants with endpoints, ascending."""
        listening = select(WebhookEndpointRow.tenant_id).where(
            WebhookEndpointRow.deleted_at.is_(None)
        )
        stmt = (
            select(AlertRow)
            .where(AlertRow.id > after_id, AlertRow.tenant_id.in_(listening))
            .order_by(AlertRow.id)
            .limit(limit)
        )
        with translated("read alerts"):
            return list((await self._session.scalars(stmt)).all())

    async def safe_cursor(self, after_id: int, horizon: datetime) -> int:
        """How far the cursor may move from ``after_id``: up to the first alert younger than
        ``horizon`` (exclusive), else to the newest alert."""
        with translated("read alerts"):
            young = await self._session.scalar(
                select(func.min(AlertRow.id)).where(
                    AlertRow.id > after_id, AlertRow.created_at > horizon
                )
            )
            if young is not None:
                return int(young) - 1
            newest = await self._session.scalar(
                select(func.max(AlertRow.id)).where(AlertRow.id > after_id)
            )
        return after_id if newest is None else int(newest)

    async def endpoints_of(self, tenant_ids: Iterable[int]) -> list[WebhookEndpointRow]:
        """The endpoints (not deleted) of these tenants."""
        ids = sorted(set(tenant_ids))
        if not ids:
            return []
        stmt = (
            select(WebhookEndpointRow)
            .where(WebhookEndpointRow.tenant_id.in_(ids), WebhookEndpointRow.deleted_at.is_(None))
            .order_by(WebhookEndpointRow.id)
        )
        with translated("read webhook_endpoints"):
            return list((await self._session.scalars(stmt)).all())

    async def existing(self, alert_ids: Sequence[int]) -> set[tuple[int, int]]:
        """The (alert, endpoint) pairs among ``alert_ids`` that already have a notification."""
        if not alert_ids:
            return set()
        stmt = select(NotificationRow.alert_id, NotificationRow.endpoint_id).where(
            NotificationRow.alert_id.in_(alert_ids)
        )
        with translated("read notifications"):
            return {(int(a), int(e)) for a, e in (await self._session.execute(stmt)).all()}

    async def add_all(self, rows: Sequence[NotificationRow]) -> None:
        """Insert outbox rows (the fan-out holds the cursor lock: no concurrent inserter)."""
        _require_write(self._session, "notifications")
        self._session.add_all(rows)
        with translated("create notifications"):
            await self._session.flush()

    async def any_due(self, now: datetime) -> bool:
        """Whether a PENDING notification is due at ``now`` (a read, before claiming)."""
        stmt = (
            select(NotificationRow.id)
            .where(
                NotificationRow.status == DeliveryStatus.PENDING.value,
                NotificationRow.next_attempt_at <= now,
            )
            .limit(1)
        )
        with translated("read notifications"):
            return (await self._session.scalar(stmt)) is not None

    async def claim_due(self, now: datetime, limit: int) -> list[tuple[NotificationRow, str, str]]:
        """Up to ``limit`` PENDING notifications due at ``now`` with their URL and secret.

        The rows stay locked until the transaction ends; the caller moves each one's
        ``next_attempt_at`` past the attempt (the lease) before committing.
        """
        _require_write(self._session, "notifications")
        stmt = (
            select(NotificationRow, WebhookEndpointRow.url, WebhookEndpointRow.secret)
            .join(WebhookEndpointRow, WebhookEndpointRow.id == NotificationRow.endpoint_id)
            .where(
                NotificationRow.status == DeliveryStatus.PENDING.value,
                NotificationRow.next_attempt_at <= now,
                WebhookEndpointRow.deleted_at.is_(None),
            )
            .order_by(NotificationRow.next_attempt_at, NotificationRow.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=NotificationRow)
            .execution_options(populate_existing=True)
        )
        with translated("claim notifications"):
            rows = (await self._session.execute(stmt)).all()
        return [(row, str(url), str(secret)) for row, url, secret in rows]

    async def lock(self, ids: Sequence[int]) -> list[NotificationRow]:
        """These notifications, locked in id order."""
        _require_write(self._session, "notifications")
        if not ids:
            return []
        stmt = (
            select(NotificationRow)
            .where(NotificationRow.id.in_(sorted(ids)))
            .order_by(NotificationRow.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        with translated("lock notifications"):
            return list((await self._session.scalars(stmt)).all())


# ------------------------------------------------------------------------- system: checks


@dataclass(frozen=True, slots=True)
class MeterCheck:
    """What a check needs of one meter: its newest values, threshold and previous state."""

    meter_id: int
    tenant_id: int
    supply_account_id: int
    gateway_id: str
    last_ts: int | None
    last_credit_milli: int | None
    last_relay: str | None
    low_credit_minor: int
    state: MeterAlertStateRow | None


@dataclass(frozen=True, slots=True)
class GatewayCheck:
    """What a check needs of one gateway: its retained state, newest reading, previous state."""

    gateway_id: str
    tenant_id: int
    online: bool
    state_at: datetime | None
    last_reading_ts: int | None
    state: GatewayAlertStateRow | None


class CheckStateRepository:
    """Reads and state of the scheduled checks (every tenant)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def serialise(self) -> None:
        """Hold the checks' lock until the transaction ends (PostgreSQL; SQLite has one writer)."""
        _require_write(self._session, "alert checks")
        if self._session.get_bind().dialect.name == "postgresql":
            with translated("lock alert checks"):
                await self._session.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_CHECKS_LOCK}
                )

    async def meters(
        self, *, after: int = 0, limit: int = 1000, ids: Sequence[int] | None = None
    ) -> list[MeterCheck]:
        """Meters with ingest state, ascending by id: a page after ``after``, or ``ids``."""
        stmt = (
            select(
                MeterIngestRow.meter_id,
                MeterIngestRow.tenant_id,
                MeterIngestRow.supply_account_id,
                MeterRow.gateway_id,
                MeterIngestRow.last_ts,
                MeterIngestRow.last_credit_milli,
                MeterIngestRow.last_relay,
                SupplyAccountRow.low_credit_minor,
                MeterAlertStateRow,
            )
            .join(MeterRow, MeterRow.id == MeterIngestRow.meter_id)
            .join(SupplyAccountRow, SupplyAccountRow.id == MeterIngestRow.supply_account_id)
            .outerjoin(MeterAlertStateRow, MeterAlertStateRow.meter_id == MeterIngestRow.meter_id)
            .order_by(MeterIngestRow.meter_id)
            .execution_options(populate_existing=True)
        )
        if ids is not None:
            stmt = stmt.where(MeterIngestRow.meter_id.in_(sorted(ids)))
        else:
            stmt = stmt.where(MeterIngestRow.meter_id > after).limit(limit)
        with translated("read meter checks"):
            rows = (await self._session.execute(stmt)).all()
        return [
            MeterCheck(
                meter_id=int(r[0]),
                tenant_id=int(r[1]),
                supply_account_id=int(r[2]),
                gateway_id=str(r[3]),
                last_ts=r[4],
                last_credit_milli=r[5],
                last_relay=r[6],
                low_credit_minor=int(r[7]),
                state=r[8],
            )
            for r in rows
        ]

    async def gateways(
        self, *, after: str = "", limit: int = 1000, ids: Sequence[str] | None = None
    ) -> list[GatewayCheck]:
        """Gateways with their newest reading (any meter), ascending by id."""
        newest = (
            select(MeterRow.gateway_id, func.max(MeterIngestRow.last_ts).label("last_ts"))
            .join(MeterIngestRow, MeterIngestRow.meter_id == MeterRow.id)
            .group_by(MeterRow.gateway_id)
            .subquery()
        )
        stmt = (
            select(
                GatewayRow.id,
                GatewayRow.tenant_id,
                GatewayRow.online,
                GatewayRow.state_at,
                newest.c.last_ts,
                GatewayAlertStateRow,
            )
            .outerjoin(newest, newest.c.gateway_id == GatewayRow.id)
            .outerjoin(GatewayAlertStateRow, GatewayAlertStateRow.gateway_id == GatewayRow.id)
            .order_by(GatewayRow.id)
            .execution_options(populate_existing=True)
        )
        if ids is not None:
            stmt = stmt.where(GatewayRow.id.in_(sorted(ids)))
        else:
            stmt = stmt.where(GatewayRow.id > after).limit(limit)
        with translated("read gateway checks"):
            rows = (await self._session.execute(stmt)).all()
        return [
            GatewayCheck(
                gateway_id=str(r[0]),
                tenant_id=int(r[1]),
                online=bool(r[2]),
                state_at=r[3],
                last_reading_ts=None if r[4] is None else int(r[4]),
                state=r[5],
            )
            for r in rows
        ]

    async def usage(self, supply_account_id: int, *, since_ts: int) -> list[UsageInterval]:
        """The account's billed intervals that ended after ``since_ts`` (Unix s)."""
        c = ConsumptionIntervalRow
        stmt = (
            select(c.from_ts, c.to_ts, c.total_milli)
            .where(c.supply_account_id == supply_account_id, c.to_ts > since_ts)
            .order_by(c.to_ts)
        )
        with translated("read consumption_intervals"):
            rows = (await self._session.execute(stmt)).all()
        return [UsageInterval(int(f), int(t), int(m)) for f, t, m in rows]

    async def credit_of(self, supply_account_id: int) -> int | None:
        """The newest credit a meter of the account reported (milli), if any."""
        stmt = (
            select(MeterIngestRow.last_credit_milli)
            .where(
                MeterIngestRow.supply_account_id == supply_account_id,
                MeterIngestRow.last_credit_milli.is_not(None),
            )
            .order_by(MeterIngestRow.last_ts.desc())
            .limit(1)
        )
        with translated("read meter_ingest"):
            value = await self._session.scalar(stmt)
        return None if value is None else int(value)

    def add(self, row: MeterAlertStateRow | GatewayAlertStateRow | AlertRow) -> None:
        """Stage a new state row or alert in this unit of work (flushed at commit)."""
        _require_write(self._session, "alert checks")
        self._session.add(row)

    async def flush(self) -> None:
        with translated("write alert checks"):
            await self._session.flush()
