"""Consumption ingest: baselines, duplicates, reordering, gaps, quarantine, tariff changes."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from backend.domain.consumption import (
    DEFAULT_POLICY,
    ActiveTariff,
    Duplicate,
    EventOrderError,
    FirstReading,
    Historical,
    IngestError,
    IngestPolicy,
    Interval,
    MeterIngestState,
    MeterMismatchError,
    MeterReplaced,
    Outcome,
    Quarantined,
    QuarantineReason,
    RegisterReset,
    Snapshot,
    StateFormatError,
    TariffChanged,
    TariffHistory,
    TariffHistoryError,
    apply_event,
    ingest,
    state_from_dict,
    state_to_dict,
)
from backend.domain.split import (
    MinorCarry,
    RuleKind,
    SplitRule,
    SplitTotals,
    split_increment,
    to_minor,
)
from backend.errors import BackendError
from firmware_protocol import rating
from firmware_protocol.mqtt import Reading, Relay
from firmware_protocol.tariff import Band, Block, Switch, Tariff, flat_tariff
from firmware_protocol.units import currency

METER = 4242
BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"
EUR, USD = currency("EUR"), currency("USD")

#: Berlin time of use (night, day, peak; RATING.md §9 case 2) with monthly inclining blocks.
TOU = Tariff(
    tariff_id=7,
    currency=EUR,
    timezone=BERLIN,
    bands=(Band("night", 20_000), Band("day", 30_000), Band("peak", 45_000)),
    weekday=(Switch(0, 0), Switch(150, 1), Switch(1020, 2), Switch(1260, 0)),
    weekend=(Switch(0, 0), Switch(150, 1), Switch(1260, 0)),
    holiday=(Switch(0, 0),),
    standing_charge_milli_per_day=45_000,
    blocks=(Block(20_000, 20_000), Block(60_000, 50_000)),
)
FLAT = flat_tariff(
    tariff_id=1,
    currency=EUR,
    timezone=BERLIN,
    price_milli_per_kwh=31_270,
    standing_charge_milli_per_day=10_000,
)
FLAT2 = dataclasses.replace(FLAT, tariff_id=2, standing_charge_milli_per_day=20_000)
#: One band with blocks in New York (RATING.md §9 case 4).
NY = Tariff(
    tariff_id=9,
    currency=USD,
    timezone=NEW_YORK,
    bands=(Band("all-day", 100_000),),
    weekday=(Switch(0, 0),),
    weekend=(Switch(0, 0),),
    holiday=(Switch(0, 0),),
    standing_charge_milli_per_day=10_000,
    blocks=(Block(500, 20_000), Block(1_000, 50_000)),
)

FAST = settings(max_examples=150, deadline=None)


def local(tz: str, year: int, month: int, day: int, hour: int = 0, *, minute: int = 0) -> int:
    """Unix seconds of a wall-clock time in ``tz``."""
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(tz)).timestamp())


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return local(BERLIN, year, month, day, hour, minute=minute)


def rd(
    ts: int,
    import_wh: int,
    bands: Sequence[int],
    *,
    tariff_id: int = 1,
    period: int = 0,
    period_wh: int = 0,
    meter: int = METER,
) -> Reading:
    return Reading(
        meter=meter,
        ts=ts,
        import_wh=import_wh,
        band_wh=tuple(bands),
        credit_milli=0,
        relay=Relay.CLOSED,
        power_w=0,
        voltage_dv=2301,
        current_ma=0,
        tariff_id=tariff_id,
        last_token_id=0,
        status_flags=0,
        block_period=period,
        block_period_wh=period_wh,
    )


def trim(bands: Sequence[int]) -> tuple[int, ...]:
    """What a gateway sends: trailing zero bands left out (gateway/readings.py)."""
    end = len(bands)
    while end > 1 and bands[end - 1] == 0:
        end -= 1
    return tuple(bands[:end])


class Meter:
    """A meter's registers driven by :func:`rating.advance`, with tariff activations."""

    def __init__(self, tariff: Tariff, activation: int, import_wh: int = 0) -> None:
        self.tariff, self.regs = tariff, rating.start_registers(tariff, activation)
        self.before_activation_wh, self.closed_milli = import_wh, 0

    def use(self, t: int, wh: int) -> None:
        self.regs = rating.advance(self.tariff, self.regs, t, wh)

    def activate(self, tariff: Tariff, t: int) -> None:
        self.closed_milli += rating.cumulative_charge_milli(self.tariff, self.regs)
        self.before_activation_wh += sum(self.regs.band_wh)
        self.tariff, self.regs = tariff, rating.start_registers(tariff, t)

    @property
    def energy_milli(self) -> int:
        """Energy charge since the first activation (what the meter took from credit)."""
        return self.closed_milli + rating.cumulative_charge_milli(self.tariff, self.regs)

    def read(self, ts: int) -> Reading:
        return rd(
            ts,
            self.before_activation_wh + sum(self.regs.band_wh),
            trim(self.regs.band_wh),
            tariff_id=self.tariff.tariff_id,
            period=self.regs.block_period,
            period_wh=self.regs.block_period_wh,
        )


def history(*entries: tuple[Tariff, int]) -> TariffHistory:
    return TariffHistory(tuple(ActiveTariff(t, a) for t, a in entries))


def feed(
    readings: Iterable[Reading],
    tariffs: TariffHistory,
    state: MeterIngestState | None = None,
    policy: IngestPolicy = DEFAULT_POLICY,
) -> tuple[MeterIngestState, list[Outcome]]:
    state = state or MeterIngestState(meter=METER)
    out: list[Outcome] = []
    for r in readings:
        state, outcome = ingest(state, r, tariffs, policy=policy)
        # the state survives persistence at every step
        assert state_from_dict(state_to_dict(state)) == state
        out.append(outcome)
    return state, out


def intervals(outcomes: Iterable[Outcome]) -> list[Interval]:
    out: list[Interval] = []
    for o in outcomes:
        if isinstance(o, Interval):
            out.append(o)
        elif isinstance(o, TariffChanged):
            out.extend(o.segments)
    return out


def one(outcomes: list[Outcome]) -> Outcome:
    assert len(outcomes) == 1
    return outcomes[0]


# ----------------------------------------------------------------------------- basics

ACT = berlin(2026, 10, 1)
FLAT_HISTORY = history((FLAT, ACT))


def test_first_reading_is_the_baseline_then_intervals_bill_the_difference() -> None:
    t0, t1 = berlin(2026, 10, 5, 12), berlin(2026, 10, 6, 12)
    state, (first, second) = feed([rd(t0, 6_000, (1_000,)), rd(t1, 8_000, (3_000,))], FLAT_HISTORY)
    assert first == FirstReading(METER, t0, 1)
    assert isinstance(second, Interval)
    # floor(3000 * 31.27) - floor(1000 * 31.27) = 93 810 - 31 270; one day begun (the 6th)
    assert second.charge.total_milli == 62_540
    assert (second.from_ts, second.to_ts, second.import_wh) == (t0, t1, 2_000)
    assert second.energy_wh == (2_000,)
    assert (second.days, second.standing_milli, second.total_milli) == (1, 10_000, 72_540)
    assert (second.tariff_id, second.activation, second.meter) == (1, ACT, METER)
    assert (second.unrated_block_wh, second.rolled_over) == (0, False)
    assert state.baseline is not None
    assert state.baseline.ts == t1


def test_duplicates_and_historical_readings_bill_nothing() -> None:
    t0, t1, t2 = berlin(2026, 10, 5), berlin(2026, 10, 6), berlin(2026, 10, 7)
    state, out = feed(
        [
            rd(t1, 2_000, (1_000,)),
            rd(t1, 2_000, (1_000, 0, 0)),  # the same, with untrimmed bands
            rd(t0, 1_500, (500,)),  # older than the baseline
            rd(t2, 2_500, (1_500,)),
            rd(t1, 2_000, (1_000,)),  # now older than the baseline
        ],
        FLAT_HISTORY,
    )
    assert out[1] == Duplicate(METER, t1)
    assert out[2] == Historical(METER, t0)
    assert isinstance(out[3], Interval)
    assert out[4] == Historical(METER, t1)
    assert state.baseline is not None
    assert state.baseline.ts == t2


def test_conflicting_duplicate_is_quarantined() -> None:
    t = berlin(2026, 10, 5)
    state, out = feed([rd(t, 2_000, (1_000,)), rd(t, 2_001, (1_001,))], FLAT_HISTORY)
    q = out[1]
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.CONFLICTING_DUPLICATE
    assert dict(q.evidence) == {"import_wh_before": 2_000, "import_wh_after": 2_001}
    assert state.suspect is None


def test_a_reading_of_another_meter_is_refused() -> None:
    with pytest.raises(MeterMismatchError, match="a reading of meter 1 for meter 4242"):
        ingest(MeterIngestState(meter=METER), rd(ACT, 0, (0,), meter=1), FLAT_HISTORY)


def test_ingest_checks_its_arguments() -> None:
    state = MeterIngestState(meter=METER)
    with pytest.raises(IngestError, match="MeterIngestState and a Reading"):
        ingest(state, "reading", FLAT_HISTORY)  # type: ignore[arg-type]
    with pytest.raises(IngestError, match="TariffHistory and an IngestPolicy"):
        ingest(state, rd(ACT, 0, (0,)), (ActiveTariff(FLAT, ACT),))  # type: ignore[arg-type]
    with pytest.raises(IngestError, match="TariffHistory and an IngestPolicy"):
        ingest(state, rd(ACT, 0, (0,)), FLAT_HISTORY, policy=None)  # type: ignore[arg-type]


def test_error_tree() -> None:
    for cls in (MeterMismatchError, TariffHistoryError, EventOrderError, StateFormatError):
        assert issubclass(cls, IngestError)
    assert issubclass(IngestError, BackendError)


def test_a_reading_stamped_in_the_future_is_quarantined() -> None:
    t = berlin(2026, 10, 5)
    state, _ = feed([rd(t, 0, (0,))], FLAT_HISTORY)
    corrupt = rd(2**32 - 1, 10, (10,))  # plausible registers, a timestamp from 2106
    same, q = ingest(state, corrupt, FLAT_HISTORY, received_at=t + 60)
    assert same == state
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.FUTURE_TIMESTAMP
    assert dict(q.evidence) == {"ts": 2**32 - 1, "received_at": t + 60}
    # within the tolerance (and without a receive time) a reading is taken as it is
    policy = IngestPolicy(max_clock_ahead_s=0)
    _, ok = ingest(state, rd(t + 60, 10, (10,)), FLAT_HISTORY, policy=policy, received_at=t + 60)
    assert isinstance(ok, Interval)
    with pytest.raises(IngestError, match="received_at must be"):
        ingest(state, corrupt, FLAT_HISTORY, received_at=-1)


def test_gap_of_days_is_one_interval_with_every_standing_charge() -> None:
    t0, t1 = berlin(2026, 10, 5, 12), berlin(2026, 10, 25, 12)  # across the DST change
    _, (_, iv) = feed([rd(t0, 1_000, (0,)), rd(t1, 51_000, (50_000,))], FLAT_HISTORY)
    assert isinstance(iv, Interval)
    assert (iv.days, iv.standing_milli) == (20, 200_000)
    assert iv.charge.total_milli == 50_000 * 31_270 // 1000


# ----------------------------------------------------------------------------- registers


def test_trimmed_bands_are_padded_and_unknown_bands_are_refused() -> None:
    tou = history((TOU, ACT))
    p = rating.block_period_of(TOU, ACT)
    t = berlin(2026, 10, 5)
    state, (first,) = feed([rd(t, 10, (10,), tariff_id=7, period=p, period_wh=10)], tou)
    assert isinstance(first, FirstReading)
    assert state.baseline is not None
    assert state.baseline.regs.band_wh == (10, 0, 0)
    _, (bad,) = feed([rd(t + 60, 20, (10, 0, 0, 5), tariff_id=7, period=p)], tou, state)
    assert isinstance(bad, Quarantined)
    assert bad.reason is QuarantineReason.BAD_REGISTERS
    assert bad.evidence == (("band_wh[3]", 5),)
    # untrimmed zero bands beyond the tariff's are fine
    _, (ok,) = feed(
        [rd(t + 60, 10, (10, 0, 0, 0), tariff_id=7, period=p, period_wh=10)], tou, state
    )
    assert isinstance(ok, Interval)


@pytest.mark.parametrize(
    ("period_delta", "period_wh", "match"),
    [
        (-1, 0, "does not fit an activation"),  # before the activation's period
        (0, 11, "does not fit an activation"),  # more period energy than since activation
        (10**6, 0, "block_period"),  # beyond any period a u32 instant can have
    ],
)
def test_block_registers_that_cannot_be_are_refused(
    period_delta: int, period_wh: int, match: str
) -> None:
    p = rating.block_period_of(TOU, ACT) + period_delta
    r = rd(berlin(2026, 10, 5), 10, (10,), tariff_id=7, period=p, period_wh=period_wh)
    _, (q,) = feed([r], history((TOU, ACT)))
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.BAD_REGISTERS
    assert match in q.detail
    assert dict(q.evidence) == {"block_period": p, "block_period_wh": period_wh}


def test_tariff_without_blocks_ignores_the_block_fields() -> None:
    # a meter that reports period 0 (MQTT.md §3.2: consumers of non-block tariffs ignore it)
    t = berlin(2026, 10, 5)
    _, out = feed([rd(t, 0, (0,)), rd(t + 3_600, 500, (500,), period=0, period_wh=0)], FLAT_HISTORY)
    assert isinstance(out[1], Interval)
    assert out[1].charge.total_milli == 500 * 31_270 // 1000


def test_band_total_beyond_the_register_bound_is_refused() -> None:
    two = dataclasses.replace(
        FLAT, bands=(Band("a", 1), Band("b", 1)), weekday=(Switch(0, 0), Switch(600, 1))
    )
    _, (q,) = feed([rd(ACT + 1, 0, (2**48, 2**48))], history((two, ACT)))
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.BAD_REGISTERS


@pytest.mark.parametrize(
    ("tariffs", "reported", "expected"),
    [
        (history((FLAT, ACT)), 7, 1),  # the meter runs another tariff than ours
        (history((FLAT, ACT + 10**6)), 1, 0),  # nothing in force yet
        (history((FLAT, ACT)), 0, 1),  # the meter has no tariff
    ],
)
def test_tariff_mismatch_is_quarantined(
    tariffs: TariffHistory, reported: int, expected: int
) -> None:
    state, (q,) = feed([rd(ACT + 60, 0, (0,), tariff_id=reported)], tariffs)
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.TARIFF_MISMATCH
    assert dict(q.evidence) == {"tariff_id": reported, "expected_tariff_id": expected}
    assert state == MeterIngestState(meter=METER)


def test_import_and_band_registers_must_agree() -> None:
    t = berlin(2026, 10, 5)
    state, out = feed([rd(t, 1_000, (0,)), rd(t + 3_600, 1_100, (90,))], FLAT_HISTORY)
    q = out[1]
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.REGISTER_MISMATCH
    assert dict(q.evidence) == {"import_wh": 100, "band_wh": 90}
    assert state.baseline is not None
    assert state.baseline.ts == t


# ----------------------------------------------------------------------------- rollover / reset


def test_rollover_of_the_total_import_register() -> None:
    policy = IngestPolicy(rollover_modulus=10**6)
    t = berlin(2026, 10, 5)
    _, out = feed(
        [rd(t, 999_900, (5_000,)), rd(t + 3_600, 100, (5_200,))], FLAT_HISTORY, policy=policy
    )
    iv = out[1]
    assert isinstance(iv, Interval)
    assert (iv.import_wh, iv.rolled_over) == (200, True)


def test_a_wrap_the_bands_do_not_confirm_is_no_rollover() -> None:
    policy = IngestPolicy(rollover_modulus=10**6)
    t = berlin(2026, 10, 5)
    _, out = feed(
        [rd(t, 999_900, (5_000,)), rd(t + 3_600, 100, (5_100,))], FLAT_HISTORY, policy=policy
    )
    assert isinstance(out[1], Quarantined)
    assert out[1].reason is QuarantineReason.REGISTER_MISMATCH
    # a value beyond the modulus cannot have wrapped
    _, out = feed(
        [rd(t, 2_000_000, (5_000,)), rd(t + 3_600, 100, (5_200,))], FLAT_HISTORY, policy=policy
    )
    assert isinstance(out[1], Quarantined)
    assert out[1].reason is QuarantineReason.REGISTER_RESET


def test_reset_without_event_is_quarantined_and_an_event_makes_a_new_baseline() -> None:
    t = berlin(2026, 10, 5)
    state, out = feed([rd(t, 50_000, (40_000,)), rd(t + 600, 20, (20,))], FLAT_HISTORY)
    q = out[1]
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.REGISTER_RESET
    assert dict(q.evidence) == {"import_wh_before": 50_000, "import_wh_after": 20}
    state = apply_event(state, RegisterReset(t + 300))
    assert state == MeterIngestState(meter=METER, not_before=t + 300)
    state, out = feed(
        [
            rd(t + 100, 50_010, (40_010,)),  # before the reset: old registers
            rd(t + 600, 20, (20,)),
            rd(t + 1_200, 70, (70,)),
        ],
        FLAT_HISTORY,
        state,
    )
    assert out[0] == Historical(METER, t + 100)
    assert out[1] == FirstReading(METER, t + 600, 1)
    assert isinstance(out[2], Interval)
    assert out[2].import_wh == 50


def test_band_register_going_back_is_a_reset_even_with_a_rollover_modulus() -> None:
    two = dataclasses.replace(
        FLAT, bands=(Band("a", 1), Band("b", 1)), weekday=(Switch(0, 0), Switch(600, 1))
    )
    t = berlin(2026, 10, 5)
    _, out = feed(
        [rd(t, 1_000, (500, 500)), rd(t + 60, 1_010, (510, 490))],
        history((two, ACT)),
        policy=IngestPolicy(rollover_modulus=10**6),
    )
    q = out[1]
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.REGISTER_RESET
    assert dict(q.evidence) == {"band_wh[1]_before": 500, "band_wh[1]_after": 490}


def test_meter_replacement_event() -> None:
    t = berlin(2026, 10, 5)
    state, _ = feed([rd(t, 50_000, (40_000,))], FLAT_HISTORY)
    replaced = apply_event(state, MeterReplaced(t + 10))
    assert replaced == MeterIngestState(meter=METER, not_before=t + 10)
    _, out = feed([rd(t + 20, 3, (3,))], FLAT_HISTORY, replaced)
    assert out == [FirstReading(METER, t + 20, 1)]


def test_events_are_idempotent_and_must_not_precede_the_baseline() -> None:
    t = berlin(2026, 10, 5)
    state = apply_event(MeterIngestState(meter=METER), RegisterReset(t))
    state, _ = feed([rd(t + 60, 0, (0,))], FLAT_HISTORY, state)
    # the same event again (and an older one) changes nothing
    assert apply_event(state, RegisterReset(t)) == state
    assert apply_event(state, MeterReplaced(t - 5)) == state
    with pytest.raises(EventOrderError, match="before the baseline reading"):
        apply_event(state, RegisterReset(t + 30))
    # an event at the baseline's own instant is allowed
    assert apply_event(state, RegisterReset(t + 60)) == MeterIngestState(
        meter=METER, not_before=t + 60
    )
    with pytest.raises(IngestError, match="apply_event takes"):
        apply_event(state, t + 90)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- quarantine


def test_single_corrupt_reading_costs_nothing() -> None:
    t = berlin(2026, 10, 5)
    state, out = feed(
        [
            rd(t, 1_000, (1_000,)),
            rd(t + 60, 901_000, (901_000,)),  # 900 kWh in a minute
            rd(t + 180, 1_030, (1_030,)),  # consistent with the baseline
        ],
        FLAT_HISTORY,
    )
    q = out[1]
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.IMPLAUSIBLE_JUMP
    assert dict(q.evidence) == {"import_wh": 900_000, "seconds": 60, "max_power_w": 100_000}
    iv = out[2]
    assert isinstance(iv, Interval)
    assert (iv.from_ts, iv.import_wh) == (t, 30)
    assert state.suspect is None


def test_a_jump_the_next_reading_confirms_resumes_billing_from_it() -> None:
    t = berlin(2026, 10, 5)
    state, out = feed(
        [
            rd(t, 1_000, (1_000,)),
            rd(t + 60, 901_000, (901_000,)),
            rd(t + 60, 901_000, (901_000,)),  # duplicate of the suspect
            rd(t + 120, 901_050, (901_050,)),
        ],
        FLAT_HISTORY,
    )
    assert isinstance(out[1], Quarantined)
    assert out[2] == Duplicate(METER, t + 60)
    iv = out[3]
    assert isinstance(iv, Interval)
    assert (iv.from_ts, iv.to_ts, iv.import_wh) == (t + 60, t + 120, 50)
    assert state.baseline is not None
    assert state.baseline.ts == t + 120
    assert state.suspect is None


def test_a_reset_the_next_reading_confirms_resumes_billing() -> None:
    t = berlin(2026, 10, 5)
    _, out = feed(
        [rd(t, 50_000, (40_000,)), rd(t + 600, 20, (20,)), rd(t + 1_200, 70, (70,))],
        FLAT_HISTORY,
    )
    assert isinstance(out[1], Quarantined)
    assert isinstance(out[2], Interval)
    assert (out[2].from_ts, out[2].import_wh) == (t + 600, 50)


def test_suspect_is_replaced_when_the_next_reading_fits_neither() -> None:
    t = berlin(2026, 10, 5)
    state, out = feed(
        [
            rd(t, 1_000, (1_000,)),
            rd(t + 600, 901_000, (901_000,)),
            rd(t + 300, 500_000, (500_000,)),  # before the suspect: not compared with it
            rd(t + 900, 20, (20,)),  # fits neither baseline nor suspect
        ],
        FLAT_HISTORY,
    )
    assert [type(o) for o in out[1:]] == [Quarantined] * 3
    assert state.suspect is not None
    assert state.suspect.ts == t + 900


def test_reading_between_baseline_and_suspect_is_billed() -> None:
    t = berlin(2026, 10, 5)
    state, out = feed(
        [rd(t, 1_000, (1_000,)), rd(t + 600, 901_000, (901_000,)), rd(t + 300, 1_010, (1_010,))],
        FLAT_HISTORY,
    )
    assert isinstance(out[2], Interval)
    assert state.suspect is None


# ----------------------------------------------------------------------------- block periods


def test_block_registers_one_period_apart_rate_exactly() -> None:
    m = Meter(TOU, ACT, import_wh=77)
    m.use(berlin(2026, 10, 20, 3), 30_000)
    r0 = m.read(berlin(2026, 10, 28))
    c0 = m.energy_milli
    m.use(berlin(2026, 10, 30, 12), 15_000)  # October: 45 kWh, into the second block
    m.use(berlin(2026, 11, 2, 18), 25_000)  # November: 25 kWh, into the first
    r1 = m.read(berlin(2026, 11, 3))
    _, (_, iv) = feed([r0, r1], history((TOU, ACT)))
    assert isinstance(iv, Interval)
    assert iv.charge.total_milli == m.energy_milli - c0
    assert iv.unrated_block_wh == 0
    assert iv.energy_wh == (0, 15_000, 25_000)


def test_block_registers_further_apart_bill_a_lower_bound_and_report_the_rest() -> None:
    act = berlin(2026, 8, 1)
    m = Meter(TOU, act)
    m.use(berlin(2026, 8, 10, 3), 30_000)
    r0 = m.read(berlin(2026, 8, 20))
    c0 = m.energy_milli
    m.use(berlin(2026, 9, 15, 3), 25_000)  # September's adder: (25 000 - 20 000) * 20
    m.use(berlin(2026, 10, 15, 3), 70_000)
    r1 = m.read(berlin(2026, 10, 20))
    _, (_, iv) = feed([r0, r1], history((TOU, act)))
    assert isinstance(iv, Interval)
    assert iv.unrated_block_wh == 25_000
    assert iv.charge.block_wh == 70_000
    assert iv.charge.total_milli + 100_000 == m.energy_milli - c0
    assert sum(iv.charge.energy_milli) == 95_000 * 30  # the bands are exact (day band)


def test_flat_tariff_months_apart_is_exact() -> None:
    act = berlin(2026, 8, 1)
    m = Meter(FLAT, act, import_wh=5)
    m.use(berlin(2026, 8, 10), 333)
    r0 = m.read(berlin(2026, 8, 20))
    c0 = m.energy_milli
    m.use(berlin(2026, 9, 10), 444)
    m.use(berlin(2026, 11, 10), 555)
    r1 = m.read(berlin(2026, 11, 20))
    _, (_, iv) = feed([r0, r1], history((FLAT, act)))
    assert isinstance(iv, Interval)
    assert (iv.charge.total_milli, iv.unrated_block_wh) == (m.energy_milli - c0, 0)


@pytest.mark.parametrize(
    ("after_period", "after_wh", "match"),
    [
        (0, 120, "block energy 20 Wh differs"),  # same period, other energy
        (-1, 100, "block_period went backwards"),
        (2, 120, "block_period_wh exceeds"),  # two periods on, more than the interval's
    ],
)
def test_inconsistent_block_registers_are_quarantined(
    after_period: int, after_wh: int, match: str
) -> None:
    act = berlin(2026, 8, 1)
    p = rating.block_period_of(TOU, act) + 1
    t = berlin(2026, 10, 5)
    before = rd(t, 100, (100,), tariff_id=7, period=p, period_wh=100)
    after = rd(t + 3_600, 150, (150,), tariff_id=7, period=p + after_period, period_wh=after_wh)
    _, out = feed([before, after], history((TOU, act)))
    q = out[1]
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.REGISTER_MISMATCH
    assert match in q.detail


# ----------------------------------------------------------------------------- tariff changes


def check_change(out: Outcome, m: Meter, c0: int) -> TariffChanged:
    assert isinstance(out, TariffChanged)
    assert out.meter == METER
    if out.unrated is None:
        assert sum(s.charge.total_milli for s in out.segments) == m.energy_milli - c0
    for s in out.segments:
        assert s.import_wh == sum(s.charge.energy_wh)
    assert out.total_milli == sum(s.total_milli for s in out.segments)
    return out


def test_tariff_change_tail_in_one_band_is_rated_exactly() -> None:
    m = Meter(TOU, ACT, import_wh=1_000)
    m.use(berlin(2026, 10, 6, 9), 700)
    t0, act = berlin(2026, 10, 6, 10), berlin(2026, 10, 6, 12)  # Tuesday, day band
    r0, c0 = m.read(t0), m.energy_milli
    m.use(berlin(2026, 10, 6, 10, 30), 400)
    m.activate(FLAT, act)
    m.use(berlin(2026, 10, 6, 13), 1_000)
    _, (_, out) = feed([r0, m.read(berlin(2026, 10, 6, 14))], history((TOU, ACT), (FLAT, act)))
    tc = check_change(out, m, c0)
    old, new = tc.segments
    assert tc.unrated is None
    assert (old.tariff_id, old.from_ts, old.to_ts, old.energy_wh) == (7, t0, act, (0, 400, 0))
    assert (new.tariff_id, new.from_ts, new.import_wh) == (1, act, 1_000)
    assert old.charge.total_milli == 400 * 30  # day band, first block
    assert new.charge.total_milli == 31_270


def test_tariff_change_tail_across_a_band_change_is_not_pro_rated() -> None:
    m = Meter(TOU, ACT)
    t0, act = berlin(2026, 10, 6, 16), berlin(2026, 10, 6, 18)  # peak from 17:00
    r0, c0 = m.read(t0), m.energy_milli
    m.use(berlin(2026, 10, 6, 16, 30), 100)
    m.use(berlin(2026, 10, 6, 17, 30), 200)
    m.activate(FLAT, act)
    m.use(berlin(2026, 10, 6, 18, 30), 50)
    _, (_, out) = feed([r0, m.read(berlin(2026, 10, 6, 19))], history((TOU, ACT), (FLAT, act)))
    tc = check_change(out, m, c0)
    assert tc.unrated is not None
    assert (tc.unrated.from_ts, tc.unrated.to_ts, tc.unrated.energy_wh) == (t0, act, 300)
    assert tc.unrated.tariff_ids == (7,)
    old, new = tc.segments
    assert (old.charge.total_milli, old.import_wh) == (0, 0)
    assert new.charge.total_milli == 50 * 31_270 // 1000


def test_tariff_change_with_two_activations_between_readings() -> None:
    m = Meter(TOU, ACT)
    t0, a1, a2 = berlin(2026, 10, 6, 10), berlin(2026, 10, 6, 12), berlin(2026, 10, 7, 12)
    r0, c0 = m.read(t0), m.energy_milli
    m.activate(FLAT, a1)
    m.use(berlin(2026, 10, 6, 13), 10)
    m.activate(FLAT2, a2)
    m.use(berlin(2026, 10, 7, 13), 1_000)
    tariffs = history((TOU, ACT), (FLAT, a1), (FLAT2, a2))
    _, (_, out) = feed([r0, m.read(berlin(2026, 10, 8, 14))], tariffs)
    tc = check_change(out, m, c0)
    assert tc.unrated is not None
    assert (tc.unrated.energy_wh, tc.unrated.tariff_ids) == (10, (7, 1))
    assert [(s.tariff_id, s.from_ts, s.to_ts) for s in tc.segments] == [
        (7, t0, a1),
        (1, a1, a2),
        (2, a2, berlin(2026, 10, 8, 14)),
    ]
    # standing charges still follow each tariff's days: the 7th under FLAT, the 8th FLAT2
    assert [s.standing_milli for s in tc.segments] == [0, 10_000, 20_000]


def test_tariff_change_without_tail_energy_is_exact_whatever_happened_between() -> None:
    m = Meter(TOU, ACT)
    t0, a1, a2 = berlin(2026, 10, 6, 16), berlin(2026, 10, 6, 18), berlin(2026, 10, 7, 12)
    r0, c0 = m.read(t0), m.energy_milli
    m.activate(FLAT, a1)
    m.activate(FLAT2, a2)
    m.use(berlin(2026, 10, 7, 13), 1_000)
    tariffs = history((TOU, ACT), (FLAT, a1), (FLAT2, a2))
    _, (_, out) = feed([r0, m.read(berlin(2026, 10, 8, 14))], tariffs)
    tc = check_change(out, m, c0)
    assert tc.unrated is None
    assert len(tc.segments) == 3


def test_standing_charge_of_a_day_beginning_at_the_activation_is_the_old_tariffs() -> None:
    # meter_sim.core takes the standing charge before activating a tariff due at midnight
    t0, act, t1 = berlin(2026, 10, 1, 12), berlin(2026, 10, 2), berlin(2026, 10, 3, 12)
    _, (_, out) = feed(
        [rd(t0, 0, (0,), tariff_id=7, period=rating.block_period_of(TOU, ACT)), rd(t1, 0, (0,))],
        history((TOU, ACT), (FLAT, act)),
    )
    assert isinstance(out, TariffChanged)
    assert [(s.days, s.standing_milli) for s in out.segments] == [(1, 45_000), (1, 10_000)]


def test_tariff_change_tail_rolls_the_block_period() -> None:
    start = local(NEW_YORK, 2026, 10, 1)
    m = Meter(NY, start, import_wh=9)
    m.use(local(NEW_YORK, 2026, 10, 10), 800)
    t0, act = local(NEW_YORK, 2026, 11, 2, 12), local(NEW_YORK, 2026, 11, 5)
    r0, c0 = m.read(t0), m.energy_milli
    assert r0.block_period == rating.block_period_of(NY, start)  # nothing booked in November
    m.use(local(NEW_YORK, 2026, 11, 3), 700)
    m.activate(FLAT, act)
    _, (_, out) = feed([r0, m.read(act + 60)], history((NY, start), (FLAT, act)))
    tc = check_change(out, m, c0)
    assert tc.unrated is None
    assert tc.segments[0].charge.total_milli == 700 * 100 + 200 * 20  # November's blocks


def test_tariff_change_tail_across_a_block_period_is_not_rated() -> None:
    # one band, but the tail spans a month start: which month's blocks its energy is in
    # is unknown (here all of it is November's, which an advance at t0 would put in October)
    start = local(NEW_YORK, 2026, 10, 1)
    m = Meter(NY, start)
    m.use(local(NEW_YORK, 2026, 10, 10), 800)
    t0, act = local(NEW_YORK, 2026, 10, 30), local(NEW_YORK, 2026, 11, 3)
    r0, c0 = m.read(t0), m.energy_milli
    m.use(local(NEW_YORK, 2026, 11, 2), 700)
    m.activate(FLAT, act)
    _, (_, out) = feed([r0, m.read(act + 60)], history((NY, start), (FLAT, act)))
    tc = check_change(out, m, c0)
    assert tc.unrated is not None
    assert (tc.unrated.energy_wh, tc.unrated.tariff_ids) == (700, (9,))


def test_tariff_change_tail_behind_a_clock_set_back_is_not_rated() -> None:
    start = local(NEW_YORK, 2026, 10, 1)
    nov = rating.block_period_of(NY, local(NEW_YORK, 2026, 11, 2))
    t0, act = local(NEW_YORK, 2026, 10, 20), local(NEW_YORK, 2026, 10, 25)
    r0 = rd(t0, 1_000, (1_000,), tariff_id=9, period=nov, period_wh=10)
    r1 = rd(act + 60, 1_500, (100,), tariff_id=1)
    _, (_, out) = feed([r0, r1], history((NY, start), (FLAT, act)))
    assert isinstance(out, TariffChanged)
    assert out.unrated is not None
    assert out.unrated.energy_wh == 400


def test_tariff_change_refusals() -> None:
    t0, act = berlin(2026, 10, 6, 10), berlin(2026, 10, 6, 12)
    p = rating.block_period_of(TOU, ACT)
    base = rd(t0, 1_000, (0,), tariff_id=7, period=p)
    # the new tariff's registers hold more than the total import rose
    _, out = feed([base, rd(act + 60, 1_050, (100,))], history((TOU, ACT), (FLAT, act)))
    assert isinstance(out[1], Quarantined)
    assert out[1].reason is QuarantineReason.REGISTER_MISMATCH
    assert dict(out[1].evidence) == {"import_wh": 50, "band_wh": 100}
    # the new (block) tariff's registers disagree with each other
    new_p = rating.block_period_of(TOU, act)
    bad = rd(act + 60, 1_100, (100,), tariff_id=8, period=new_p, period_wh=50)
    tou8 = dataclasses.replace(TOU, tariff_id=8)
    _, out = feed([base, bad], history((TOU, ACT), (tou8, act)))
    assert isinstance(out[1], Quarantined)
    assert out[1].reason is QuarantineReason.REGISTER_MISMATCH
    # the baseline's activation is missing from the history
    state, _ = feed([base], history((TOU, ACT)))
    with pytest.raises(TariffHistoryError, match="lacks tariff 7 activated at"):
        ingest(state, rd(act + 60, 1_000, (0,)), history((FLAT, act)))


def test_history_that_moves_an_activation_before_the_baseline_is_quarantined() -> None:
    t0, early = berlin(2026, 10, 6, 10), berlin(2026, 10, 6, 9)
    state, _ = feed([rd(t0, 0, (0,))], FLAT_HISTORY)
    rewritten = history((FLAT, ACT), (FLAT2, early))
    state, out = feed(
        [rd(t0 + 60, 5, (5,), tariff_id=2), rd(t0 + 120, 9, (9,), tariff_id=2)], rewritten, state
    )
    q = out[0]
    assert isinstance(q, Quarantined)
    assert q.reason is QuarantineReason.TARIFF_MISMATCH
    assert dict(q.evidence) == {"activation": early, "baseline_ts": t0}
    # the next reading under the same activation confirms the suspect: billing resumes
    assert isinstance(out[1], Interval)
    assert (out[1].from_ts, out[1].import_wh) == (t0 + 60, 4)


# ----------------------------------------------------------------------------- streams

POWER_W = 5_000
RULES = (
    SplitRule(RuleKind.PER_KWH, 11, 8_123),
    SplitRule(RuleKind.BASIS_POINTS, 13, 1_597),
    SplitRule(RuleKind.FIXED_PER_DAY, 15, 3_333),
    SplitRule(RuleKind.REMAINDER, 20),
)


@st.composite
def meter_streams(draw: st.DrawFn) -> tuple[Tariff, int, list[Reading], list[rating.Registers]]:
    """A simulated meter over October and November 2026 (incl. the autumn DST change).

    Energy is booked with rating.advance at random instants between random reading times;
    each gap's energy stays below POWER_W on average, so every span of gaps does too.
    """
    tariff = draw(st.sampled_from((TOU, FLAT, NY)))
    start = local(tariff.timezone, 2026, 10, 1)
    end = local(tariff.timezone, 2026, 11, 30, 12)
    times = sorted(draw(st.sets(st.integers(start, end), min_size=2, max_size=14)))
    offset = draw(st.integers(0, 10**9))
    regs = rating.start_registers(tariff, start)
    readings, snaps, prev = [], [], start
    for t in times:
        gap = t - prev
        budget = POWER_W * gap // 3600
        events = draw(
            st.lists(st.tuples(st.integers(0, max(gap - 1, 0)), st.integers(0, budget)), max_size=3)
        )
        for delay, wh in sorted(events):
            used = min(wh, budget)
            budget -= used
            regs = rating.advance(tariff, regs, prev + delay, used)
        readings.append(
            rd(
                t,
                offset + sum(regs.band_wh),
                trim(regs.band_wh),
                tariff_id=tariff.tariff_id,
                period=regs.block_period,
                period_wh=regs.block_period_wh,
            )
        )
        snaps.append(regs)
        prev = t
    return tariff, start, readings, snaps


def billed(outcomes: Iterable[Outcome]) -> tuple[int, int, tuple[int, ...], int]:
    ivs = intervals(outcomes)
    bands = tuple(map(sum, zip(*(iv.energy_wh for iv in ivs), strict=True))) if ivs else ()
    return (
        sum(iv.charge.total_milli for iv in ivs),
        sum(iv.standing_milli for iv in ivs),
        bands,
        sum(iv.import_wh for iv in ivs),
    )


def ledger(outcomes: Iterable[Outcome]) -> tuple[dict[int, int], MinorCarry]:
    """Post every interval as the ingest service would: accrual split, then minor units."""
    totals, carry, posted = SplitTotals(), MinorCarry(), dict[int, int]()
    for iv in intervals(outcomes):
        after = totals.plus(amount_milli=iv.total_milli, energy_wh=iv.import_wh, days=iv.days)
        lines, carry = to_minor(split_increment(totals, after, RULES), carry)
        for partner, minor in lines:
            posted[partner] = posted.get(partner, 0) + minor
        totals = after
    return posted, carry


@FAST
@given(stream=meter_streams(), data=st.data())
def test_corrupted_delivery_bills_exactly_what_a_clean_stream_bills(
    stream: tuple[Tariff, int, list[Reading], list[rating.Registers]], data: st.DataObject
) -> None:
    tariff, start, readings, snaps = stream
    tariffs = history((tariff, start))
    # clean: every reading once, in order
    _, clean = feed(readings, tariffs)
    assert all(isinstance(o, Interval) for o in clean[1:])
    assert all(iv.unrated_block_wh == 0 for iv in intervals(clean))
    energy, standing, bands, import_wh = billed(clean)
    first, last = readings[0], readings[-1]
    assert energy == rating.cumulative_charge_milli(
        tariff, snaps[-1]
    ) - rating.cumulative_charge_milli(tariff, snaps[0])
    assert standing == rating.standing_charges_milli(tariff, first.ts, last.ts)
    assert import_wh == last.import_wh - first.import_wh
    if len(readings) > 1:
        assert bands == tuple(
            a - b for a, b in zip(snaps[-1].band_wh, snaps[0].band_wh, strict=True)
        )
    # corrupted: the first (provisioning baseline) first, then some middle readings dropped,
    # some duplicated, the rest in any order (late, reordered, batched any which way)
    keep = data.draw(st.lists(st.booleans(), min_size=len(readings), max_size=len(readings)))
    rest = [r for r, k in zip(readings[1:-1], keep, strict=False) if k]
    dups = data.draw(st.lists(st.sampled_from(readings), max_size=4))
    delivery = [first, *data.draw(st.permutations([*rest, last, *dups]))]
    _, corrupted = feed(delivery, tariffs)
    event(f"tariff {tariff.tariff_id}")
    event(f"historical readings: {min(3, sum(isinstance(o, Historical) for o in corrupted))}+")
    periods = {r.block_period for r in readings}
    event(f"block periods crossed: {len(periods) - 1}")
    assert not any(isinstance(o, Quarantined) for o in corrupted)
    assert billed(corrupted) == (energy, standing, bands, import_wh)
    assert ledger(corrupted) == ledger(clean)


@FAST
@given(stream=meter_streams(), data=st.data())
def test_any_delivery_bills_from_the_first_reading_received(
    stream: tuple[Tariff, int, list[Reading], list[rating.Registers]], data: st.DataObject
) -> None:
    tariff, start, readings, snaps = stream
    order = data.draw(st.permutations(range(len(readings))))
    _, out = feed([readings[i] for i in order], history((tariff, start)))
    base, top = order[0], len(readings) - 1
    energy, standing, _, import_wh = billed(out)
    assert energy == rating.cumulative_charge_milli(
        tariff, snaps[top]
    ) - rating.cumulative_charge_milli(tariff, snaps[base])
    assert standing == rating.standing_charges_milli(tariff, readings[base].ts, readings[top].ts)
    assert import_wh == readings[top].import_wh - readings[base].import_wh
    # a reading is historical when a later one arrived before it
    late = sum(order[n] < max(order[:n]) for n in range(1, len(order)))
    assert sum(isinstance(o, Historical) for o in out) == late


def test_agrees_with_the_meter_simulator_to_the_unit() -> None:
    """meter_sim.core rates its own credit; ingest of its hourly readings bills the same.

    A household load from 5 October to 4 November 2026 (DST ends on the 25th), FLAT until
    a tariff activation on Thursday 22 October at 12:00, then TOU with monthly blocks
    across the month start. The readings are at half past each hour, so the old tariff's
    tail (11:30-12:00) is in one band and rated exactly.
    """
    from firmware_protocol import messages
    from meter_sim import core
    from meter_sim.profiles import HouseholdProfile

    config = core.MeterConfig(meter_id=METER, currency=EUR)
    key = messages.public_key_bytes(messages.load_private_key(bytes([1]) * 32).public_key())
    start, act = berlin(2026, 10, 5), berlin(2026, 10, 22, 12)
    state = core.new_meter(config, tariff=FLAT, trusted_keys={1: key}, now=start)
    # the tariff message's effect (a passive tariff due at ``act``), without signing one
    state = dataclasses.replace(state, passive=(TOU, act), credit_milli=10**12)
    profile = HouseholdProfile.default(BERLIN, seed=3)
    readings, credit = [], []
    for t in range(start + 1_800, berlin(2026, 11, 4), 3_600):
        state = core.advance(state, config, t, profile)
        regs = state.regs
        readings.append(
            rd(
                t,
                state.import_wh,
                trim(regs.band_wh),
                tariff_id=state.tariff.tariff_id,
                period=regs.block_period,
                period_wh=regs.block_period_wh,
            )
        )
        credit.append(state.credit_milli)
    assert state.tariff is TOU
    _, out = feed(readings, history((FLAT, start), (TOU, act)))
    changes = [o for o in out if isinstance(o, TariffChanged)]
    assert len(changes) == 1
    assert changes[0].unrated is None
    assert all(isinstance(o, Interval) for o in out[1:] if o is not changes[0])
    assert {iv.charge.block_milli > 0 for iv in intervals(out)} == {False, True}
    assert sum(iv.total_milli for iv in intervals(out)) == credit[0] - credit[-1]


# ----------------------------------------------------------------------------- values


SNAP = Snapshot(
    ts=ACT + 100,
    import_wh=10,
    tariff_id=1,
    activation=ACT,
    block_period=0,
    block_period_wh=0,
    regs=rating.Registers((10,), rating.block_period_of(FLAT, ACT), 10),
)


def test_history_lookups() -> None:
    h = history((FLAT, 100), (TOU, 200), (FLAT2, 300))
    assert h.in_force(99) is None
    assert h.in_force(100) == ActiveTariff(FLAT, 100)
    assert h.in_force(299) == ActiveTariff(TOU, 200)
    assert h.find(7, 200) == ActiveTariff(TOU, 200)
    assert h.find(7, 100) is None
    assert h.activated_in(100, 300) == (ActiveTariff(TOU, 200), ActiveTariff(FLAT2, 300))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: ActiveTariff("FLAT", 0), TariffHistoryError, "tariff must be a Tariff"),  # type: ignore[arg-type]
        (lambda: ActiveTariff(FLAT, -1), TariffHistoryError, "activation must be an int"),
        (lambda: ActiveTariff(FLAT, 2**32), TariffHistoryError, "activation must be an int"),
        (lambda: TariffHistory([ActiveTariff(FLAT, 1)]), TariffHistoryError, "must be a tuple"),  # type: ignore[arg-type]
        (lambda: TariffHistory((FLAT,)), TariffHistoryError, "must be a tuple"),  # type: ignore[arg-type]
        (
            lambda: history((FLAT, 5), (TOU, 5)),
            TariffHistoryError,
            "strictly ascending",
        ),
        (lambda: IngestPolicy(max_power_w=0), IngestError, "max_power_w"),
        (lambda: IngestPolicy(rollover_modulus=1), IngestError, "rollover_modulus"),
        (lambda: IngestPolicy(rollover_modulus=2**48 + 2), IngestError, "rollover_modulus"),
        (lambda: IngestPolicy(max_clock_ahead_s=-1), IngestError, "max_clock_ahead_s"),
        (lambda: RegisterReset(-1), IngestError, "ts must be"),
        (lambda: MeterReplaced(ts=True), IngestError, "ts must be"),
        (lambda: MeterIngestState(meter=0), IngestError, "meter must be"),
        (lambda: MeterIngestState(meter=1, not_before=-1), IngestError, "not_before"),
        (lambda: MeterIngestState(meter=1, baseline=5), IngestError, "baseline must be a Snapshot"),  # type: ignore[arg-type]
        (
            lambda: MeterIngestState(meter=1, baseline=SNAP, not_before=SNAP.ts + 1),
            IngestError,
            "older than the last reset",
        ),
        (lambda: MeterIngestState(meter=1, suspect=SNAP), IngestError, "suspect reading needs"),
        (
            lambda: MeterIngestState(meter=1, baseline=SNAP, suspect=SNAP),
            IngestError,
            "suspect reading needs",
        ),
        (lambda: dataclasses.replace(SNAP, activation=SNAP.ts + 1), IngestError, "activation"),
        (lambda: dataclasses.replace(SNAP, tariff_id=0), IngestError, "tariff_id"),
        (lambda: dataclasses.replace(SNAP, regs=(1,)), IngestError, "regs must be"),  # type: ignore[arg-type]
    ],
)
def test_values_are_validated(build: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_state_round_trips_with_baseline_and_suspect() -> None:
    state = MeterIngestState(
        meter=2**64 - 1,
        baseline=SNAP,
        suspect=dataclasses.replace(SNAP, ts=SNAP.ts + 1, import_wh=2**48),
        not_before=ACT,
    )
    d = state_to_dict(state)
    assert d["baseline"]["regs"] == {
        "band_wh": [10],
        "block_period": rating.block_period_of(FLAT, ACT),
        "block_period_wh": 10,
        "prev_block_period_wh": 0,
        "closed_block_milli": 0,
    }
    assert state_from_dict(d) == state
    assert state_from_dict(state_to_dict(MeterIngestState(meter=1))) == MeterIngestState(meter=1)


def _with(path: Sequence[str], value: object) -> dict[str, Any]:
    d = state_to_dict(MeterIngestState(meter=1, baseline=SNAP))
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "an ingest state must be an object"),
        (_with(["meter"], KeyError), "an ingest state must be an object"),
        (_with(["baseline", "extra"], 1), "a snapshot must be an object"),
        (_with(["baseline", "regs"], [10]), "regs must be an object"),
        (_with(["baseline", "regs", "band_wh"], (10,)), "band_wh must be a list"),
        (_with(["meter"], 0), "malformed ingest state: meter must be"),
        (_with(["baseline", "ts"], "1"), "malformed ingest state: ts must be"),
        (_with(["baseline", "regs", "block_period"], 5), "malformed ingest state: block_period"),
        (_with(["suspect"], {}), "a snapshot must be an object"),
    ],
)
def test_state_from_dict_refuses_malformed(data: object, match: str) -> None:
    with pytest.raises(StateFormatError, match=match):
        state_from_dict(data)
