"""Live credit of supply accounts: an in-process hub of snapshots and the poll that backs it up.

The customer's app keeps a server-sent-events stream open
(``GET /v1/accounts/{id}/events``); this module decides what goes down it.

- :class:`LiveSnapshot` is what the customer sees: the ledger balance, the meter's
  credit and when it was read, relay, power and the newest reading's time. Three
  monotone clocks come with it — the ledger account's version (it counts postings), the
  newest reading's time and the credit report's time — so a consumer can tell an older
  snapshot from a newer one (:func:`is_older`) whatever order they arrive in.
- :class:`LiveHub` fans snapshots out to the subscribers of an account. Each subscriber
  has a bounded queue; a slow one loses its *oldest* items (a newer snapshot supersedes
  them anyway). Producers in this process call :meth:`LiveHub.publish` with a snapshot
  read after their commit, or :meth:`LiveHub.poke` when they only know that an account
  changed (the token dispatcher, after a result is applied): the poller then reads it at
  once, batched with other pokes.
- :func:`poll_forever` reads every watched account every ``poll_s`` seconds (one query per
  500 accounts) and publishes what it read: changes made by *another* backend instance
  (a top-up settled there, readings ingested there) reach this instance's subscribers
  within one period. Subscribers drop what they already have, so unchanged accounts cost
  one read and nothing on the wire.

Everything runs on the event loop's thread (asyncio queues are not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from backend.adapters.db.engine import Database
from backend.adapters.db.history_repo import HistoryRepository, LiveRow
from backend.domain.auth import Action
from backend.errors import BackendError
from backend.service.context import Call, require
from backend.service.errors import NotFoundError

log = logging.getLogger(__name__)

#: Default bound of a subscriber's queue.
QUEUE_SIZE: Final = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveSettings:
    """Timing of the live streams (defaults suit production; tests shorten them)."""

    #: How often every watched account is read (changes made by other instances).
    poll_s: float = 5.0
    #: How often an idle stream gets a comment line (keeps proxies from closing it).
    heartbeat_s: float = 15.0
    #: The client's reconnection delay (the SSE ``retry`` field), milliseconds.
    retry_ms: int = 3_000


class _AboutAccount(Protocol):
    """Anything naming a supply account (e.g. ingest's ``LiveUpdate``)."""

    @property
    def supply_account_id(self) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveSnapshot:
    """A supply account's credit as the customer sees it, at one moment."""

    supply_account_id: int
    currency: str
    #: The ledger's PREPAID balance (authoritative money, minor units).
    ledger_balance_minor: int
    #: Postings that changed the ledger account so far (orders snapshots).
    ledger_version: int
    meter_id: int | None
    #: The meter's newest reported credit (rating units) and when it was reported.
    meter_credit_milli: int | None
    meter_credit_at: datetime | None
    relay: str | None
    power_w: int | None
    #: The newest reading ingested.
    reading_at: datetime | None

    def clocks(self) -> tuple[int, int, int]:
        """The three monotone clocks of the snapshot (module docstring)."""
        return (
            self.ledger_version,
            _epoch(self.reading_at),
            _epoch(self.meter_credit_at),
        )


def _epoch(at: datetime | None) -> int:
    return -1 if at is None else int(at.timestamp() * 1_000_000)


def is_older(candidate: LiveSnapshot, than: LiveSnapshot) -> bool:
    """Whether ``candidate`` is an earlier state than ``than`` (so not worth sending).

    Each clock of the earlier state is at most the later one's and one is less. Two
    reads of one database are always ordered this way; incomparable clocks (which would
    mean a clock went backwards somewhere) count as new, so nothing is ever withheld.
    """
    a, b = candidate.clocks(), than.clocks()
    return a != b and all(x <= y for x, y in zip(a, b, strict=True))


def snapshot_of(row: LiveRow) -> LiveSnapshot:
    """The snapshot of one account's raw values.

    The meter's credit is reported twice — by ingest with every reading
    (``meter_ingest``) and by the dispatcher when a token is applied (``meters``) —
    so the newer report wins.
    """
    reading_at = None if row.ingest_ts is None else datetime.fromtimestamp(row.ingest_ts, UTC)
    credit, credit_at = row.meter_credit_milli, row.meter_credit_at
    if (
        row.ingest_credit_milli is not None
        and reading_at is not None
        and (credit_at is None or reading_at >= credit_at)
    ):
        credit, credit_at = row.ingest_credit_milli, reading_at
    return LiveSnapshot(
        supply_account_id=row.supply_account_id,
        currency=row.currency,
        ledger_balance_minor=row.ledger_balance_minor,
        ledger_version=row.ledger_version,
        meter_id=row.meter_id,
        meter_credit_milli=credit,
        meter_credit_at=credit_at,
        relay=row.relay,
        power_w=row.power_w,
        reading_at=reading_at,
    )


class Subscription:
    """One subscriber's bounded queue of snapshots; ``None`` means the hub closed."""

    def __init__(self, account_id: int, maxsize: int) -> None:
        self.account_id = account_id
        self._queue: asyncio.Queue[LiveSnapshot | None] = asyncio.Queue(maxsize)
        #: Items dropped because the subscriber fell behind.
        self.dropped = 0

    def offer(self, item: LiveSnapshot | None) -> None:
        """Enqueue without waiting; when full, drop the oldest item first."""
        while True:
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                self._queue.get_nowait()
                self.dropped += 1
            else:
                return

    async def get(self) -> LiveSnapshot | None:
        """The next snapshot (``None``: the hub closed, end the stream)."""
        return await self._queue.get()


class LiveHub:
    """Fan-out of live snapshots to the subscribers of each supply account."""

    def __init__(self, *, queue_size: int = QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._queue_size = queue_size
        self._subscribers: dict[int, set[Subscription]] = {}
        self._poked: set[int] = set()
        self._wake = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def subscribe(self, account_id: int) -> Iterator[Subscription]:
        """Receive the account's snapshots while inside the ``with`` block."""
        sub = Subscription(account_id, self._queue_size)
        if self._closed:
            sub.offer(None)
        self._subscribers.setdefault(account_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(account_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[account_id]

    def publish(self, account_id: int, snapshot: LiveSnapshot) -> None:
        """Hand a snapshot (read after the change committed) to the account's subscribers."""
        if snapshot.supply_account_id != account_id:
            raise ValueError(
                f"snapshot of account {snapshot.supply_account_id} published for {account_id}"
            )
        for sub in self._subscribers.get(account_id, ()):
            sub.offer(snapshot)

    def poke(self, account_id: int) -> None:
        """The account changed: have the poller read it now (if anybody is watching)."""
        if account_id in self._subscribers:
            self._poked.add(account_id)
            self._wake.set()

    def changed(self, updates: Iterable[_AboutAccount]) -> None:
        """Poke the account of each update (the ``on_live`` callback of ingest)."""
        for update in updates:
            self.poke(update.supply_account_id)

    def watched(self) -> list[int]:
        """The accounts with at least one subscriber."""
        return sorted(self._subscribers)

    def subscribers(self, account_id: int) -> int:
        """How many subscribers an account has."""
        return len(self._subscribers.get(account_id, ()))

    def take_poked(self) -> list[int]:
        """The accounts poked since the last call (still watched), clearing the set."""
        poked = sorted(a for a in self._poked if a in self._subscribers)
        self._poked.clear()
        self._wake.clear()
        return poked

    async def wait_poked(self) -> None:
        """Until some account is poked."""
        await self._wake.wait()

    def close(self) -> None:
        """End every subscription (server shutdown); later subscriptions end at once."""
        self._closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.offer(None)


Reader = Callable[[Sequence[int]], Awaitable[Mapping[int, LiveSnapshot]]]


async def poll_forever(hub: LiveHub, read: Reader, *, poll_s: float) -> None:
    """Publish fresh snapshots of poked accounts at once and of every watched one every ``poll_s``.

    Runs until cancelled. A failed read is logged and retried next round.
    """
    loop = asyncio.get_running_loop()
    next_full = loop.time() + poll_s
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, next_full - loop.time())):
                await hub.wait_poked()
        if loop.time() >= next_full:
            hub.take_poked()
            accounts = hub.watched()
            next_full = loop.time() + poll_s
        else:
            accounts = hub.take_poked()
        if not accounts:
            continue
        try:
            snapshots = await read(accounts)
        except BackendError:
            log.exception("live poll of %d account(s) failed; retrying", len(accounts))
            continue
        for account_id, snapshot in snapshots.items():
            hub.publish(account_id, snapshot)


class LiveService:
    """Reads live snapshots: one account for a caller, many for the poller."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def snapshot(self, call: Call, supply_account_id: int) -> LiveSnapshot:
        """The account's snapshot now, if the caller may see the account."""
        require(call, Action.SUPPLY_ACCOUNT_READ)
        async with self._db.read() as session:
            row = await HistoryRepository(session).live(call.scope, supply_account_id)
        if row is None:
            raise NotFoundError(f"no supply account {supply_account_id}")
        return snapshot_of(row)

    async def snapshots(self, account_ids: Sequence[int]) -> dict[int, LiveSnapshot]:
        """Snapshots of these accounts (system use: the poller; nobody's scope applies)."""
        async with self._db.read() as session:
            rows = await HistoryRepository(session).live_unscoped(account_ids)
        return {row.supply_account_id: snapshot_of(row) for row in rows}
