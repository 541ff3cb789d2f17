"""Consumption ingest into the ledger: agreement with meter_sim, corrupted deliveries, limits.

Real :mod:`meter_sim.core` meters consume under a time-of-use tariff with a standing
charge (across the end of DST on 25 October 2026 in Europe/Berlin); their readings are
ingested in gateway batches; the ledger must take exactly what the meters took.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from backend.adapters.db.alert_tables import AlertRow
from backend.adapters.db.engine import Database
from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.ledger_tables import TransferRow
from backend.domain.ledger import Transfer, TransferCode, derive_id
from backend.service.ingest import IncomingBatch, IngestService
from firmware_protocol.mqtt import ReadingBatch
from tests.support.db import BACKENDS
from tests.support.ingest import (
    GRID_MILLI_PER_KWH,
    PROVISIONED,
    VAT_BP,
    IngestWorld,
    SimMeters,
    batches,
    provision_ingest,
)
from tests.support.topups import Target, fresh_target

pytestmark = pytest.mark.integration

START = int(datetime(2026, 10, 10, tzinfo=UTC).timestamp())
OPENING_MINOR = 5_000  # 50.00 EUR on the meter and in the ledger


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def target(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Target]:
    dsn = request.getfixturevalue("postgres_dsn") if kind == "postgresql" else None
    async with fresh_target(kind, tmp_path, dsn) as t:
        yield t


@pytest.fixture
async def second_target(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Target]:
    dsn = request.getfixturevalue("postgres_dsn") if kind == "postgresql" else None
    async with fresh_target(kind, tmp_path, dsn) as t:
        yield t


class Clock:
    """The backend's clock: a little after the newest reading it is given."""

    def __init__(self) -> None:
        self.now = datetime.fromtimestamp(START, UTC)

    def __call__(self) -> datetime:
        return self.now


async def feed(
    service: IngestService, clock: Clock, items: list[ReadingBatch], per_unit: int = 4
) -> None:
    """Ingest ``items`` ``per_unit`` batches per unit of work, the clock after each batch."""
    for i in range(0, len(items), per_unit):
        chunk = items[i : i + per_unit]
        newest = max(r.ts for b in chunk for r in b.readings)
        clock.now = max(clock.now, datetime.fromtimestamp(newest + 5, UTC))
        await service.ingest([IncomingBatch(b, clock.now) for b in chunk])


async def balances(db: Database) -> dict[int, int]:
    async with db.read() as s:
        return await LedgerRepository(s).balances()


async def ledger_sum(db: Database) -> int:
    async with db.read() as s:
        return await LedgerRepository(s).sum_of_balances()


async def interval_totals(db: Database) -> dict[int, int]:
    async with db.read() as s:
        rows = await s.execute(
            select(
                ConsumptionIntervalRow.meter_id, func.sum(ConsumptionIntervalRow.total_milli)
            ).group_by(ConsumptionIntervalRow.meter_id)
        )
        return {m: int(t) for m, t in rows}


async def ingest_rows(db: Database) -> dict[int, MeterIngestRow]:
    async with db.read() as s:
        return {r.meter_id: r for r in (await s.scalars(select(MeterIngestRow))).all()}


async def alerts(db: Database) -> list[AlertRow]:
    async with db.read() as s:
        return list((await s.scalars(select(AlertRow).order_by(AlertRow.id))).all())


async def world_and_meters(
    db: Database, *, days: int = 16, step: int = 900, meters: int = 3
) -> tuple[IngestWorld, SimMeters, list[ReadingBatch]]:
    world = await provision_ingest(db, meters=meters, opening_minor=OPENING_MINOR)
    sim = SimMeters(world.meters, START, OPENING_MINOR * 1000)
    rounds = [[sim.reading(m) for m in world.meters], *sim.run(START + days * 86_400, step)]
    return world, sim, batches(rounds)


async def test_ledger_takes_exactly_what_the_meters_took(target: Target) -> None:
    """A month of half-hourly readings (10 October - 9 November 2026: the end of DST on the
    25th, a month start) under time of use with a daily standing charge: the ledger
    agrees with the meters to the rating unit."""
    async with target.database() as db:
        world, sim, items = await world_and_meters(db, days=31, step=1_800)
        clock = Clock()
        service = IngestService(db, clock=clock)
        await feed(service, clock, items)
        rows = await ingest_rows(db)
        totals = await interval_totals(db)
        after = await balances(db)
        for meter in world.meters:
            taken = OPENING_MINOR * 1000 - sim.states[meter].credit_milli
            assert taken > 31 * 38_000  # standing charges and real consumption
            assert totals[meter] == taken
            carry = rows[meter].carry["amount_milli"]
            assert after[world.prepaid[meter]] * 1000 - carry == sim.states[meter].credit_milli
            assert rows[meter].reconcile_diff_milli == 0
            assert rows[meter].pending == {}
            assert rows[meter].last_credit_milli == sim.states[meter].credit_milli
        assert await ledger_sum(db) == 0
        # Shares: the grid fee is exactly floor(Wh x price / 1000) over the meter's life,
        # VAT floor(bp of the amount); the utility the rest; each within a minor unit posted.
        async with db.read() as s:
            energy = dict(
                (
                    await s.execute(
                        select(
                            ConsumptionIntervalRow.meter_id,
                            func.sum(ConsumptionIntervalRow.import_wh),
                        ).group_by(ConsumptionIntervalRow.meter_id)
                    )
                ).all()
            )
        grid_milli = sum(int(energy[m]) * GRID_MILLI_PER_KWH // 1000 for m in world.meters)
        vat_milli = sum(totals[m] * VAT_BP // 10_000 for m in world.meters)
        assert 0 <= grid_milli - after[world.grid_id] * 1000 < 1000 * len(world.meters)
        assert 0 <= vat_milli - after[world.tax_id] * 1000 < 1000 * len(world.meters)
        opening = OPENING_MINOR * len(world.meters)
        consumed = sum(opening // len(world.meters) - after[world.prepaid[m]] for m in world.meters)
        assert after[world.utility_id] + after[world.grid_id] + after[world.tax_id] == consumed
        # The only alerts are none: the ledger and the meters agreed throughout.
        assert [a.kind for a in await alerts(db)] == []


async def test_duplicated_reordered_late_and_gapped_delivery_posts_the_same_ledger(
    target: Target, second_target: Target
) -> None:
    async with target.database() as db:
        world, _sim, items = await world_and_meters(db, days=6, step=1_800)
        clock = Clock()
        await feed(IngestService(db, clock=clock), clock, items)
        clean = await balances(db)
        clean_totals = await interval_totals(db)

    # An identical world (same ids) in another database, fed a corrupted stream.
    async with second_target.database() as db:
        world2 = await provision_ingest(db, meters=3, opening_minor=OPENING_MINOR)
        assert world2 == world
        rng = random.Random(7)
        corrupted: list[ReadingBatch] = []
        for n, b in enumerate(items):
            if n and n % 13 == 0:
                continue  # a lost batch: the next one spans the gap
            corrupted.append(b)
            if rng.random() < 0.2:
                corrupted.append(b)  # redelivered
        # Late: some batches held back and delivered at the end (historical flush).
        late = [b for i, b in enumerate(corrupted) if i % 17 == 5]
        stream = [b for i, b in enumerate(corrupted) if i % 17 != 5]
        # Reorder neighbours, and re-send a few batches under a new seq (a gateway that
        # lost its store): readings de-duplicate on (meter, ts).
        # (The first batch stays first: the first reading ingested is the baseline.)
        for i in range(1, len(stream) - 1, 7):
            stream[i], stream[i + 1] = stream[i + 1], stream[i]
        resent = [
            ReadingBatch(gw=b.gw, seq=10_000 + i, historical=True, readings=b.readings)
            for i, b in enumerate(stream[::11])
        ]
        # The very last batch must arrive last for the totals to reach it.
        last = items[-1]
        stream = [b for b in stream if b.seq != last.seq]
        clock = Clock()
        service = IngestService(db, clock=clock)
        await feed(service, clock, stream + late + resent + [last], per_unit=3)
        assert await balances(db) == clean
        assert await interval_totals(db) == clean_totals
        assert await ledger_sum(db) == 0


async def test_a_batch_delivered_twice_changes_nothing(target: Target) -> None:
    async with target.database() as db:
        _world, _sim, items = await world_and_meters(db, days=1, step=3_600)
        clock = Clock()
        service = IngestService(db, clock=clock)
        await feed(service, clock, items[:10])
        before = await balances(db)
        async with db.read() as s:
            n = await s.scalar(select(func.count()).select_from(TransferRow))
        report = await service.ingest([IncomingBatch(b, clock.now) for b in items[3:10]])
        assert report.duplicate_batches == 7
        assert report.batches == 0
        assert await balances(db) == before
        async with db.read() as s:
            assert await s.scalar(select(func.count()).select_from(TransferRow)) == n


async def test_debt_limit_holds_consumption_and_the_next_topup_recovers_it_first(
    target: Target,
) -> None:
    """A meter in debt beyond the ledger's limit: held, not lost; posted after a top-up."""
    async with target.database() as db:
        world = await provision_ingest(db, meters=1, opening_minor=100, debt_limit_minor=50)
        meter = world.meters[0]
        # The meter holds much more credit than the ledger (its own opening was 30.00).
        sim = SimMeters(world.meters, START, 3_000_000)
        rounds = [[sim.reading(meter)], *sim.run(START + 3 * 86_400, 3_600)]
        clock = Clock()
        service = IngestService(db, clock=clock)
        await feed(service, clock, batches(rounds))
        taken = 3_000_000 - sim.states[meter].credit_milli
        assert taken > 150_000  # more than the ledger allows (1.00 + 0.50)
        row = (await ingest_rows(db))[meter]
        held = sum(row.pending.values())
        after = await balances(db)
        assert held > 0
        assert after[world.prepaid[meter]] >= -50
        assert after[world.prepaid[meter]] * 1000 - held * 1000 - row.carry["amount_milli"] == (
            100_000 - taken
        )
        kinds = [a.kind for a in await alerts(db)]
        assert kinds.count("DEBT_LIMIT_REACHED") == 1
        # A top-up of 50.00: the next reading posts the held amount first, whole.
        async with db.write() as s:
            await LedgerRepository(s).post(
                [
                    Transfer(
                        id=derive_id("topup-test", str(meter)),
                        debit_account_id=world.clearing_id,
                        credit_account_id=world.prepaid[meter],
                        amount=5_000,
                        currency="EUR",
                        code=TransferCode.TOPUP,
                        reference="topup",
                        created_at=PROVISIONED,
                    )
                ]
            )
        more = sim.run(START + 3 * 86_400 + 7_200, 3_600)
        await feed(service, clock, batches(more, first_seq=1_000))
        row = (await ingest_rows(db))[meter]
        assert row.pending == {}
        taken = 3_000_000 - sim.states[meter].credit_milli
        after = await balances(db)
        assert after[world.prepaid[meter]] * 1000 - row.carry["amount_milli"] == (
            100_000 + 5_000_000 - taken
        )
        assert await ledger_sum(db) == 0
        # The meter started with 29.00 more than the ledger knew of: one reconciliation
        # alert at the first reading, not one per reading; then one more when the ledger's
        # top-up (posted here without a token) never reached the meter.
        recon = [a.detail for a in await alerts(db) if a.kind == "RECONCILIATION"]
        assert [d["difference_milli"] for d in recon] == [2_900_000, 2_900_000 - 5_000_000]


async def test_unknown_meters_and_quarantine_raise_one_alert_each(target: Target) -> None:
    async with target.database() as db:
        world, _sim, items = await world_and_meters(db, days=1, step=3_600, meters=1)
        meter = world.meters[0]
        clock = Clock()
        service = IngestService(db, clock=clock)
        await feed(service, clock, items[:3])
        # A stranger's meter on our gateway, twice; a reading from the far future, twice.
        base = items[3].readings[0]
        stranger = dataclasses.replace(base, meter=99_999_999)
        future = dataclasses.replace(base, ts=base.ts + 86_400)
        for seq in (500, 501):
            await service.ingest(
                [
                    IncomingBatch(
                        ReadingBatch(
                            gw="gw-1", seq=seq, historical=False, readings=(stranger, future)
                        ),
                        clock.now,
                    )
                ]
            )
        await feed(service, clock, items[3:])
        kinds = [a.kind for a in await alerts(db)]
        assert kinds.count("READING_QUARANTINED") == 1
        # The stranger is not provisioned anywhere: logged, no tenant to alert.
        assert "UNKNOWN_METER" not in kinds
        row = (await ingest_rows(db))[meter]
        assert row.quarantine is None  # billing resumed with the next good reading
        assert row.last_ts == items[-1].readings[0].ts
