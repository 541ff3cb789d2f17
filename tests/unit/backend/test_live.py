"""The live hub: fan-out, bounded queues dropping the oldest, pokes, the poll loop, ordering."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from backend.adapters.db.history_repo import LiveRow
from backend.errors import StorageError
from backend.service.live import LiveHub, LiveSnapshot, is_older, poll_forever, snapshot_of

T = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def snap(account: int = 1, version: int = 1, balance: int = 100, **kw: object) -> LiveSnapshot:
    values: dict[str, object] = {
        "supply_account_id": account,
        "currency": "EUR",
        "ledger_balance_minor": balance,
        "ledger_version": version,
        "meter_id": 7,
        "meter_credit_milli": balance * 1000,
        "meter_credit_at": T,
        "relay": "CONNECTED",
        "power_w": 500,
        "reading_at": T,
    }
    values.update(kw)
    return LiveSnapshot(**values)  # type: ignore[arg-type]


async def test_publish_reaches_every_subscriber_of_that_account_only() -> None:
    hub = LiveHub()
    with hub.subscribe(1) as a, hub.subscribe(1) as b, hub.subscribe(2) as other:
        assert hub.watched() == [1, 2]
        assert hub.subscribers(1) == 2
        hub.publish(1, snap(1))
        assert await a.get() == snap(1)
        assert await b.get() == snap(1)
        assert other._queue.empty()
        hub.publish(3, snap(3))  # nobody watches: nothing happens
        with pytest.raises(ValueError, match="published for"):
            hub.publish(2, snap(1))
    assert hub.watched() == []
    hub.publish(1, snap(1))  # after unsubscribing: no error, nobody to tell


async def test_a_slow_subscriber_loses_its_oldest_snapshots() -> None:
    hub = LiveHub(queue_size=3)
    with hub.subscribe(1) as sub:
        for v in range(1, 7):
            hub.publish(1, snap(version=v))
        assert sub.dropped == 3
        got = [await sub.get() for _ in range(3)]
        assert [s.ledger_version for s in got if s is not None] == [4, 5, 6]
    with pytest.raises(ValueError, match="at least 1"):
        LiveHub(queue_size=0)


async def test_close_ends_every_subscription_now_and_later() -> None:
    hub = LiveHub()
    with hub.subscribe(1) as sub:
        hub.close()
        assert await sub.get() is None
    assert hub.closed
    with hub.subscribe(1) as late:
        assert await late.get() is None


def test_is_older_orders_snapshots_by_their_clocks() -> None:
    base = snap(version=5)
    assert is_older(snap(version=4), base)
    assert not is_older(base, base)
    assert not is_older(snap(version=6), base)
    later = T + timedelta(seconds=10)
    assert is_older(base, snap(version=5, reading_at=later))
    assert is_older(snap(version=5, meter_credit_at=None), base)
    # Incomparable clocks (one newer, one older) count as news, never withheld.
    assert not is_older(snap(version=6, reading_at=T - timedelta(seconds=1)), base)
    assert not is_older(base, snap(version=6, reading_at=T - timedelta(seconds=1)))


def _row(**kw: object) -> LiveRow:
    values: dict[str, object] = {
        "supply_account_id": 1,
        "currency": "EUR",
        "ledger_balance_minor": 250,
        "ledger_version": 3,
        "meter_id": 7,
        "meter_credit_milli": 1_000,
        "meter_credit_at": T,
        "ingest_ts": None,
        "ingest_credit_milli": None,
        "relay": None,
        "power_w": None,
    }
    values.update(kw)
    return LiveRow(**values)  # type: ignore[arg-type]


def test_the_newer_credit_report_wins() -> None:
    s = snapshot_of(_row())
    assert (s.meter_credit_milli, s.meter_credit_at, s.reading_at) == (1_000, T, None)
    newer = int(T.timestamp()) + 60
    s = snapshot_of(_row(ingest_ts=newer, ingest_credit_milli=900, relay="CONNECTED", power_w=42))
    assert (s.meter_credit_milli, s.meter_credit_at) == (900, datetime.fromtimestamp(newer, UTC))
    assert (s.relay, s.power_w, s.reading_at) == (
        "CONNECTED",
        42,
        datetime.fromtimestamp(newer, UTC),
    )
    older = int(T.timestamp()) - 60
    s = snapshot_of(_row(ingest_ts=older, ingest_credit_milli=1_200))
    assert (s.meter_credit_milli, s.meter_credit_at) == (1_000, T)
    s = snapshot_of(
        _row(meter_credit_milli=None, meter_credit_at=None, ingest_ts=older, ingest_credit_milli=5)
    )
    assert s.meter_credit_milli == 5
    s = snapshot_of(_row(meter_id=None, meter_credit_milli=None, meter_credit_at=None))
    assert (s.meter_id, s.meter_credit_milli, s.ledger_balance_minor) == (None, None, 250)


class Reader:
    """A scripted database: records what was read, answers version-counting snapshots."""

    def __init__(self) -> None:
        self.reads: list[list[int]] = []
        self.fail = 0
        self.version = 1

    async def __call__(self, ids: Sequence[int]) -> Mapping[int, LiveSnapshot]:
        self.reads.append(list(ids))
        if self.fail:
            self.fail -= 1
            raise StorageError("database away")
        return {i: snap(i, version=self.version) for i in ids}


async def test_pokes_are_read_at_once_and_everything_watched_every_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub, read = LiveHub(), Reader()
    with hub.subscribe(1) as one, hub.subscribe(2), hub.subscribe(3):
        task = asyncio.create_task(poll_forever(hub, read, poll_s=0.3))
        try:
            hub.poke(1)
            hub.poke(9)  # not watched: ignored
            got = await asyncio.wait_for(one.get(), 1.0)
            assert got == snap(1, version=1)
            assert read.reads == [[1]]
            hub.changed(
                [SimpleNamespace(supply_account_id=3), SimpleNamespace(supply_account_id=2)]
            )
            await asyncio.sleep(0.05)
            assert read.reads[1] == [2, 3]
            # The full poll reads every watched account.
            read.version = 2
            await asyncio.sleep(0.4)
            assert [1, 2, 3] in read.reads
            # A failing read is logged and the loop carries on.
            read.fail = 1
            hub.poke(1)
            await asyncio.sleep(0.05)
            assert "live poll of 1 account(s) failed" in caplog.text
            read.version = 3
            hub.poke(1)
            while (
                s := await asyncio.wait_for(one.get(), 1.0)
            ) is not None and s.ledger_version < 3:
                pass
            assert s == snap(1, version=3)
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def test_snapshots_are_plain_values() -> None:
    a = snap()
    assert a == dataclasses.replace(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.ledger_version = 2  # type: ignore[misc]
