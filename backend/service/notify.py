"""Alert notifications: fan-out of new alerts into the outbox, signed webhook delivery with retries.

Every alert — raised by the scheduled checks, the dispatcher, settlement or ingest — is
a row in ``alerts``; none of its writers needs to know about webhooks. The deliverer:

1. **Fans out** (:meth:`NotificationDeliverer.fan_out`): under the lock of the fan-out
   cursor, it reads the alerts after the cursor of tenants that have endpoints and makes
   one ``notifications`` row per (alert, endpoint) for every endpoint that subscribes to
   the alert's kind and existed when the alert was raised; the pair is the row's unique
   key, so an alert is notified at most once per endpoint however often this runs. The
   cursor stops before the first alert younger than ``fanout_grace_s``: on PostgreSQL ids
   are taken at insert but become visible at commit, so a young alert with a smaller id
   may still appear; the unique key makes reading the young ones again harmless. (A
   transaction raising an alert that stays open longer than the grace could be passed
   over: units of work last milliseconds.)
2. **Delivers** (:meth:`NotificationDeliverer.deliver_once`): a short write transaction
   claims the due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), counts the attempt and
   moves ``next_attempt_at`` past the attempt (the lease: another instance, or this one
   after a crash, takes the row again only when the lease runs out). After the commit
   each is POSTed as JSON, signed like the sandbox payment webhooks
   (:func:`backend.payments.webhooks.format_signature_header`: ``Voltcredit-Signature:
   t=<unix s>,v1=<hex HMAC-SHA256 of "t.body">`` keyed with the endpoint's secret,
   re-signed per attempt), with ``Voltcredit-Event-Id`` (stable across attempts: the
   receiver's de-duplication key) and ``Voltcredit-Delivery-Attempt``. A 2xx answer is
   delivered; anything else (another status, a redirect, a timeout, a refused
   connection) is retried with capped, jittered exponential back-off until
   ``max_attempts``, then the row is ``FAILED`` and logged
   (:func:`backend.domain.alerting.delivery_step`).

So a notification is delivered *at least* once; receivers drop repeats by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiohttp

from backend.adapters.db.alert_tables import AlertRow
from backend.adapters.db.alerting_repo import Claimed, NotificationOutbox
from backend.adapters.db.engine import Database
from backend.adapters.db.notify_tables import NotificationRow, WebhookEndpointRow
from backend.domain.alerting import DeliveryStatus, delivery_step
from backend.errors import BackendError
from backend.payments.sandbox import SIGNATURE_HEADER
from backend.payments.webhooks import format_signature_header
from backend.service.context import utc_now

log = logging.getLogger(__name__)

EVENT_ID_HEADER: Final = "Voltcredit-Event-Id"
ATTEMPT_HEADER: Final = "Voltcredit-Delivery-Attempt"
USER_AGENT: Final = "voltcredit-notifications/1"
#: The ``type`` of a notification body.
EVENT_TYPE: Final = "alert.raised"
_MAX_ERROR: Final = 500
#: Most batches of alerts one fan-out reads (a backlog is worked off over several).
_FANOUT_ROUNDS: Final = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverySettings:
    """Tuning of the deliverer; the defaults suit one instance on a small server."""

    #: How often to look for new alerts and due deliveries when nobody wakes the loop.
    poll_s: float = 2.0
    #: Most deliveries claimed (and in flight) per round.
    batch: int = 50
    #: Most concurrent POSTs of one round.
    concurrency: int = 8
    #: Attempts before a notification is given up (FAILED).
    max_attempts: int = 8
    #: Retry back-off: base * 2**(attempt-1), capped, equal jitter (10 s … 1 h by default:
    #: eight attempts span about four hours).
    retry_base_s: float = 10.0
    retry_cap_s: float = 3600.0
    #: Total time one POST may take.
    attempt_timeout_s: float = 10.0
    #: Alerts younger than this are read again by the next fan-out (module docstring).
    fanout_grace_s: float = 300.0
    #: Most alerts one fan-out reads.
    fanout_batch: int = 500

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.retry_base_s <= self.retry_cap_s:
            raise ValueError("delays must satisfy 0 <= retry_base_s <= retry_cap_s")
        if self.attempt_timeout_s <= 0 or self.poll_s <= 0:
            raise ValueError("attempt_timeout_s and poll_s must be > 0")
        if self.batch < 1 or self.concurrency < 1 or self.fanout_batch < 1:
            raise ValueError("batch, concurrency and fanout_batch must be >= 1")


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def notification_payload(alert: AlertRow, event_id: uuid.UUID, now: datetime) -> dict[str, Any]:
    """The JSON body notifying ``alert`` (fixed when the outbox row is made)."""
    return {
        "id": str(event_id),
        "type": EVENT_TYPE,
        "created_at": _iso(now),
        "tenant_id": alert.tenant_id,
        "alert": {
            "id": alert.id,
            "kind": alert.kind,
            "meter_id": alert.meter_id,
            "token_id": alert.token_id,
            "payment_id": None if alert.payment_id is None else str(alert.payment_id),
            "detail": alert.detail,
            "created_at": _iso(alert.created_at),
        },
    }


def encode_body(payload: dict[str, Any]) -> bytes:
    """The bytes POSTed for ``payload``: the same for every attempt (keys sorted, compact)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _subscribes(endpoint: WebhookEndpointRow, alert: AlertRow) -> bool:
    # An endpoint hears of alerts raised after it was registered, not of its tenant's past.
    return alert.kind in endpoint.kinds and endpoint.created_at <= alert.created_at


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class NotificationDeliverer:
    """Fans alerts out into the outbox and delivers it (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        http: aiohttp.ClientSession,
        *,
        settings: DeliverySettings | None = None,
        clock: Callable[[], datetime] = utc_now,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._db = db
        self._http = http
        self._settings = settings or DeliverySettings()
        self._clock = clock
        self._uniform = uniform
        self._wake = asyncio.Event()
        #: Alerts after the cursor this process has fanned out (skips idle transactions).
        self._fanned: frozenset[int] = frozenset()

    def wake(self) -> None:
        """Look for new alerts and due deliveries now."""
        self._wake.set()

    # --- fan-out --------------------------------------------------------------------------

    async def fan_out(self) -> int:
        """Make the outbox rows of the alerts after the cursor; how many were made."""
        batch = self._settings.fanout_batch
        now = self._clock()
        horizon = now - timedelta(seconds=self._settings.fanout_grace_s)
        async with self._db.read() as session:
            outbox = NotificationOutbox(session)
            after = await outbox.cursor()
            waiting = await outbox.relevant_after(after, batch)
            movable = await outbox.safe_cursor(after, horizon) > after
        if not movable and len(waiting) < batch and {a.id for a in waiting} <= self._fanned:
            return 0  # nothing new, and the cursor cannot move: no write transaction
        made = 0
        fanned: set[int] = set()
        async with self._db.write() as session:
            outbox = NotificationOutbox(session)
            cursor = await outbox.lock_cursor(now)
            bound = await outbox.safe_cursor(cursor.alert_id, horizon)
            scan = cursor.alert_id
            for _ in range(_FANOUT_ROUNDS):
                alerts = await outbox.relevant_after(scan, batch)
                made += await self._fan(outbox, alerts, now)
                fanned.update(a.id for a in alerts)
                if len(alerts) < batch:
                    break
                scan = alerts[-1].id
            else:
                bound = min(bound, scan)  # out of budget: the cursor stops where the scan did
            cursor.alert_id = max(cursor.alert_id, bound)
            cursor.updated_at = now
        self._fanned = frozenset(fanned)
        if made:
            log.info("notifications: %d queued for %d alert(s)", made, len(fanned))
        return made

    async def _fan(self, outbox: NotificationOutbox, alerts: list[AlertRow], now: datetime) -> int:
        endpoints: dict[int, list[WebhookEndpointRow]] = defaultdict(list)
        for endpoint in await outbox.endpoints_of(a.tenant_id for a in alerts):
            endpoints[endpoint.tenant_id].append(endpoint)
        done = await outbox.existing([a.id for a in alerts])
        rows = []
        for alert in alerts:
            for endpoint in endpoints.get(alert.tenant_id, ()):
                if (alert.id, endpoint.id) in done or not _subscribes(endpoint, alert):
                    continue
                event_id = uuid.uuid4()
                rows.append(
                    NotificationRow(
                        tenant_id=alert.tenant_id,
                        alert_id=alert.id,
                        endpoint_id=endpoint.id,
                        event_id=event_id,
                        payload=notification_payload(alert, event_id, now),
                        status=DeliveryStatus.PENDING.value,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
        await outbox.add_all(rows)
        return len(rows)

    # --- delivery -------------------------------------------------------------------------

    async def deliver_once(self) -> int:
        """Claim the due notifications, POST them, record the outcomes; how many were tried."""
        settings = self._settings
        now = self._clock()
        # Nobody else takes a claimed row before the attempt has surely ended.
        lease = timedelta(seconds=settings.attempt_timeout_s + 60.0)
        async with self._db.read() as session:
            if not await NotificationOutbox(session).any_due(now):
                return 0  # the usual case: no write transaction
        claims: list[Claimed] = []
        async with self._db.write() as session:
            for row, url, secret in await NotificationOutbox(session).claim_due(
                now, settings.batch
            ):
                row.attempts += 1
                row.next_attempt_at = now + lease
                claims.append(
                    Claimed(
                        id=row.id,
                        event_id=row.event_id,
                        alert_id=row.alert_id,
                        endpoint_id=row.endpoint_id,
                        attempt=row.attempts,
                        url=url,
                        secret=secret,
                        payload=dict(row.payload),
                    )
                )
        if not claims:
            return 0
        gate = asyncio.Semaphore(settings.concurrency)

        async def send(claim: Claimed) -> _Outcome:
            async with gate:
                return await self._post(claim)

        outcomes = await asyncio.gather(*(send(c) for c in claims))
        await self._record(claims, outcomes)
        return len(claims)

    async def _post(self, claim: Claimed) -> _Outcome:
        body = encode_body(claim.payload)
        timestamp = int(self._clock().timestamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: format_signature_header(
                body, timestamp=timestamp, secrets=[claim.secret.encode()]
            ),
            EVENT_ID_HEADER: str(claim.event_id),
            ATTEMPT_HEADER: str(claim.attempt),
        }
        try:
            # Redirects count as failures (as for Stripe's webhooks): an endpoint answers
            # for itself, and following one would send the signed body somewhere else.
            async with self._http.post(
                claim.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._settings.attempt_timeout_s),
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _Outcome(None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR])
        return _Outcome(status, None if 200 <= status < 300 else f"HTTP {status}")

    async def _record(self, claims: list[Claimed], outcomes: list[_Outcome]) -> None:
        settings = self._settings
        now = self._clock()
        async with self._db.write() as session:
            rows = {r.id: r for r in await NotificationOutbox(session).lock([c.id for c in claims])}
            for claim, outcome in zip(claims, outcomes, strict=True):
                row = rows.get(claim.id)
                if (
                    row is None
                    or row.status != DeliveryStatus.PENDING.value
                    or row.attempts != claim.attempt
                ):
                    continue  # cancelled meanwhile, or the lease ran out and it was retaken
                step = delivery_step(
                    claim.attempt,
                    delivered=outcome.delivered,
                    max_attempts=settings.max_attempts,
                    base_s=settings.retry_base_s,
                    cap_s=settings.retry_cap_s,
                    uniform=self._uniform,
                )
                row.status = step.status.value
                row.last_status = outcome.status
                row.last_error = outcome.error
                if step.status is DeliveryStatus.DELIVERED:
                    row.delivered_at = now
                elif step.retry_in_s is not None:
                    row.next_attempt_at = now + timedelta(seconds=step.retry_in_s)
                    log.info(
                        "notification %s (alert %d) to endpoint %d: attempt %d failed (%s)",
                        claim.event_id,
                        claim.alert_id,
                        claim.endpoint_id,
                        claim.attempt,
                        outcome.error,
                    )
                else:
                    log.error(
                        "notification %s (alert %d) to endpoint %d: giving up after %d attempts"
                        " (%s)",
                        claim.event_id,
                        claim.alert_id,
                        claim.endpoint_id,
                        claim.attempt,
                        outcome.error,
                    )

    # --- task -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Fan out and deliver until cancelled."""
        while True:
            self._wake.clear()
            busy = False
            try:
                await self.fan_out()
                busy = await self.deliver_once() >= self._settings.batch
            except BackendError:
                log.exception(
                    "notifications: round failed; retrying in %.1f s", self._settings.poll_s
                )
            if busy:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.poll_s):
                    await self._wake.wait()
