"""Scheduled checks (low and no credit, stale meters, offline gateways) and the alerting runtime.

:meth:`AlertingService.run_checks` looks at every meter with ingest state and every
gateway, asks :mod:`backend.domain.alerting` what changed since the previous check, and
writes the new check state together with the alerts it raises, in one unit of work — so
a crash never loses an alert whose state was saved nor raises one twice. It reads in
pages (read transactions, no lock) and opens a write transaction only for the subjects
whose state changes, where it reads them again under the checks' lock (an advisory lock
on PostgreSQL, the single writer on SQLite) and decides again: two backend instances
checking at once raise each alert once.

* **LOW_CREDIT / OUT_OF_CREDIT**: ``meter_ingest.last_credit_milli`` against the supply
  account's ``low_credit_minor`` (times 1000), with hysteresis (once per crossing; a top-up
  re-arms). LOW_CREDIT carries the days-of-credit-left estimate
  (:func:`estimate_days_left`, also for the customer view).
* **METER_STALE**: ``meter_ingest.last_ts`` older than ``meter_stale_after_s``; once per
  episode.
* **GATEWAY_OFFLINE**: a gateway whose retained state says offline, or that has been
  silent (no state message, no reading of its meters), for ``gateway_offline_after_s``;
  once per episode.

:func:`alerting_runtime` runs the checks every ``check_every_s`` and the notification
deliverer (:mod:`backend.service.notify`) as named background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.alert_tables import AlertKind, AlertRow
from backend.adapters.db.alerting_repo import CheckStateRepository, GatewayCheck, MeterCheck
from backend.adapters.db.engine import Database
from backend.adapters.db.notify_tables import GatewayAlertStateRow, MeterAlertStateRow
from backend.domain.alerting import (
    ESTIMATE_WINDOW_S,
    CreditEstimate,
    CreditLevel,
    Signal,
    credit_step,
    episode_step,
    gateway_offline,
    meter_stale,
)
from backend.domain.alerting import estimate_days_left as estimate_from
from backend.errors import BackendError
from backend.service.context import utc_now
from backend.service.notify import DeliverySettings, NotificationDeliverer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertingSettings:
    """Everything the checks and the deliverer of one process need, built once at start-up."""

    #: Run the check loop and the deliverer (off: an API-only process).
    run: bool = True
    #: Seconds between two rounds of checks (the first round waits this long too).
    check_every_s: float = 60.0
    #: A meter whose newest reading is older than this is stale (3 polls of 5 minutes).
    meter_stale_after_s: int = 900
    #: A gateway offline or silent for this long raises GATEWAY_OFFLINE.
    gateway_offline_after_s: int = 900
    #: Subjects read per page.
    page: int = 1000
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    def __post_init__(self) -> None:
        if self.check_every_s <= 0 or self.page < 1:
            raise ValueError("check_every_s must be > 0 and page >= 1")
        if self.meter_stale_after_s < 1 or self.gateway_offline_after_s < 1:
            raise ValueError("staleness thresholds must be >= 1 s")


@dataclass(frozen=True, slots=True)
class Raised:
    """One alert a round of checks raised."""

    kind: AlertKind
    tenant_id: int
    subject: str  #: ``meter:<serial>`` or ``gateway:<id>``


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What one round of checks looked at and raised."""

    meters: int
    gateways: int
    raised: tuple[Raised, ...]


async def estimate_days_left(
    session: AsyncSession, supply_account_id: int, now: datetime
) -> CreditEstimate:
    """Days of credit left for a supply account at the rate of its last seven days.

    Unscoped: the caller (the customer view, the checks) has already checked that its
    caller may see the account. Works in a read or a write session.
    """
    repo = CheckStateRepository(session)
    now_s = int(now.timestamp())
    credit = await repo.credit_of(supply_account_id)
    usage = await repo.usage(supply_account_id, since_ts=now_s - ESTIMATE_WINDOW_S)
    return estimate_from(usage, credit, now_s)


# ---------------------------------------------------------------- decisions of one subject


@dataclass(frozen=True, slots=True)
class _MeterOutcome:
    level: CreditLevel
    stale: bool
    signals: tuple[Signal, ...]

    def changes(self, state: MeterAlertStateRow | None) -> bool:
        if state is None:
            return self.level is not CreditLevel.OK or self.stale
        return self.level.value != state.credit_level or self.stale != state.stale


def _decide_meter(meter: MeterCheck, now_s: int, stale_after_s: int) -> _MeterOutcome:
    state = meter.state
    was_level = CreditLevel.OK if state is None else CreditLevel(state.credit_level)
    was_stale = False if state is None else state.stale
    level, credit_signal = credit_step(was_level, meter.last_credit_milli, meter.low_credit_minor)
    stale, stale_signal = episode_step(
        was_stale, meter_stale(meter.last_ts, now_s, stale_after_s), Signal.METER_STALE
    )
    signals = tuple(s for s in (credit_signal, stale_signal) if s is not None)
    return _MeterOutcome(level, stale, signals)


def _decide_gateway(gateway: GatewayCheck, now_s: int, after_s: int) -> tuple[bool, bool]:
    """(offline now, raise GATEWAY_OFFLINE?)."""
    was = False if gateway.state is None else gateway.state.offline
    offline = gateway_offline(
        online=gateway.online,
        state_at_s=None if gateway.state_at is None else int(gateway.state_at.timestamp()),
        last_reading_s=gateway.last_reading_ts,
        now_s=now_s,
        offline_after_s=after_s,
    )
    offline, signal = episode_step(was, offline, Signal.GATEWAY_OFFLINE)
    return offline, signal is not None


# ---------------------------------------------------------------- the service


class AlertingService:
    """The scheduled checks over one database."""

    def __init__(self, db: Database, settings: AlertingSettings | None = None) -> None:
        self._db = db
        self._settings = settings or AlertingSettings()

    async def run_checks(self, now: datetime) -> CheckReport:
        """One round of every check at ``now``; the alerts raised are committed with their state."""
        if now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        meters, raised = await self._check_meters(now)
        gateways, more = await self._check_gateways(now)
        return CheckReport(meters, gateways, (*raised, *more))

    async def _check_meters(self, now: datetime) -> tuple[int, list[Raised]]:
        settings = self._settings
        now_s = int(now.timestamp())
        seen, raised, after = 0, [], 0
        while True:
            async with self._db.read() as session:
                page = await CheckStateRepository(session).meters(after=after, limit=settings.page)
            seen += len(page)
            changed = [
                m.meter_id
                for m in page
                if _decide_meter(m, now_s, settings.meter_stale_after_s).changes(m.state)
            ]
            if changed:
                raised += await self._apply_meters(changed, now)
            if len(page) < settings.page:
                return seen, raised
            after = page[-1].meter_id

    async def _apply_meters(self, meter_ids: Sequence[int], now: datetime) -> list[Raised]:
        now_s = int(now.timestamp())
        raised: list[Raised] = []
        async with self._db.write() as session:
            repo = CheckStateRepository(session)
            await repo.serialise()
            for meter in await repo.meters(ids=meter_ids):
                outcome = _decide_meter(meter, now_s, self._settings.meter_stale_after_s)
                if not outcome.changes(meter.state):
                    continue  # another instance got here first
                if meter.state is None:
                    repo.add(
                        MeterAlertStateRow(
                            meter_id=meter.meter_id,
                            tenant_id=meter.tenant_id,
                            credit_level=outcome.level.value,
                            stale=outcome.stale,
                            updated_at=now,
                        )
                    )
                else:
                    meter.state.credit_level = outcome.level.value
                    meter.state.stale = outcome.stale
                    meter.state.updated_at = now
                for signal in outcome.signals:
                    detail = await self._meter_detail(session, meter, signal, now)
                    repo.add(
                        AlertRow(
                            tenant_id=meter.tenant_id,
                            kind=signal.value,
                            meter_id=meter.meter_id,
                            detail=detail,
                            created_at=now,
                        )
                    )
                    raised.append(
                        Raised(AlertKind(signal.value), meter.tenant_id, f"meter:{meter.meter_id}")
                    )
                    log.warning(
                        "alert %s: meter %d (tenant %d) %s",
                        signal.value,
                        meter.meter_id,
                        meter.tenant_id,
                        detail,
                    )
            await repo.flush()
        return raised

    async def _meter_detail(
        self, session: AsyncSession, meter: MeterCheck, signal: Signal, now: datetime
    ) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "supply_account_id": meter.supply_account_id,
            "gateway_id": meter.gateway_id,
            "last_ts": meter.last_ts,
        }
        if signal is Signal.METER_STALE:
            assert meter.last_ts is not None  # noqa: S101 - a meter without readings is not stale
            detail["silent_s"] = int(now.timestamp()) - meter.last_ts
            detail["stale_after_s"] = self._settings.meter_stale_after_s
            return detail
        detail["credit_milli"] = meter.last_credit_milli
        detail["low_credit_milli"] = meter.low_credit_minor * 1000
        detail["relay"] = meter.last_relay
        if signal is Signal.LOW_CREDIT:
            estimate = await estimate_days_left(session, meter.supply_account_id, now)
            detail["daily_milli"] = estimate.daily_milli
            detail["days_left"] = estimate.days_left
        return detail

    async def _check_gateways(self, now: datetime) -> tuple[int, list[Raised]]:
        settings = self._settings
        now_s = int(now.timestamp())
        seen, raised, after = 0, [], ""
        while True:
            async with self._db.read() as session:
                page = await CheckStateRepository(session).gateways(
                    after=after, limit=settings.page
                )
            seen += len(page)
            changed = [
                g.gateway_id
                for g in page
                if _decide_gateway(g, now_s, settings.gateway_offline_after_s)[0]
                != (False if g.state is None else g.state.offline)
            ]
            if changed:
                raised += await self._apply_gateways(changed, now)
            if len(page) < settings.page:
                return seen, raised
            after = page[-1].gateway_id

    async def _apply_gateways(self, gateway_ids: Sequence[str], now: datetime) -> list[Raised]:
        now_s = int(now.timestamp())
        after_s = self._settings.gateway_offline_after_s
        raised: list[Raised] = []
        async with self._db.write() as session:
            repo = CheckStateRepository(session)
            await repo.serialise()
            for gateway in await repo.gateways(ids=gateway_ids):
                offline, alert = _decide_gateway(gateway, now_s, after_s)
                was = False if gateway.state is None else gateway.state.offline
                if offline == was:
                    continue  # another instance got here first
                if gateway.state is None:
                    repo.add(
                        GatewayAlertStateRow(
                            gateway_id=gateway.gateway_id,
                            tenant_id=gateway.tenant_id,
                            offline=offline,
                            updated_at=now,
                        )
                    )
                else:
                    gateway.state.offline = offline
                    gateway.state.updated_at = now
                if not alert:
                    continue
                detail = {
                    "gateway_id": gateway.gateway_id,
                    "online": gateway.online,
                    "state_at": None if gateway.state_at is None else gateway.state_at.isoformat(),
                    "last_reading_ts": gateway.last_reading_ts,
                    "offline_after_s": after_s,
                }
                repo.add(
                    AlertRow(
                        tenant_id=gateway.tenant_id,
                        kind=AlertKind.GATEWAY_OFFLINE.value,
                        detail=detail,
                        created_at=now,
                    )
                )
                raised.append(
                    Raised(
                        AlertKind.GATEWAY_OFFLINE,
                        gateway.tenant_id,
                        f"gateway:{gateway.gateway_id}",
                    )
                )
                log.warning(
                    "alert GATEWAY_OFFLINE: gateway %s (tenant %d) %s",
                    gateway.gateway_id,
                    gateway.tenant_id,
                    detail,
                )
            await repo.flush()
        return raised


# ---------------------------------------------------------------- runtime


@dataclass(frozen=True, slots=True)
class AlertingRuntime:
    """The running checks and deliverer of a process."""

    checks: AlertingService
    deliverer: NotificationDeliverer
    #: The background tasks (empty when ``settings.run`` is off).
    tasks: frozenset[asyncio.Task[None]]


@contextlib.asynccontextmanager
async def alerting_runtime(
    db: Database,
    settings: AlertingSettings,
    clock: Callable[[], datetime] = utc_now,
) -> AsyncIterator[AlertingRuntime]:
    """Run the check loop and the notification deliverer on ``db`` until the block exits.

    The tasks are kept in a set, not a ``TaskGroup``: aiohttp enters and leaves
    ``cleanup_ctx`` hooks from different tasks, which a TaskGroup does not allow.
    """
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as http:
        checks = AlertingService(db, settings)
        deliverer = NotificationDeliverer(db, http, settings=settings.delivery, clock=clock)
        if settings.run:
            loop = asyncio.get_running_loop()
            tasks.add(
                loop.create_task(
                    _check_forever(checks, deliverer, settings, clock), name="alert-checks"
                )
            )
            tasks.add(loop.create_task(deliverer.run(), name="alert-notifications"))
            for task in tasks:
                task.add_done_callback(_report_crash)
        try:
            yield AlertingRuntime(checks, deliverer, frozenset(tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _report_crash(task: asyncio.Task[None]) -> None:
    # The loops catch what they expect; anything else is a bug to shout about at once.
    if not task.cancelled() and task.exception() is not None:
        log.critical("task %s died", task.get_name(), exc_info=task.exception())


async def _check_forever(
    checks: AlertingService,
    deliverer: NotificationDeliverer,
    settings: AlertingSettings,
    clock: Callable[[], datetime],
) -> None:
    while True:
        await asyncio.sleep(settings.check_every_s)
        try:
            report = await checks.run_checks(clock())
        except BackendError:
            log.exception("alert checks failed; trying again in %.0f s", settings.check_every_s)
            continue
        if report.raised:
            deliverer.wake()
