"""The token dispatcher: drains the outbox to the gateways over MQTT and records their results.

DESIGN §6 step 3. All state is in the database, so the dispatcher survives restarts of
every process and several backend instances can run one each:

* **Publish**: a short write transaction *claims* the due tokens (``PENDING``/``SENT`` with
  ``next_attempt_at <= now``; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), marks them
  ``SENT``, counts the attempt and moves ``next_attempt_at`` forward by a capped, jittered
  back-off — that move is the lease: nobody else takes the token until it runs out. After
  the commit each token goes to ``vc/v1/gw/{gw}/meter/{meter}/token`` as a
  :class:`~firmware_protocol.mqtt.TokenDelivery` at QoS 1, and the dispatcher waits for
  the PUBACKs. A token without a result when its lease runs out is published again,
  the same bytes under the same id (the meter answers ``already_applied`` if the first
  one got through). Past the token's own expiry it is given up: ``REJECTED`` with
  result ``UNCONFIRMED`` and a ``TOKEN_UNCONFIRMED`` alert.
* **Results** (``vc/v1/gw/+/meter/+/token/result``, optionally as a ``$share`` group):
  each is applied by the table in :mod:`backend.domain.topups` in one transaction —
  accepted/already applied → ``APPLIED`` with the reported credit (also stored as the
  meter's last credit when it is newer than what we have); a refusal → ``REJECTED`` and a
  ``TOKEN_REJECTED`` alert in the same commit. A rejected token is never re-issued under a
  new id here. Results are idempotent, and a result is PUBACKed only after its commit.
  A result for a meter that is not on the publishing gateway, or for an unknown token,
  changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from backend.adapters.db.alert_tables import AlertKind
from backend.adapters.db.engine import Database
from backend.adapters.db.token_repo import TokenRepository
from backend.adapters.db.topup_repo import TopupRepository
from backend.adapters.mqtt import BackendLink, Incoming
from backend.domain.topups import UNCONFIRMED, TokenState, retry_delay_s, token_step
from backend.errors import BackendError
from backend.service.context import utc_now
from firmware_protocol import messages, mqtt
from firmware_protocol.errors import MalformedError, ProtocolError
from firmware_protocol.mqtt_topics import (
    TOKEN_RESULT_FILTER,
    TokenResultTopic,
    parse_topic,
    shared_filter,
    token_topic,
)

log = logging.getLogger(__name__)

#: Shared-subscription group of the backend instances consuming token results.
RESULTS_GROUP: Final = "tokens"


def result_subscription(*, shared: bool) -> str:
    """The token-result filter: plain, or ``$share/tokens/…`` (Mosquitto, not amqtt)."""
    return shared_filter(TOKEN_RESULT_FILTER, RESULTS_GROUP) if shared else TOKEN_RESULT_FILTER


class Publisher(Protocol):
    """A QoS 1 publish whose future resolves on the broker's PUBACK."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        """Hand a message over for delivery."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatcherSettings:
    """Tuning of the dispatcher; the defaults suit one instance on a small server."""

    #: Most tokens claimed (and in flight) per round.
    batch: int = 200
    #: How often to look for due tokens when nobody wakes the dispatcher.
    poll_s: float = 1.0
    #: Re-publish back-off: base * 2**(attempt-1), capped, equal jitter.
    retry_base_s: float = 5.0
    retry_cap_s: float = 300.0
    #: How long a round waits for the broker's PUBACKs before moving on.
    puback_timeout_s: float = 10.0


class ResultOutcome(enum.StrEnum):
    """What handling one token result did."""

    APPLIED = "APPLIED"
    REJECTED = "REJECTED"
    UNCHANGED = "UNCHANGED"  #: duplicate, transient status, or a refusal after APPLIED
    UNKNOWN = "UNKNOWN"  #: no such token for that meter
    FOREIGN = "FOREIGN"  #: the meter is not on the gateway that published the result


class Dispatcher:
    """Publishes outbox tokens and applies token results."""

    def __init__(
        self,
        db: Database,
        publisher: Publisher,
        *,
        settings: DispatcherSettings | None = None,
        clock: Callable[[], datetime] = utc_now,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._db = db
        self._publisher = publisher
        self._settings = settings or DispatcherSettings()
        self._clock = clock
        self._uniform = uniform
        self._wake = asyncio.Event()
        #: Called with the supply account id after an applied token result committed (the
        #: live hub's ``poke``, so the customer's open event stream shows the new credit).
        self.credit_listeners: list[Callable[[int], None]] = []

    def wake(self) -> None:
        """Look for due tokens now (a top-up just put one in the outbox)."""
        self._wake.set()

    # --- publishing -----------------------------------------------------------------------

    async def dispatch_once(self) -> int:
        """Claim the due tokens, publish them, wait for the PUBACKs; how many were published."""
        settings = self._settings
        now = self._clock()
        now_s = int(now.timestamp())
        sends: list[tuple[str, bytes]] = []
        async with self._db.write() as session:
            claimed = await TokenRepository(session).claim_due(now, settings.batch)
            alerts = TopupRepository(session)
            for token, gateway_id in claimed:
                if _expires_at(token.message) <= now_s:
                    token.status = TokenState.REJECTED.value
                    token.result_status = UNCONFIRMED
                    token.completed_at = now
                    alerts.add_alert(
                        tenant_id=token.tenant_id,
                        kind=AlertKind.TOKEN_UNCONFIRMED,
                        at=now,
                        meter_id=token.meter_id,
                        token_id=token.id,
                        payment_id=token.payment_id,
                        detail={"msg_id": token.msg_id, "attempts": token.attempts},
                    )
                    log.error(
                        "token %d of meter %d expired after %d attempts without a result",
                        token.msg_id,
                        token.meter_id,
                        token.attempts,
                    )
                    continue
                token.status = TokenState.SENT.value
                token.attempts += 1
                delay = retry_delay_s(
                    token.attempts,
                    base_s=settings.retry_base_s,
                    cap_s=settings.retry_cap_s,
                    uniform=self._uniform,
                )
                token.next_attempt_at = now + timedelta(seconds=delay)
                delivery = mqtt.TokenDelivery(
                    msg=token.message, token_id=token.msg_id, meter=token.meter_id
                )
                sends.append((token_topic(gateway_id, token.meter_id), mqtt.encode(delivery)))
        if not sends:
            return 0
        futures = [self._publisher.publish(topic, payload) for topic, payload in sends]
        done, pending = await asyncio.wait(futures, timeout=settings.puback_timeout_s)
        for fut in pending:
            # Still queued in paho: it sends them after a reconnect; the lease covers us.
            fut.add_done_callback(_retrieve)
        failed = sum(1 for fut in done if fut.exception() is not None)
        if pending or failed:
            log.warning(
                "tokens: %d published, %d without PUBACK yet, %d failed",
                len(done) - failed,
                len(pending),
                failed,
            )
        return len(sends)

    # --- results --------------------------------------------------------------------------

    async def handle_result(self, topic: str, payload: bytes) -> ResultOutcome:
        """Apply one token result message (raises ``ProtocolError`` for a malformed one)."""
        parsed = parse_topic(topic)
        if not isinstance(parsed, TokenResultTopic):
            raise MalformedError(f"topic {topic!r} is not a token result topic")
        result = mqtt.decode_payload(parsed, payload)
        assert isinstance(result, mqtt.TokenResult)  # noqa: S101 - decode_payload's contract
        now = self._clock()
        async with self._db.write() as session:
            repo = TokenRepository(session)
            token = await repo.lock_token(result.meter, result.token_id)
            meter = await repo.lock_meter(result.meter)
            if token is None or meter is None:
                log.warning(
                    "result for unknown token %d of meter %d from %s",
                    result.token_id,
                    result.meter,
                    parsed.gw,
                )
                return ResultOutcome.UNKNOWN
            if meter.gateway_id != parsed.gw:
                log.warning(
                    "gateway %s reported on meter %d, which is on gateway %s; ignored",
                    parsed.gw,
                    meter.id,
                    meter.gateway_id,
                )
                return ResultOutcome.FOREIGN
            step = token_step(TokenState(token.status), result.status)
            if not step.changed:
                return ResultOutcome.UNCHANGED
            token.status = step.state.value
            token.result_status = result.status.name
            token.completed_at = now
            if step.state is TokenState.APPLIED:
                token.credit_after_milli = result.credit_after_milli
                reported_at = datetime.fromtimestamp(result.ts, UTC)
                if result.credit_after_milli is not None and (
                    meter.last_reading_at is None or reported_at >= meter.last_reading_at
                ):
                    # A credit read back from the meter is a reading of its credit register;
                    # an older report never overwrites a newer one.
                    meter.last_credit_milli = result.credit_after_milli
                    meter.last_reading_at = reported_at
                applied_to: int | None = meter.supply_account_id
            else:
                applied_to = None
                TopupRepository(session).add_alert(
                    tenant_id=token.tenant_id,
                    kind=AlertKind.TOKEN_REJECTED,
                    at=now,
                    meter_id=token.meter_id,
                    token_id=token.id,
                    payment_id=token.payment_id,
                    detail={
                        "msg_id": token.msg_id,
                        "status": result.status.name,
                        "gateway": parsed.gw,
                        "amount_minor": token.amount_minor,
                    },
                )
        if applied_to is not None:
            # After the commit, so a listener reading the account sees the new credit.
            for listener in self.credit_listeners:
                listener(applied_to)
            return ResultOutcome.APPLIED
        log.error(
            "token %d of meter %d rejected: %s", result.token_id, result.meter, result.status.name
        )
        return ResultOutcome.REJECTED

    # --- tasks ----------------------------------------------------------------------------

    async def run(self, link: BackendLink, results: asyncio.Queue[Incoming] | None = None) -> None:
        """Publish and consume until cancelled (two named tasks in a TaskGroup).

        Token results are read from ``results`` when a router shares the link with other
        consumers (ingest), else from the link's own queue.
        """
        queue = link.messages if results is None else results
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._publish_loop(link), name="dispatcher-publish")
            tasks.create_task(self._results_loop(link, queue), name="dispatcher-results")

    async def _publish_loop(self, link: BackendLink) -> None:
        while True:
            await link.online.wait()
            self._wake.clear()
            try:
                published = await self.dispatch_once()
            except BackendError:
                log.exception("token dispatch failed; retrying in %.1f s", self._settings.poll_s)
                published = 0
            if published >= self._settings.batch:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.poll_s):
                    await self._wake.wait()

    async def _results_loop(self, link: BackendLink, queue: asyncio.Queue[Incoming]) -> None:
        while True:
            message = await queue.get()
            try:
                await self.handle_result(message.topic, message.payload)
            except ProtocolError as exc:
                # The peer's fault: redelivery would not fix it, so acknowledge and drop.
                log.warning("malformed token result on %s: %s", message.topic, exc)
            except BackendError:
                # Ours (database): leave it unacknowledged; the broker redelivers it on the
                # next connection, and the token's re-publish brings a fresh result anyway.
                log.exception("token result on %s not applied", message.topic)
                continue
            link.ack(message)


def _expires_at(message: bytes) -> int:
    """The expiry (Unix seconds) in a token's signed header (our own bytes)."""
    return messages.decode_unverified(message).header.expires_at


def _retrieve(fut: asyncio.Future[None]) -> None:
    # A publish nobody waits for any more: read its outcome so a failure at shutdown is
    # not reported as "exception never retrieved".
    if not fut.cancelled():
        fut.exception()
