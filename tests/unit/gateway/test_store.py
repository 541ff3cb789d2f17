"""The SQLite store: counters, outbox and its cap policy, token rows across restarts, status."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from firmware_protocol import mqtt
from firmware_protocol.mqtt import Reading, Relay
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus
from gateway.errors import StoreError
from gateway.store import AsyncStore, PollOutcome, Store
from gateway.token_flow import TokenState

T0 = 1_790_000_000
GW = "gw-1"
A, B = 11, 12


def reading(meter: int, ts: int, wh: int = 0) -> Reading:
    return Reading(
        meter=meter,
        ts=ts,
        import_wh=wh,
        band_wh=(wh,),
        credit_milli=1000,
        relay=Relay.CLOSED,
        power_w=100,
        voltage_dv=2300,
        current_ma=400,
        tariff_id=1,
        last_token_id=0,
        status_flags=0,
        block_period=24000,
        block_period_wh=wh,
    )


def ok(meter: int, ts: int, wh: int = 0) -> PollOutcome:
    return PollOutcome(meter=meter, reading=reading(meter, ts, wh))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "gw.sqlite", now=T0)
    yield s  # type: ignore[misc]
    s.close()


def test_counters_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "d" / "gw.sqlite"
    s = Store.open(path, now=T0)
    assert s.next_seq() == T0 * 1000  # a replaced disk does not reuse the seqs of the old one
    assert (s.begin_boot(), s.begin_boot()) == (1, 2)
    s.record_poll(GW, [ok(A, T0)], now=T0, cap_bytes=10**6)
    s.close()
    s = Store.open(path, now=T0 + 99)
    assert s.boot_seq() == 2
    assert s.begin_boot() == 3
    assert s.next_seq() == T0 * 1000 + 1
    s.close()


def test_record_poll_writes_a_batch_and_meter_states(store: Store) -> None:
    outcomes = [ok(A, T0, 5), PollOutcome(meter=B, reading=None, error="no answer")]
    (seq,) = store.record_poll(GW, outcomes, now=T0 + 1, cap_bytes=10**6)
    (row,) = store.pending_batches(after_seq=-1, limit=10)
    assert row.seq == seq
    assert row.created == T0 + 1
    batch = mqtt.decode_reading_batch(row.payload)
    assert (batch.gw, batch.seq, batch.historical, batch.readings) == (
        GW,
        seq,
        False,
        (reading(A, T0, 5),),
    )
    meters = store.meter_rows()
    assert meters[A].reachable
    assert meters[A].last_ok == T0 + 1
    assert meters[A].last_ts == T0
    assert not meters[B].reachable
    assert meters[B].last_error == "no answer"
    assert meters[B].last_ok is None
    # B answers later: its error is cleared.
    store.record_poll(GW, [ok(B, T0 + 5)], now=T0 + 6, cap_bytes=10**6)
    assert store.meter_rows()[B].reachable
    assert store.meter_rows()[B].last_error is None
    # Nobody answers: no batch, no seq used.
    before = store.next_seq()
    assert (
        store.record_poll(
            GW, [PollOutcome(meter=A, reading=None, error="x")], now=T0, cap_bytes=10**6
        )
        == []
    )
    assert store.next_seq() == before


def test_more_than_1000_readings_make_several_batches(store: Store) -> None:
    outcomes = [ok(m, T0) for m in range(1, 2501)]
    seqs = store.record_poll(GW, outcomes, now=T0, cap_bytes=10**9)
    assert len(seqs) == 3
    assert seqs == sorted(seqs)
    sizes = [
        len(mqtt.decode_reading_batch(r.payload).readings)
        for r in store.pending_batches(after_seq=-1, limit=9)
    ]
    assert sizes == [1000, 1000, 500]


def test_pending_and_delete(store: Store) -> None:
    seqs = [
        store.record_poll(GW, [ok(A, T0 + i)], now=T0 + i, cap_bytes=10**6)[0] for i in range(5)
    ]
    assert [r.seq for r in store.pending_batches(after_seq=seqs[1], limit=2)] == seqs[2:4]
    store.delete_batches(seqs[:3])
    assert [r.seq for r in store.pending_batches(after_seq=-1, limit=10)] == seqs[3:]
    assert store.outbox_size()[0] == 2


def test_cap_drops_oldest_but_keeps_each_meters_latest_reading(store: Store) -> None:
    # Both meters answer for a while, then B goes silent while A keeps answering.
    for i in range(5):
        store.record_poll(
            GW, [ok(A, T0 + i, i), ok(B, T0 + i, 100 + i)], now=T0 + i, cap_bytes=10**6
        )
    one = len(store.pending_batches(after_seq=-1, limit=1)[0].payload)
    cap = 4 * one
    for i in range(5, 30):
        store.record_poll(
            GW,
            [ok(A, T0 + i, i), PollOutcome(meter=B, reading=None, error="gone")],
            now=T0 + i,
            cap_bytes=cap,
        )
    rows = store.pending_batches(after_seq=-1, limit=100)
    assert sum(len(r.payload) for r in rows) <= cap
    seqs = [r.seq for r in rows]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    readings = [r for row in rows for r in mqtt.decode_reading_batch(row.payload).readings]
    # B's last reading (ts T0+4) survived the drops; A's newest is there too.
    assert reading(B, T0 + 4, 104) in readings
    assert reading(A, T0 + 29, 29) in readings
    # Older A readings went: a one-reading batch is about half of `one`.
    assert len(rows) <= 8
    assert reading(A, T0 + 5, 5) not in readings


def test_a_batch_of_only_latest_readings_is_never_dropped(store: Store) -> None:
    store.record_poll(GW, [ok(m, T0) for m in range(1, 50)], now=T0, cap_bytes=10**6)
    big = store.outbox_size()[1]
    # Now only meter 1 answers, with a cap far below what the outbox holds.
    for i in range(1, 4):
        store.record_poll(GW, [ok(1, T0 + i)], now=T0 + i, cap_bytes=big // 10)
    readings = {
        (r.meter, r.ts)
        for row in store.pending_batches(after_seq=-1, limit=100)
        for r in mqtt.decode_reading_batch(row.payload).readings
    }
    assert {(m, T0) for m in range(2, 50)} <= readings  # every silent meter's latest
    assert (1, T0 + 3) in readings
    assert (1, T0 + 1) not in readings


def test_token_rows_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite"
    s = Store.open(path, now=T0)
    stored = s.insert_token(
        meter=2**64 - 1,
        token_id=5,
        msg=b"m5",
        state=TokenState.STORED,
        status=None,
        credit_after_milli=None,
        now=T0,
    )
    answered = s.insert_token(
        meter=7,
        token_id=6,
        msg=b"m6",
        state=TokenState.RESULT_READ,
        status=TokenStatus.EXPIRED,
        credit_after_milli=None,
        now=T0,
    )
    done = s.insert_token(
        meter=7,
        token_id=8,
        msg=b"m8",
        state=TokenState.STORED,
        status=None,
        credit_after_milli=None,
        now=T0,
    )
    s.set_token_result(
        done.id,
        status=TokenStatus.ACCEPTED,
        credit_after_milli=9,
        window=ReplayWindow().accept(8),
        now=T0 + 1,
    )
    s.mark_token_done(done.id, now=T0 + 2)
    with pytest.raises(StoreError, match="UNIQUE"):
        s.insert_token(
            meter=7,
            token_id=8,
            msg=b"m8",
            state=TokenState.STORED,
            status=None,
            credit_after_milli=None,
            now=T0,
        )
    s.close()

    s = Store.open(path, now=T0 + 10)  # "after the crash"
    assert [(r.id, r.state, r.status) for r in s.open_tokens()] == [
        (stored.id, TokenState.STORED, None),
        (answered.id, TokenState.RESULT_READ, TokenStatus.EXPIRED),
    ]
    assert s.open_tokens()[0].meter == 2**64 - 1  # u64 ids round-trip
    found = s.find_token(7, b"m8")
    assert found is not None
    assert (found.state, found.status, found.credit_after_milli) == (
        TokenState.DONE,
        TokenStatus.ACCEPTED,
        9,
    )
    assert s.find_token(7, b"other") is None
    assert s.replay_window(7) == ReplayWindow().accept(8)
    assert s.replay_window(8) == ReplayWindow()
    assert s.prune_tokens(before=T0 + 2) == 0
    assert s.prune_tokens(before=T0 + 3) == 1
    assert s.find_token(7, b"m8") is None
    assert s.replay_window(7) == ReplayWindow().accept(8)  # pruning keeps the window
    s.close()


def test_status_and_read_only_access(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite"
    with pytest.raises(StoreError, match="no store at"):
        Store.open_readonly(path)
    s = Store.open(path, now=T0)
    s.begin_boot()
    s.record_poll(
        GW, [ok(A, T0), PollOutcome(meter=B, reading=None, error="e")], now=T0 + 3, cap_bytes=10**6
    )
    s.insert_token(
        meter=A,
        token_id=1,
        msg=b"x",
        state=TokenState.STORED,
        status=None,
        credit_after_milli=None,
        now=T0 + 4,
    )
    ro = Store.open_readonly(path)
    st = ro.status()
    assert (st.boot_seq, st.outbox_batches, st.oldest_pending, st.oldest_open_token) == (
        1,
        1,
        T0 + 3,
        T0 + 4,
    )
    assert st.tokens_open == {"stored": 1}
    assert [(m.meter, m.reachable) for m in st.meters] == [(A, True), (B, False)]
    with pytest.raises(StoreError, match="readonly"):
        ro.begin_boot()
    ro.close()
    s.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite"
    Store.open(path, now=T0).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=2")
    with pytest.raises(StoreError, match="newer than this gateway"):
        Store.open(path, now=T0)
    with pytest.raises(StoreError, match="has schema 2"):
        Store.open_readonly(path)


def test_sqlite_failures_become_store_errors(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(StoreError, match=r"dir\.sqlite"):
        Store.open(tmp_path / "dir.sqlite", now=T0)


async def test_async_store_runs_calls_in_order_on_its_thread(tmp_path: Path) -> None:
    astore = AsyncStore(Store.open(tmp_path / "gw.sqlite", now=T0))
    s = astore.store
    boots = [await astore.run(s.begin_boot) for _ in range(3)]
    assert boots == [1, 2, 3]
    seqs = await astore.run(s.record_poll, GW, [ok(A, T0)], now=T0, cap_bytes=10**6)
    assert seqs == [T0 * 1000]
    await astore.aclose()
