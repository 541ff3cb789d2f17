"""A gateway offline for a simulated day, then its broker down: nothing lost, nothing doubled.

The whole system runs as separate processes (:mod:`tests.support.e2e_world`): a private
broker, ``voltcredit backend run``, ``voltcredit meter-sim run`` (three meters, one simulated
day every 20 s) and ``voltcredit gateway run`` polling them. Each meter gets a first top-up,
so it starts to consume. Then two outages, each with a top-up bought over the API during it:

1. **The gateway process is down** (SIGTERM, a clean stop) for more than a simulated day
   while the meters consume. A stopped gateway takes no readings: that day's readings are
   never taken, so the day's resolution is lost but not its energy (the registers are
   cumulative) — the first reading after the restart bills the whole day, standing charge
   included. The top-up's token waits at the broker in the gateway's persistent session
   and is applied on reconnect.
2. **The broker is down** (SIGTERM) while the gateway runs: the gateway keeps polling and
   holds its batches in its outbox, then publishes them, oldest first, marked historical;
   this top-up's token is published by the dispatcher once the broker is back.

Afterwards, with the gateway stopped and everything ingested:

* each top-up's token is APPLIED exactly once (one TOPUP transfer per payment, one token,
  the meter's last message id is the last token's), and was applied only after its
  outage ended;
* every batch the gateway published arrived once: ``reading_batches`` holds the gateway's seqs
  without a gap, the same set the broker carried, historical ones among them;
* the ledger is what a run without the outages would post, as far as it can be compared:
  per meter the billed intervals form one gap-free chain from the baseline; their energy
  equals the meter's register difference (the day-long interval's too); the charges are
  exact in minor units plus carry; the meter's credit at the newest billed reading is
  exactly its top-ups less everything billed (it started at zero), ``reconcile_diff_milli``
  is 0, the prepaid balance is top-ups less consumption posted, and the ledger sums to zero;
* the meter's own credit read over Modbus agrees with the backend's last reading.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select

from backend.adapters.db.engine import Database
from backend.adapters.db.tables import GatewayRow, TokenRow
from tests.support.db import BACKENDS
from tests.support.e2e_checks import (
    check_ledger,
    check_meter_accounts,
    check_topups,
    settled,
    snapshot,
)
from tests.support.e2e_world import (
    GATEWAY_ID,
    STANDING_MILLI,
    System,
    bring_up,
    check_meters_over_modbus,
    e2e_database,
    start_instant,
    topup,
    wait_for,
)

pytestmark = pytest.mark.e2e

SPEED = 4320  # simulated seconds per real second: a day in 20 s
POLL_S = 0.5  # 36 simulated minutes between readings
DAY_S = 86_400
PROFILES = ("household", "constant:700", "household:evening_peak_w=2500")
FIRST_TOPUP_MINOR = 3_000
OUTAGE_TOPUP_MINOR = 1_000


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    async with e2e_database(request.param, tmp_path, dsn) as url:
        yield url


async def _token(db: Database, payment_id: str) -> TokenRow | None:
    async with db.read() as s:
        row: TokenRow | None = await s.scalar(
            select(TokenRow).where(TokenRow.payment_id == uuid.UUID(payment_id))
        )
        return row


async def _gateway_online(db: Database) -> bool | None:
    async with db.read() as s:
        row = await s.get(GatewayRow, GATEWAY_ID)
        return None if row is None else row.online


async def test_gateway_offline_for_a_day_and_broker_outage_lose_and_double_nothing(
    tmp_path: Path, db_url: str
) -> None:
    started = time.monotonic()
    system = System(
        tmp_path,
        db_url=db_url,
        meters=len(PROFILES),
        speed=SPEED,
        poll_s=POLL_S,
        profiles=PROFILES,
        start_at=start_instant(datetime.now(UTC)),
    )
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            Database(db_url) as db,
        ):
            world = await bring_up(system, http, db)
            observer = system.observer

            # Phase A: a first top-up each; the relays close and the meters consume.
            first = [await topup(http, system.api, c, FIRST_TOPUP_MINOR) for c in world.customers]

            async def applied(*payments: str) -> bool:
                tokens = [await _token(db, p) for p in payments]
                return all(t is not None and t.status == "APPLIED" for t in tokens)

            await wait_for(
                "first top-ups applied",
                lambda: applied(*(t["payment_id"] for t in first)),
                system=system,
                timeout_s=30,
                detail=lambda: system.logs("gateway"),
            )
            await asyncio.sleep(3)  # ~3.6 simulated hours of consumption

            # Phase B: the gateway process is down for a simulated day; a top-up meanwhile.
            assert await system.stop("gateway") == 0
            down_at = time.monotonic()

            async def offline() -> bool:
                return await _gateway_online(db) is False

            await wait_for("backend sees the gateway offline", offline, system=system, timeout_s=10)
            customer_b = world.customers[0]
            paid_b = await topup(http, system.api, customer_b, OUTAGE_TOPUP_MINOR)

            async def published_b() -> bool:
                token = await _token(db, paid_b["payment_id"])
                return token is not None and token.status == "SENT"

            await wait_for("outage top-up published", published_b, system=system, timeout_s=15)
            await asyncio.sleep(max(0.0, DAY_S / SPEED + 2 - (time.monotonic() - down_at)))
            token_b = await _token(db, paid_b["payment_id"])
            assert token_b is not None
            assert token_b.status == "SENT"
            restarted_at = datetime.now(UTC)
            await system.start("gateway")
            await wait_for(
                "outage top-up applied on reconnect",
                lambda: applied(paid_b["payment_id"]),
                system=system,
                timeout_s=30,
                detail=lambda: system.logs("gateway"),
            )
            assert await _gateway_online(db) is True

            # Phase C: the broker is down while the gateway runs; a top-up meanwhile.
            await asyncio.sleep(1)
            await system.stop("broker")
            broker_down = time.monotonic()
            customer_c = world.customers[1]
            paid_c = await topup(http, system.api, customer_c, OUTAGE_TOPUP_MINOR)
            await asyncio.sleep(5)  # ~6 simulated hours of readings held in the outbox
            token_c = await _token(db, paid_c["payment_id"])
            assert token_c is not None
            assert token_c.status in ("PENDING", "SENT")
            broker_back = datetime.now(UTC)
            broker_down_sim_s = (time.monotonic() - broker_down) * SPEED
            await system.start("broker")
            await wait_for(
                "broker-outage top-up applied",
                lambda: applied(paid_c["payment_id"]),
                system=system,
                timeout_s=45,
                detail=lambda: system.logs("backend") + system.logs("gateway"),
            )
            await asyncio.sleep(2)

            # Stop the gateway, let ingest catch up with everything it published.
            assert await system.stop("gateway") == 0

            async def caught_up() -> bool:
                snap = await snapshot(db)
                seen = {b.seq for b in observer.batches}
                stored = {b.seq for b in snap.batches}
                return (
                    bool(seen)
                    and seen <= stored
                    and settled(snap, backend_since=system.started_at["backend"])
                )

            await wait_for(
                "ingest caught up",
                caught_up,
                system=system,
                timeout_s=30,
                detail=lambda: system.logs("backend"),
            )
            snap = await snapshot(db)
            tb = await _token(db, paid_b["payment_id"])
            tc = await _token(db, paid_c["payment_id"])

        # Tokens: each payment's token applied once, the outage ones only after their outage.
        check_topups(snap)
        assert len([p for p in snap.payments if p.status == "SUCCEEDED"]) == len(PROFILES) + 2
        assert tb is not None
        assert tb.completed_at is not None
        assert tc is not None
        assert tc.completed_at is not None
        assert tb.completed_at >= restarted_at
        assert tc.completed_at >= broker_back

        # Batches: every seq the gateway published stored once, gap-free, historical ones too.
        seqs = [b.seq for b in snap.batches if b.gateway_id == GATEWAY_ID]
        # (A new gateway store starts counting at its creation time x 1000, gateway/store.py.)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert {b.seq for b in observer.batches} == set(seqs)
        assert any(b.historical for b in snap.batches), "the broker outage held no batch back"

        # Consumption and money per meter (gap-free chain, exact billing, reconciliation).
        check_ledger(snap)
        check_meter_accounts(snap)
        for c in world.customers:
            readings = observer.readings(c.meter)
            ivs = snap.intervals[c.meter]
            baseline = readings[ivs[0].from_ts]
            assert (baseline.credit_milli, baseline.import_wh) == (0, 0), baseline
            # The gateway's day off: one interval spans it, with its energy and a standing charge.
            day = max(ivs, key=lambda iv: iv.to_ts - iv.from_ts)
            assert day.to_ts - day.from_ts >= DAY_S, (c.meter, day.from_ts, day.to_ts)
            assert day.days >= 1
            assert day.standing_milli == day.days * STANDING_MILLI
            assert day.import_wh == readings[day.to_ts].import_wh - readings[day.from_ts].import_wh
            assert day.import_wh > 0
            # The gateway kept polling while the broker was down: no other interval comes
            # near that outage's length (its readings were held in the outbox, not lost).
            second = sorted(iv.to_ts - iv.from_ts for iv in ivs)[-2]
            assert second < broker_down_sim_s / 2, (c.meter, second, broker_down_sim_s)
        await check_meters_over_modbus(system, snap)
    finally:
        system.close()
    print(
        f"\ngateway offline a simulated day + broker outage: {len(snap.batches)} batches, "
        f"{sum(len(v) for v in snap.intervals.values())} intervals, "
        f"{len(snap.transfers)} transfers, {time.monotonic() - started:.1f} s"
    )
