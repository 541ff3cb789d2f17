"""Consumption ingest (pure): one meter's cumulative register readings in, billable intervals out.

A per-meter state machine (house style rule 2). :func:`ingest` takes the meter's
:class:`MeterIngestState`, one :class:`~firmware_protocol.mqtt.Reading` and the meter's
:class:`TariffHistory`, and returns the new state and one outcome:

==================  ===========================================  ==============  =========
outcome             when                                         billed          baseline
==================  ===========================================  ==============  =========
FirstReading        no baseline yet (new meter, after a reset)    nothing         = reading
Duplicate           same ``ts`` and registers as the baseline     nothing         unchanged
Historical          ``ts`` before the baseline (late, reordered)  nothing         unchanged
Interval            a later, consistent reading, same tariff      the difference  = reading
TariffChanged       a later reading under a newer activation      per tariff      = reading
Quarantined         anything implausible or inconsistent          nothing         unchanged
==================  ===========================================  ==============  =========

Billing is by **cumulative differences from the last billed reading** (the baseline):
rating the difference of two register snapshots with :func:`firmware_protocol.rating.rate_interval`
telescopes (RATING.md §4), so a stream billed in any chunks gives the same total, and a
reading that arrives after a later one adds nothing (its energy is inside an interval
already billed). Gaps need nothing special: the next interval spans them. Standing
charges of an interval are those of the local days begun in ``(from_ts, to_ts]``
(RATING.md §8), which also telescope. INGEST.md gives the reasons for each decision;
the short version:

* **Baseline.** The first reading ingested is the baseline; energy before it is not
  billed here (the meter charged its own credit; reconciliation sees it). Provisioning
  fixes the baseline by applying :class:`RegisterReset` at the commissioning instant and
  ingesting the commissioning reading first.
* **Rollover** of the total import register (OBIS 1.8.0) at
  :attr:`IngestPolicy.rollover_modulus`: a decrease whose wrapped difference equals the
  band energy is a rollover. Band registers count since the tariff's activation and stay
  below 2**48 (RATING.md §6): a decrease there is a **reset** → quarantined, unless a
  :class:`RegisterReset` or :class:`MeterReplaced` event was applied first.
* **Quarantine** (implausible jump above ``max_power_w``, a reset, registers that disagree,
  a tariff the history does not have, a conflicting duplicate): nothing is billed and the
  baseline stays. The quarantined reading is kept as the *suspect*; a next reading that is
  consistent with the baseline is billed from it (a one-off glitch costs nothing), one
  consistent only with the suspect confirms the jump: billing resumes from the suspect and
  the quarantined span is left for manual settlement. A billed reading clears the
  suspect. A reading stamped in the future (``received_at``) is quarantined too.
* **Tariff change.** The new tariff's registers start at zero at its activation, so the
  new part is exact. The old tariff's tail (last reading → activation) is rated only when
  it is certain which band and block period its energy fell in (no energy, or no band or
  period change in that span); otherwise it is reported as :class:`UnratedEnergy` — never
  pro-rated across a band boundary (DESIGN §3).
* **Block gaps.** The wire does not carry ``closed_block_milli`` (MQTT.md §3.2), so two
  readings more than one block period apart cannot rate the adder of the periods between:
  the interval bills the bands and the last period's adder, and reports the rest as
  ``unrated_block_wh`` (a lower bound, never an overcharge).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from backend.errors import BackendError
from firmware_protocol import rating
from firmware_protocol.mqtt import MAX_WH, U32_MAX, U64_MAX, Reading
from firmware_protocol.tariff import Tariff

#: Default plausibility limit: more energy than this power for the interval's duration is a
#: jump (a 100 kW three-phase connection is far above any prepaid supply).
DEFAULT_MAX_POWER_W: Final = 100_000
#: Default tolerance for a meter clock ahead of the backend's (gateways sync meter clocks).
DEFAULT_MAX_CLOCK_AHEAD_S: Final = 900
_SECONDS_PER_HOUR: Final = 3600


class IngestError(BackendError):
    """Ingest was called wrongly (our fault): wrong meter, bad history, bad state or event."""


class MeterMismatchError(IngestError):
    """A reading or event for another meter than the state's."""


class TariffHistoryError(IngestError):
    """A tariff history that is malformed or lacks the tariff of the state's baseline."""


class EventOrderError(IngestError):
    """A reset or replacement event dated before the reading already billed last."""


class StateFormatError(IngestError):
    """A persisted ingest state that does not parse."""


def _check(value: object, name: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise IngestError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ActiveTariff:
    """A tariff and the instant the meter activated it (RATING.md §7).

    ``activation`` is when the meter really switched: the message's ``activation_at``, or
    the instant it accepted the message if that was later.
    """

    tariff: Tariff
    activation: int

    def __post_init__(self) -> None:
        if not isinstance(self.tariff, Tariff):
            raise TariffHistoryError(f"tariff must be a Tariff, got {self.tariff!r}")
        try:
            _check(self.activation, "activation", 0, U32_MAX)
        except IngestError as exc:
            raise TariffHistoryError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class TariffHistory:
    """A meter's tariff activations, strictly ascending (at least back to its baseline's)."""

    entries: tuple[ActiveTariff, ...]

    def __post_init__(self) -> None:
        if type(self.entries) is not tuple or not all(
            isinstance(e, ActiveTariff) for e in self.entries
        ):
            raise TariffHistoryError("entries must be a tuple of ActiveTariff")
        times = [e.activation for e in self.entries]
        if times != sorted(set(times)):
            raise TariffHistoryError("activations must be strictly ascending")

    def in_force(self, t: int) -> ActiveTariff | None:
        """The activation in force at ``t`` (the latest at or before it), if any."""
        i = bisect.bisect_right([e.activation for e in self.entries], t)
        return self.entries[i - 1] if i else None

    def find(self, tariff_id: int, activation: int) -> ActiveTariff | None:
        """The entry of this tariff activated at this instant, if any."""
        for e in self.entries:
            if e.activation == activation and e.tariff.tariff_id == tariff_id:
                return e
        return None

    def activated_in(self, start: int, end: int) -> tuple[ActiveTariff, ...]:
        """Activations in ``(start, end]``, ascending."""
        return tuple(e for e in self.entries if start < e.activation <= end)


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestPolicy:
    """Per-meter plausibility settings (kept with the meter's configuration)."""

    #: Energy above ``max_power_w * seconds / 3600`` Wh in an interval is a jump.
    max_power_w: int = DEFAULT_MAX_POWER_W
    #: The total import register wraps to 0 at this value; ``None``: it never wraps.
    rollover_modulus: int | None = None
    #: A reading stamped later than this after it was received is quarantined.
    max_clock_ahead_s: int = DEFAULT_MAX_CLOCK_AHEAD_S

    def __post_init__(self) -> None:
        _check(self.max_power_w, "max_power_w", 1, U32_MAX)
        _check(self.max_clock_ahead_s, "max_clock_ahead_s", 0, U32_MAX)
        if self.rollover_modulus is not None:
            _check(self.rollover_modulus, "rollover_modulus", 2, MAX_WH + 1)


DEFAULT_POLICY: Final = IngestPolicy()


@dataclass(frozen=True, slots=True)
class RegisterReset:
    """Provisioning: the meter's registers were reset at ``ts``; the next reading is a baseline."""

    ts: int

    def __post_init__(self) -> None:
        _check(self.ts, "ts", 0, U32_MAX)


@dataclass(frozen=True, slots=True)
class MeterReplaced:
    """Provisioning: a new meter (same id) was fitted at ``ts``; its first reading is a baseline."""

    ts: int

    def __post_init__(self) -> None:
        _check(self.ts, "ts", 0, U32_MAX)


Event = RegisterReset | MeterReplaced


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """An accepted reading as ingest keeps it.

    ``regs`` are the rating registers for the reading's tariff: the band registers padded
    to the tariff's band count; for a block tariff the reported block period and its
    energy; for a tariff without blocks (whose block fields consumers ignore, MQTT.md
    §3.2) the activation's period and the band total. ``prev_block_period_wh`` and
    ``closed_block_milli`` are not on the wire and stay 0 (:func:`_rate` derives the one
    it needs). ``block_period`` and ``block_period_wh`` are the reported values, kept to
    recognise a duplicate.
    """

    ts: int
    import_wh: int
    tariff_id: int
    activation: int
    block_period: int
    block_period_wh: int
    regs: rating.Registers

    def __post_init__(self) -> None:
        _check(self.ts, "ts", 0, U32_MAX)
        _check(self.import_wh, "import_wh", 0, MAX_WH)
        _check(self.tariff_id, "tariff_id", 1, U32_MAX)
        _check(self.activation, "activation", 0, self.ts)
        _check(self.block_period, "block_period", 0, U32_MAX)
        _check(self.block_period_wh, "block_period_wh", 0, MAX_WH)
        if not isinstance(self.regs, rating.Registers):
            raise IngestError(f"regs must be rating.Registers, got {self.regs!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterIngestState:
    """What ingest remembers of one meter between readings (persisted by the caller).

    ``baseline``: the last billed (or first) reading; ``suspect``: the last quarantined
    reading, later than the baseline; ``not_before``: the instant of the last reset or
    replacement — readings before it belong to the old registers.
    """

    meter: int
    baseline: Snapshot | None = None
    suspect: Snapshot | None = None
    not_before: int = 0

    def __post_init__(self) -> None:
        _check(self.meter, "meter", 1, U64_MAX)
        _check(self.not_before, "not_before", 0, U32_MAX)
        for name in ("baseline", "suspect"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Snapshot):
                raise IngestError(f"{name} must be a Snapshot or None, got {value!r}")
        if self.baseline is not None and self.baseline.ts < self.not_before:
            raise IngestError("the baseline is older than the last reset")
        if self.suspect is not None and (
            self.baseline is None or self.suspect.ts <= self.baseline.ts
        ):
            raise IngestError("a suspect reading needs an older baseline")


# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True, kw_only=True)
class Interval:
    """Consumption to bill between two readings under one tariff activation.

    ``charge``: the energy charge (per band Wh and milli, block adder); ``days`` and
    ``standing_milli``: the local days begun in ``(from_ts, to_ts]`` and their standing
    charges; ``import_wh``: the energy rated (``sum(charge.energy_wh)``);
    ``unrated_block_wh``: energy whose block adder could not be rated (module docstring);
    ``rolled_over``: the total import register wrapped in this interval.
    """

    meter: int
    tariff_id: int
    activation: int
    from_ts: int
    to_ts: int
    import_wh: int
    charge: rating.Charge
    days: int
    standing_milli: int
    unrated_block_wh: int = 0
    rolled_over: bool = False

    @property
    def energy_wh(self) -> tuple[int, ...]:
        """Wh per band."""
        return self.charge.energy_wh

    @property
    def total_milli(self) -> int:
        """Energy and standing charges together."""
        return self.charge.total_milli + self.standing_milli


@dataclass(frozen=True, slots=True, kw_only=True)
class UnratedEnergy:
    """Energy of a tariff change's tail that could not be rated exactly (manual settlement).

    ``energy_wh`` was consumed in ``[from_ts, to_ts)`` under ``tariff_ids`` (the old tariff
    and any activated in between), in bands and periods the readings do not tell.
    """

    meter: int
    from_ts: int
    to_ts: int
    energy_wh: int
    tariff_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TariffChanged:
    """A reading under a newer tariff activation than the baseline's.

    ``segments``: one :class:`Interval` per tariff in force over ``(from, to]``, in time
    order; the last is the new tariff's. A segment whose energy is unknown has a zero
    charge and its energy is in ``unrated``; its standing charges are still billed.
    """

    meter: int
    segments: tuple[Interval, ...]
    unrated: UnratedEnergy | None = None

    @property
    def total_milli(self) -> int:
        """All segments' energy and standing charges."""
        return sum(s.total_milli for s in self.segments)


@dataclass(frozen=True, slots=True)
class FirstReading:
    """The meter's baseline: nothing billed."""

    meter: int
    ts: int
    tariff_id: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The same reading again: nothing to do."""

    meter: int
    ts: int


@dataclass(frozen=True, slots=True)
class Historical:
    """A reading older than the baseline: kept for the consumption profile, not billed."""

    meter: int
    ts: int


class QuarantineReason(enum.StrEnum):
    """Why a reading was not billed (an alert for an operator)."""

    IMPLAUSIBLE_JUMP = "IMPLAUSIBLE_JUMP"  #: more energy than max_power_w allows
    REGISTER_RESET = "REGISTER_RESET"  #: a register went backwards (no wrap, no event)
    REGISTER_MISMATCH = "REGISTER_MISMATCH"  #: registers disagree with each other
    BAD_REGISTERS = "BAD_REGISTERS"  #: registers that do not fit the tariff
    TARIFF_MISMATCH = "TARIFF_MISMATCH"  #: not the tariff the history has in force
    CONFLICTING_DUPLICATE = "CONFLICTING_DUPLICATE"  #: same ts, other registers
    FUTURE_TIMESTAMP = "FUTURE_TIMESTAMP"  #: stamped after it was received


@dataclass(frozen=True, slots=True, kw_only=True)
class Quarantined:
    """A reading not billed, with the evidence an operator needs."""

    meter: int
    ts: int
    reason: QuarantineReason
    detail: str
    evidence: tuple[tuple[str, int], ...] = ()


Outcome = FirstReading | Duplicate | Historical | Interval | TariffChanged | Quarantined


# ----------------------------------------------------------------------------- rating


@dataclass(frozen=True, slots=True)
class _Reject:
    reason: QuarantineReason
    detail: str
    evidence: tuple[tuple[str, int], ...] = ()


def _trim(bands: Sequence[int]) -> tuple[int, ...]:
    end = len(bands)
    while end > 1 and bands[end - 1] == 0:
        end -= 1
    return tuple(bands[:end])


def _snapshot(reading: Reading, at: ActiveTariff) -> Snapshot | _Reject:
    """The reading's registers for its tariff, or why they cannot be."""
    tariff = at.tariff
    n = len(tariff.bands)
    reported = reading.band_wh
    if any(reported[n:]):
        return _Reject(
            QuarantineReason.BAD_REGISTERS,
            f"energy in band registers the tariff ({n} bands) does not have",
            tuple((f"band_wh[{i}]", wh) for i, wh in enumerate(reported) if i >= n and wh),
        )
    bands = tuple(reported[:n]) + (0,) * (n - len(reported))
    first_period = rating.block_period_of(tariff, at.activation)
    evidence = (
        ("block_period", reading.block_period),
        ("block_period_wh", reading.block_period_wh),
    )
    if tariff.blocks and (
        reading.block_period < first_period or reading.block_period_wh > sum(bands)
    ):
        return _Reject(
            QuarantineReason.BAD_REGISTERS,
            f"block period {reading.block_period} with {reading.block_period_wh} Wh does not "
            f"fit an activation in period {first_period} with {sum(bands)} Wh since",
            evidence,
        )
    try:
        if tariff.blocks:
            regs = rating.Registers(bands, reading.block_period, reading.block_period_wh)
        else:
            regs = rating.Registers(bands, first_period, sum(bands))
    except rating.RegisterError as exc:
        return _Reject(QuarantineReason.BAD_REGISTERS, str(exc), evidence)
    return Snapshot(
        ts=reading.ts,
        import_wh=reading.import_wh,
        tariff_id=reading.tariff_id,
        activation=at.activation,
        block_period=reading.block_period,
        block_period_wh=reading.block_period_wh,
        regs=regs,
    )


def _same(snap: Snapshot, reading: Reading) -> bool:
    return (
        snap.import_wh == reading.import_wh
        and snap.tariff_id == reading.tariff_id
        and _trim(snap.regs.band_wh) == _trim(reading.band_wh)
        and snap.block_period == reading.block_period
        and snap.block_period_wh == reading.block_period_wh
    )


def _rate(
    tariff: Tariff, before: rating.Registers, after: rating.Registers
) -> tuple[rating.Charge, int]:
    """The charge between two snapshots and the Wh whose block adder stays unrated.

    Raises :class:`rating.RegisterError` for registers that disagree.
    """
    total = sum(after.band_wh) - sum(before.band_wh)
    if not tariff.blocks:
        # No adder: rate both in one period, so a month boundary is no gap.
        p = before.block_period
        b = rating.Registers(before.band_wh, p, 0)
        return rating.rate_interval(tariff, b, rating.Registers(after.band_wh, p, total)), 0
    step = after.block_period - before.block_period
    if step == 1:
        # The wire has no prev_block_period_wh, but one period apart it follows from the
        # band energy: closing - before.wh + after.wh = total (RATING.md §6).
        closing = total + before.block_period_wh - after.block_period_wh
        after = dataclasses.replace(after, prev_block_period_wh=closing)
    elif step >= 2:
        # rate_interval would raise RatingGapError; its fallback needs the meter's
        # closed_block_milli, which the wire does not carry. Bill the bands and the last
        # period's adder (both exact) and report the energy of the periods before.
        if after.block_period_wh > total:
            raise rating.RegisterError("block_period_wh exceeds the interval's energy")
        p = after.block_period
        bands = rating.rate_interval(
            tariff,
            rating.Registers(before.band_wh, p, 0),
            rating.Registers(after.band_wh, p, total),
        )
        block_milli = rating.block_charge_milli(tariff, after.block_period_wh)
        charge = rating.Charge(
            energy_wh=bands.energy_wh,
            energy_milli=bands.energy_milli,
            block_wh=after.block_period_wh,
            block_milli=block_milli,
            total_milli=sum(bands.energy_milli) + block_milli,
        )
        return charge, total - after.block_period_wh
    return rating.rate_interval(tariff, before, after), 0


def _import_delta(old: int, new: int, modulus: int | None) -> tuple[int, bool] | None:
    """Energy on the total import register, and whether it wrapped; None if it went back."""
    if new >= old:
        return new - old, False
    if modulus is not None and old < modulus and new < modulus:
        return new + modulus - old, True
    return None


def _interval(
    meter: int,
    at: ActiveTariff,
    span: tuple[int, int],
    charge: rating.Charge,
    *,
    unrated_block_wh: int = 0,
    rolled_over: bool = False,
) -> Interval:
    start, end = span
    days = len(rating.local_midnights(at.tariff, start, end))
    return Interval(
        meter=meter,
        tariff_id=at.tariff.tariff_id,
        activation=at.activation,
        from_ts=start,
        to_ts=end,
        import_wh=sum(charge.energy_wh),
        charge=charge,
        days=days,
        standing_milli=days * at.tariff.standing_charge_milli_per_day,
        unrated_block_wh=unrated_block_wh,
        rolled_over=rolled_over,
    )


def _zero(tariff: Tariff) -> rating.Charge:
    n = len(tariff.bands)
    return rating.Charge((0,) * n, (0,) * n, 0, 0, 0)


def _tail_is_certain(old: Tariff, t: int, activation: int) -> bool:
    """Whether energy booked in ``[t, activation)`` all falls in one band and block period.

    The meter books energy at the instant it was consumed (RATING.md §6), so a span with
    no band change (``next_band_change``, which includes day starts) and no period change
    has one band and one period, and a single :func:`rating.advance` reproduces it.
    """
    one_band = len(old.bands) == 1 or rating.next_band_change(old, t) >= activation
    one_period = not old.blocks or rating.block_period_of(old, t) == rating.block_period_of(
        old, activation - 1
    )
    return one_band and one_period


def _assess(
    *,
    meter: int,
    before: Snapshot,
    after: Snapshot,
    at: ActiveTariff,
    tariffs: TariffHistory,
    policy: IngestPolicy,
) -> Interval | TariffChanged | _Reject:
    """Bill ``before → after`` (``after`` is under ``at``) or say why not."""
    seconds = after.ts - before.ts
    delta = _import_delta(before.import_wh, after.import_wh, policy.rollover_modulus)
    if delta is None:
        return _Reject(
            QuarantineReason.REGISTER_RESET,
            "the total import register went backwards and is no rollover",
            (("import_wh_before", before.import_wh), ("import_wh_after", after.import_wh)),
        )
    import_wh, rolled = delta
    same = (before.tariff_id, before.activation) == (after.tariff_id, after.activation)
    if same:
        for i, (b, a) in enumerate(zip(before.regs.band_wh, after.regs.band_wh, strict=True)):
            if a < b:
                return _Reject(
                    QuarantineReason.REGISTER_RESET,
                    f"band register {i} went backwards",
                    ((f"band_wh[{i}]_before", b), (f"band_wh[{i}]_after", a)),
                )
    if import_wh * _SECONDS_PER_HOUR > policy.max_power_w * seconds:
        return _Reject(
            QuarantineReason.IMPLAUSIBLE_JUMP,
            f"{import_wh} Wh in {seconds} s is more than {policy.max_power_w} W",
            (("import_wh", import_wh), ("seconds", seconds), ("max_power_w", policy.max_power_w)),
        )
    if same:
        band_wh = sum(after.regs.band_wh) - sum(before.regs.band_wh)
        if band_wh != import_wh:
            return _mismatch(import_wh, band_wh)
        try:
            charge, unrated = _rate(at.tariff, before.regs, after.regs)
        except rating.RegisterError as exc:
            return _Reject(QuarantineReason.REGISTER_MISMATCH, str(exc))
        return _interval(
            meter, at, (before.ts, after.ts), charge, unrated_block_wh=unrated, rolled_over=rolled
        )
    return _tariff_change(
        meter=meter,
        before=before,
        after=after,
        at=at,
        import_wh=import_wh,
        tariffs=tariffs,
        rolled=rolled,
    )


def _mismatch(import_wh: int, band_wh: int) -> _Reject:
    return _Reject(
        QuarantineReason.REGISTER_MISMATCH,
        f"total import rose {import_wh} Wh but the band registers {band_wh} Wh",
        (("import_wh", import_wh), ("band_wh", band_wh)),
    )


def _tariff_change(
    *,
    meter: int,
    before: Snapshot,
    after: Snapshot,
    at: ActiveTariff,
    import_wh: int,
    tariffs: TariffHistory,
    rolled: bool,
) -> TariffChanged | _Reject:
    """``before`` and ``after`` are under different activations (RATING.md §7)."""
    old = tariffs.find(before.tariff_id, before.activation)
    if old is None:
        raise TariffHistoryError(
            f"meter {meter}: the history lacks tariff {before.tariff_id} activated at "
            f"{before.activation}, the baseline's"
        )
    if at.activation <= before.ts:
        return _Reject(
            QuarantineReason.TARIFF_MISMATCH,
            "the history activates the reading's tariff before the baseline reading",
            (("activation", at.activation), ("baseline_ts", before.ts)),
        )
    chain = tariffs.activated_in(before.ts, after.ts)  # ends with ``at``
    new_wh = sum(after.regs.band_wh)
    tail_wh = import_wh - new_wh
    if tail_wh < 0:
        return _mismatch(import_wh, new_wh)
    try:
        start = rating.start_registers(at.tariff, at.activation)
        charge, unrated_block = _rate(at.tariff, start, after.regs)
    except rating.RegisterError as exc:
        return _Reject(QuarantineReason.REGISTER_MISMATCH, str(exc))
    tail: rating.Charge | None = _zero(old.tariff) if tail_wh == 0 else None
    if tail is None and len(chain) == 1 and _tail_is_certain(old.tariff, before.ts, at.activation):
        try:
            final = rating.advance(old.tariff, before.regs, before.ts, tail_wh)
            tail, _ = _rate(old.tariff, before.regs, final)
        except rating.RegisterError:
            tail = None  # e.g. a clock set back behind the registers' period: not certain
    # Each tariff's span is (its start, the next activation]: a day that begins at the
    # activation instant is charged by the old tariff, as the meter does (meter_sim.core
    # _boundaries takes the standing charge before activating).
    spans = (old, *chain)
    starts = (before.ts, *(e.activation for e in chain))
    ends = (*(e.activation for e in chain), after.ts)
    segments = []
    for i, (entry, s, e) in enumerate(zip(spans, starts, ends, strict=True)):
        if i == len(spans) - 1:
            seg = _interval(
                meter, entry, (s, e), charge, unrated_block_wh=unrated_block, rolled_over=rolled
            )
        elif i == 0 and tail is not None:
            seg = _interval(meter, entry, (s, e), tail)
        else:
            seg = _interval(meter, entry, (s, e), _zero(entry.tariff))
        segments.append(seg)
    unrated = None
    if tail is None:
        unrated = UnratedEnergy(
            meter=meter,
            from_ts=before.ts,
            to_ts=at.activation,
            energy_wh=tail_wh,
            tariff_ids=tuple(e.tariff.tariff_id for e in spans[:-1]),
        )
    return TariffChanged(meter=meter, segments=tuple(segments), unrated=unrated)


# ----------------------------------------------------------------------------- transitions


def ingest(
    state: MeterIngestState,
    reading: Reading,
    tariffs: TariffHistory,
    *,
    policy: IngestPolicy = DEFAULT_POLICY,
    received_at: int | None = None,
) -> tuple[MeterIngestState, Outcome]:
    """One reading through the meter's state machine: the new state and what to do.

    ``tariffs`` is the meter's activation history, at least from the baseline's
    activation on. ``received_at`` is when the backend received the reading (the
    service's clock); pass it: a reading stamped far in the future would otherwise become
    the baseline and turn every later reading historical. Nothing here raises for bad
    meter data (that is quarantined); only calls that break the contract raise
    :class:`IngestError`.
    """
    if not isinstance(state, MeterIngestState) or not isinstance(reading, Reading):
        raise IngestError("ingest takes a MeterIngestState and a Reading")
    if not isinstance(tariffs, TariffHistory) or not isinstance(policy, IngestPolicy):
        raise IngestError("ingest takes a TariffHistory and an IngestPolicy")
    meter = state.meter
    if reading.meter != meter:
        raise MeterMismatchError(f"a reading of meter {reading.meter} for meter {meter}'s state")
    if received_at is not None and reading.ts > (
        _check(received_at, "received_at", 0, U32_MAX) + policy.max_clock_ahead_s
    ):
        return state, _quarantined(
            meter,
            reading.ts,
            _Reject(
                QuarantineReason.FUTURE_TIMESTAMP,
                f"stamped {reading.ts - received_at} s after it was received",
                (("ts", reading.ts), ("received_at", received_at)),
            ),
        )
    base = state.baseline
    if reading.ts < (base.ts if base is not None else state.not_before):
        return state, Historical(meter, reading.ts)
    if base is not None and reading.ts == base.ts:
        if _same(base, reading):
            return state, Duplicate(meter, reading.ts)
        return state, _quarantined(
            meter,
            reading.ts,
            _Reject(
                QuarantineReason.CONFLICTING_DUPLICATE,
                "a reading with the baseline's timestamp and other registers",
                (("import_wh_before", base.import_wh), ("import_wh_after", reading.import_wh)),
            ),
        )
    suspect = state.suspect
    if suspect is not None and reading.ts == suspect.ts and _same(suspect, reading):
        return state, Duplicate(meter, reading.ts)
    at = tariffs.in_force(reading.ts)
    if at is None or at.tariff.tariff_id != reading.tariff_id:
        expected = 0 if at is None else at.tariff.tariff_id
        return state, _quarantined(
            meter,
            reading.ts,
            _Reject(
                QuarantineReason.TARIFF_MISMATCH,
                f"the meter reports tariff {reading.tariff_id}, the history has {expected}",
                (("tariff_id", reading.tariff_id), ("expected_tariff_id", expected)),
            ),
        )
    snap = _snapshot(reading, at)
    if isinstance(snap, _Reject):
        return state, _quarantined(meter, reading.ts, snap)
    if base is None:
        return dataclasses.replace(state, baseline=snap), FirstReading(
            meter, reading.ts, reading.tariff_id
        )
    result = _assess(meter=meter, before=base, after=snap, at=at, tariffs=tariffs, policy=policy)
    if not isinstance(result, _Reject):
        return MeterIngestState(meter=meter, baseline=snap, not_before=state.not_before), result
    if suspect is not None and suspect.ts < snap.ts:
        confirmed = _assess(
            meter=meter, before=suspect, after=snap, at=at, tariffs=tariffs, policy=policy
        )
        if not isinstance(confirmed, _Reject):
            # The jump persists: bill from the suspect on; base → suspect stays quarantined.
            return (
                MeterIngestState(meter=meter, baseline=snap, not_before=state.not_before),
                confirmed,
            )
    return dataclasses.replace(state, suspect=snap), _quarantined(meter, reading.ts, result)


def _quarantined(meter: int, ts: int, why: _Reject) -> Quarantined:
    return Quarantined(
        meter=meter, ts=ts, reason=why.reason, detail=why.detail, evidence=why.evidence
    )


def apply_event(state: MeterIngestState, event: Event) -> MeterIngestState:
    """Apply a provisioning event: forget the baseline; readings before ``event.ts`` are old.

    Idempotent: an event not later than the last one applied changes nothing. An event
    dated before the baseline reading (already billed across it) raises
    :class:`EventOrderError`: settle that span by hand.
    """
    if not isinstance(state, MeterIngestState) or not isinstance(
        event, RegisterReset | MeterReplaced
    ):
        raise IngestError("apply_event takes a MeterIngestState and a RegisterReset/MeterReplaced")
    if event.ts <= state.not_before:
        return state
    if state.baseline is not None and event.ts < state.baseline.ts:
        raise EventOrderError(
            f"meter {state.meter}: event at {event.ts} is before the baseline reading at "
            f"{state.baseline.ts}"
        )
    return MeterIngestState(meter=state.meter, not_before=event.ts)


# ----------------------------------------------------------------------------- persistence

_SNAPSHOT_KEYS: Final = frozenset(
    ("ts", "import_wh", "tariff_id", "activation", "block_period", "block_period_wh", "regs")
)
_REGS_KEYS: Final = frozenset(
    ("band_wh", "block_period", "block_period_wh", "prev_block_period_wh", "closed_block_milli")
)
_STATE_KEYS: Final = frozenset(("meter", "baseline", "suspect", "not_before"))


def _snapshot_dict(s: Snapshot | None) -> dict[str, Any] | None:
    if s is None:
        return None
    r = s.regs
    return {
        "ts": s.ts,
        "import_wh": s.import_wh,
        "tariff_id": s.tariff_id,
        "activation": s.activation,
        "block_period": s.block_period,
        "block_period_wh": s.block_period_wh,
        "regs": {
            "band_wh": list(r.band_wh),
            "block_period": r.block_period,
            "block_period_wh": r.block_period_wh,
            "prev_block_period_wh": r.prev_block_period_wh,
            "closed_block_milli": r.closed_block_milli,
        },
    }


def state_to_dict(state: MeterIngestState) -> dict[str, Any]:
    """A JSON-ready dict of the state (ints, lists, None)."""
    return {
        "meter": state.meter,
        "not_before": state.not_before,
        "baseline": _snapshot_dict(state.baseline),
        "suspect": _snapshot_dict(state.suspect),
    }


def _object(value: object, keys: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise StateFormatError(f"{what} must be an object with keys {sorted(keys)}")
    return value


def _snapshot_from(value: object) -> Snapshot | None:
    if value is None:
        return None
    d = _object(value, _SNAPSHOT_KEYS, "a snapshot")
    r = _object(d["regs"], _REGS_KEYS, "regs")
    if not isinstance(r["band_wh"], list):
        raise StateFormatError("regs.band_wh must be a list")
    fields = {k: v for k, v in d.items() if k != "regs"}
    return Snapshot(
        regs=rating.Registers(
            tuple(r["band_wh"]),
            r["block_period"],
            r["block_period_wh"],
            r["prev_block_period_wh"],
            r["closed_block_milli"],
        ),
        **fields,
    )


def state_from_dict(data: object) -> MeterIngestState:
    """Inverse of :func:`state_to_dict`; anything malformed raises :class:`StateFormatError`."""
    d = _object(data, _STATE_KEYS, "an ingest state")
    try:
        return MeterIngestState(
            meter=d["meter"],
            not_before=d["not_before"],
            baseline=_snapshot_from(d["baseline"]),
            suspect=_snapshot_from(d["suspect"]),
        )
    except StateFormatError:
        raise
    except (IngestError, rating.RegisterError) as exc:
        raise StateFormatError(f"malformed ingest state: {exc}") from exc
