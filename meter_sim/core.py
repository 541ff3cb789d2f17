"""The prepaid meter as a pure state machine: time, energy, credit, relay, tokens, events.

A :class:`MeterState` is an immutable value; every operation takes a state (plus the
meter's :class:`MeterConfig` and, for time, a load profile) and returns a new state.
Nothing here reads a clock, a file or a socket: the shells (Modbus server, fleet, CLI)
feed it time and persist what it returns. That is what makes power loss safe: the
shell persists the new state atomically before it answers, so a crash leaves either
the old state (token not applied, the gateway retries) or the new one (the retry is
reported as already applied) — never half of each.

Energy: while the relay is closed the load draws ``profile.power_w(t)`` watts, sampled
at the start of each meter minute (Unix time aligned) and held for that minute; the meter
integrates in whole seconds (W·s, carried) and books whole Wh to the tariff band in force
at every *boundary*: each minute, band change, local midnight and tariff activation. At a
boundary it also takes a due standing charge, activates a due tariff and re-evaluates its
credit state. Boundaries are absolute instants, never "wherever the caller stopped", so
advancing in one call or in many gives the same state to the bit (the shell may tick as
often as it likes). Credit is rated with :mod:`firmware_protocol.rating`, exactly as the
backend rates it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import zoneinfo
from dataclasses import dataclass, field
from typing import Final, Protocol

from firmware_protocol import messages, rating
from firmware_protocol.errors import ProtocolError, UnitError
from firmware_protocol.messages import CreditToken, KeyAction, KeyChange, TariffMessage
from firmware_protocol.modbus_map import (
    EMPTY_EVENT,
    EVENT_LOG_LEN,
    CreditState,
    EventCode,
    EventRecord,
    RelayCause,
    RelayCommand,
    RelayState,
    StatusFlag,
)
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus, status_for_error
from firmware_protocol.tariff import Tariff
from firmware_protocol.units import MILLI_PER_MINOR, Currency
from meter_sim.states import RECONNECT, Cause, Conditions, Reconnect, ec_may_activate, settle

#: The meter books energy, samples the load and settles at least this often (seconds of
#: meter time, on the Unix-minute grid).
MAX_STEP_S: Final = 60
WS_PER_WH: Final = 3600
MAX_TRUSTED_KEYS: Final = 4
#: Credit a meter can hold; a token that would exceed it is refused.
MAX_CREDIT_MILLI: Final = 2**53
FIRMWARE: Final = (1, 0, 0)


class LoadProfile(Protocol):
    """Instantaneous demand of the premises behind the meter (pure function of time)."""

    def power_w(self, t: int) -> int: ...


@dataclass(frozen=True, slots=True)
class FriendlyHours:
    """When the meter never disconnects: a nightly window, weekends, holidays (local time).

    The night window runs from ``night_start_minute`` to ``night_end_minute`` of the local
    day and may wrap midnight (e.g. 18:00-08:00 is 1080-480); equal values mean none.
    """

    timezone: str = "UTC"
    night_start_minute: int = 0
    night_end_minute: int = 0
    weekends: bool = False
    holidays: tuple[dt.date, ...] = ()

    def __post_init__(self) -> None:
        for name in ("night_start_minute", "night_end_minute"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 1440:
                raise UnitError(f"friendly hours: {name} must be 0..1439, got {value!r}")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise UnitError(f"friendly hours: unknown time zone {self.timezone!r}") from exc

    def active(self, t: int) -> bool:
        """True if ``t`` falls in a friendly period."""
        local = dt.datetime.fromtimestamp(t, zoneinfo.ZoneInfo(self.timezone))
        if self.weekends and local.weekday() >= 5:
            return True
        if local.date() in self.holidays:
            return True
        start, end, minute = (
            self.night_start_minute,
            self.night_end_minute,
            local.hour * 60 + local.minute,
        )
        if start == end:
            return False
        if start < end:
            return start <= minute < end
        return minute >= start or minute < end

    def next_change(self, t: int) -> int | None:
        """The first instant after ``t`` at which :meth:`active` may change; None if never.

        Candidates are the window's start and end minutes and local midnight (weekends and
        holidays change there), today and tomorrow; a candidate in a DST gap maps, like
        everywhere in voltcredit, to the first instant after the gap.
        """
        minutes = set()
        if self.night_start_minute != self.night_end_minute:
            minutes |= {self.night_start_minute, self.night_end_minute}
        if self.weekends or self.holidays:
            minutes.add(0)
        if not minutes:
            return None
        zone = zoneinfo.ZoneInfo(self.timezone)
        today = dt.datetime.fromtimestamp(t, zone).date()
        best: int | None = None
        for day in (today, today + dt.timedelta(days=1), today + dt.timedelta(days=2)):
            for minute in minutes:
                naive = dt.datetime.combine(day, dt.time(minute // 60, minute % 60))
                instant = int(naive.replace(tzinfo=zone).timestamp())
                if instant > t and (best is None or instant < best):
                    best = instant
        return best


@dataclass(frozen=True, slots=True)
class MeterConfig:
    """What a meter is configured with at manufacture/installation (not changed by tokens)."""

    meter_id: int
    currency: Currency
    low_credit_milli: int = 500_000
    emergency_limit_milli: int = 1_000_000
    auto_reconnect: bool = True
    friendly: FriendlyHours = field(default_factory=FriendlyHours)
    nominal_voltage_dv: int = 2300
    max_skew_s: int = messages.DEFAULT_MAX_SKEW_S

    def __post_init__(self) -> None:
        if type(self.meter_id) is not int or not 1 <= self.meter_id < 2**64:
            raise UnitError(f"meter_id must be 1..2**64-1, got {self.meter_id!r}")
        for name in ("low_credit_milli", "emergency_limit_milli"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 2**32 - 1:
                raise UnitError(f"{name} must be 0..2**32-1 milli, got {value!r}")


@dataclass(frozen=True, slots=True)
class MeterState:
    """Everything a meter remembers across power loss (persisted as one atomic write)."""

    now: int
    tariff: Tariff
    tariff_activated_at: int
    regs: rating.Registers
    trusted_keys: tuple[tuple[int, bytes], ...]
    credit_milli: int = 0
    charged_milli: int = 0  #: cumulative_charge_milli(tariff, regs) already taken from credit
    import_wh: int = 0
    carry_ws: int = 0  #: energy below one Wh not yet booked
    next_midnight: int = 0
    passive: tuple[Tariff, int] | None = None
    ec_active: bool = False
    credit_state: CreditState = CreditState.IN_CREDIT
    relay: RelayState = RelayState.CLOSED
    armed: bool = False
    remote_disconnect: bool = False
    window: ReplayWindow = field(default_factory=ReplayWindow)
    token_seq: int = 0
    token_status: TokenStatus = TokenStatus.NONE
    last_message_id: int = 0
    last_credit_token_id: int = 0
    events: tuple[EventRecord, ...] = ()
    event_count: int = 0
    power_w: int = 0
    friendly_now: bool = False
    clock_set: bool = True

    @property
    def emergency_used_milli(self) -> int:
        """How much emergency credit is in use (0 unless EC is active and credit < 0)."""
        return max(0, -self.credit_milli) if self.ec_active else 0

    @property
    def flags(self) -> StatusFlag:
        """The status-flag register."""
        f = StatusFlag(0)
        if self.credit_state is not CreditState.IN_CREDIT:
            f |= StatusFlag.LOW_CREDIT
        if self.credit_state is CreditState.EMERGENCY_IN_USE:
            f |= StatusFlag.EMERGENCY_IN_USE
        if self.friendly_now:
            f |= StatusFlag.FRIENDLY_HOURS
        if self.armed:
            f |= StatusFlag.RELAY_ARMED
        if not self.clock_set:
            f |= StatusFlag.CLOCK_NOT_SET
        if self.passive is not None:
            f |= StatusFlag.TARIFF_PENDING
        if self.remote_disconnect:
            f |= StatusFlag.REMOTE_DISCONNECT
        return f

    def ec_available(self, config: MeterConfig) -> bool:
        """True when emergency credit may be taken now."""
        return ec_may_activate(
            self.credit_state, ec_active=self.ec_active, ec_limit_milli=config.emergency_limit_milli
        )


# --------------------------------------------------------------------------- construction


def new_meter(
    config: MeterConfig,
    *,
    tariff: Tariff,
    trusted_keys: dict[int, bytes],
    now: int,
    credit_milli: int = 0,
) -> MeterState:
    """A meter fresh from the factory: tariff active from ``now``, keys installed."""
    if tariff.currency != config.currency:
        raise UnitError(
            f"tariff currency {tariff.currency.code} is not the meter's {config.currency.code}"
        )
    if not 1 <= len(trusted_keys) <= MAX_TRUSTED_KEYS:
        raise UnitError(f"a meter trusts 1..{MAX_TRUSTED_KEYS} keys")
    for raw in trusted_keys.values():
        messages.load_public_key(raw)
    state = MeterState(
        now=now,
        tariff=tariff,
        tariff_activated_at=now,
        regs=rating.start_registers(tariff, now),
        trusted_keys=tuple(sorted(trusted_keys.items())),
        credit_milli=credit_milli,
        next_midnight=_next_midnight(tariff, now),
        friendly_now=config.friendly.active(now),
    )
    return _settle(state, config, Cause.CREDIT)


def _next_midnight(tariff: Tariff, t: int) -> int:
    return rating.local_midnights(tariff, t, t + 3 * 86_400)[0]


def _log(state: MeterState, t: int, code: EventCode, arg: int) -> MeterState:
    record = EventRecord(min(max(t, 0), 2**32 - 1), code, min(max(int(arg), 0), 2**32 - 1))
    return dataclasses.replace(
        state,
        events=(record, *state.events)[:EVENT_LOG_LEN],
        event_count=(state.event_count + 1) % 2**32,
    )


def event_log(state: MeterState) -> tuple[EventRecord, ...]:
    """The last events, newest first, padded to EVENT_LOG_LEN with empty slots."""
    return state.events + (EMPTY_EVENT,) * (EVENT_LOG_LEN - len(state.events))


# --------------------------------------------------------------------------- settling


def _set_relay(state: MeterState, relay: RelayState, cause: RelayCause) -> MeterState:
    if state.relay is relay:
        return state
    code = EventCode.RELAY_CLOSED if relay is RelayState.CLOSED else EventCode.RELAY_OPENED
    return _log(dataclasses.replace(state, relay=relay), state.now, code, cause)


def _settle(state: MeterState, config: MeterConfig, cause: Cause) -> MeterState:
    """Re-evaluate the credit state and move the relay per the table."""
    rule = settle(
        Conditions(
            credit_milli=state.credit_milli,
            low_threshold_milli=config.low_credit_milli,
            ec_active=state.ec_active,
            ec_limit_milli=config.emergency_limit_milli,
            friendly=state.friendly_now,
            supplying=state.relay is RelayState.CLOSED,
            disconnected=state.credit_state is CreditState.DISCONNECTED,
        )
    )
    # Settling runs every meter minute; copying a 27-field state when nothing changed was
    # half the cost of advance().
    if rule.state is not state.credit_state:
        state = dataclasses.replace(state, credit_state=rule.state)
    if not rule.allowed:
        if state.armed:
            state = dataclasses.replace(state, armed=False)
        return _set_relay(state, RelayState.OPEN, RelayCause.CREDIT)
    if state.relay is RelayState.CLOSED or state.remote_disconnect:
        return state
    if state.armed and cause is not Cause.BUTTON:
        return state
    if RECONNECT[(cause, config.auto_reconnect)] is Reconnect.ARM:
        return dataclasses.replace(state, armed=True)
    relay_cause = {
        Cause.BUTTON: RelayCause.BUTTON,
        Cause.EMERGENCY: RelayCause.BUTTON,
        Cause.REMOTE: RelayCause.REMOTE,
        Cause.CREDIT: RelayCause.CREDIT,
    }[cause]
    return _set_relay(dataclasses.replace(state, armed=False), RelayState.CLOSED, relay_cause)


# --------------------------------------------------------------------------- time


def advance(state: MeterState, config: MeterConfig, t: int, profile: LoadProfile) -> MeterState:
    """Let meter time run to ``t`` with the premises drawing ``profile``.

    Time never runs backwards here (a clock set is :func:`set_clock`); ``t`` earlier than
    the meter's clock changes nothing. Energy up to ``t`` is integrated, but standing
    charges, activations and the credit state move only at boundaries (module docstring),
    so ``advance(advance(s, c, t1, p), c, t2, p) == advance(s, c, t2, p)``.
    """
    # With no energy flowing (relay open, or power off) nothing changes between the
    # day/band/tariff/friendly boundaries, so skip the per-minute steps: a meter restarted
    # after a month off, or a clock set a year ahead, costs a few hundred steps, not 500k.
    idle = isinstance(profile, _NoLoad)
    while state.now < t:
        boundary = _next_boundary(state, config, idle=idle or state.relay is RelayState.OPEN)
        step_end = min(t, boundary)
        state = _consume(state, step_end, profile)
        if step_end == boundary:
            state = _boundaries(state, config)
    return _instantaneous(state, profile)


def _next_boundary(state: MeterState, config: MeterConfig, *, idle: bool) -> int:
    """The next instant at which the meter books, settles or changes day/band/tariff."""
    boundary = state.next_midnight
    if not idle:
        boundary = min(
            boundary,
            _minute_start(state.now) + MAX_STEP_S,
            rating.next_band_change(state.tariff, state.now),
        )
    friendly = config.friendly.next_change(state.now)
    if friendly is not None:
        boundary = min(boundary, friendly)
    if state.passive is not None and state.passive[1] > state.now:
        boundary = min(boundary, state.passive[1])
    # A due midnight (only from a hand-made state) is taken at once, not skipped.
    return max(boundary, state.now)


def _minute_start(t: int) -> int:
    return t - t % MAX_STEP_S


def _load_w(profile: LoadProfile, t: int) -> int:
    """The power held for the meter minute containing ``t`` (sampled at its start)."""
    return profile.power_w(_minute_start(t))


def _instantaneous(state: MeterState, profile: LoadProfile) -> MeterState:
    power = _load_w(profile, state.now) if state.relay is RelayState.CLOSED else 0
    return state if power == state.power_w else dataclasses.replace(state, power_w=power)


def _consume(state: MeterState, end: int, profile: LoadProfile) -> MeterState:
    """Book the energy of ``[state.now, end)`` (one band, one tariff) and charge it."""
    if state.relay is RelayState.OPEN:
        return dataclasses.replace(state, now=end, power_w=0)
    power = _load_w(profile, state.now)
    wh, carry = divmod(state.carry_ws + power * (end - state.now), WS_PER_WH)
    if wh == 0:
        return dataclasses.replace(state, now=end, carry_ws=carry, power_w=power)
    regs = _book(state.tariff, state.regs, state.now, wh)
    charged = rating.cumulative_charge_milli(state.tariff, regs)
    return dataclasses.replace(
        state,
        now=end,
        carry_ws=carry,
        power_w=power,
        regs=regs,
        import_wh=state.import_wh + wh,
        charged_milli=charged,
        credit_milli=state.credit_milli - (charged - state.charged_milli),
    )


def _book(tariff: Tariff, regs: rating.Registers, t: int, wh: int) -> rating.Registers:
    """Add ``wh`` consumed at ``t`` to the registers (:func:`rating.advance`)."""
    if rating.block_period_of(tariff, t) < regs.block_period:
        # The clock was set back across a month start (set_clock): a block period never
        # reopens, so the energy joins the registers' period, in the band in force at t.
        band_wh = list(regs.band_wh)
        band_wh[rating.band_at(tariff, t)] += wh
        return dataclasses.replace(
            regs, band_wh=tuple(band_wh), block_period_wh=regs.block_period_wh + wh
        )
    return rating.advance(tariff, regs, t, wh)


def _boundaries(state: MeterState, config: MeterConfig) -> MeterState:
    """At ``state.now``: take a due standing charge, activate a due tariff, settle.

    The standing charge comes first: a day that begins at the very instant a new tariff
    activates is charged by the tariff in force until then, as
    :func:`rating.standing_charges_milli` counts days begun in ``(start, end]`` of each
    tariff's span. (Activating first would recompute the next midnight from the
    activation instant and skip that day's charge altogether.)
    """
    if state.now >= state.next_midnight:
        charge = state.tariff.standing_charge_milli_per_day
        state = dataclasses.replace(
            state,
            credit_milli=state.credit_milli - charge,
            next_midnight=_next_midnight(state.tariff, state.now),
        )
        if charge:
            state = _log(state, state.now, EventCode.STANDING_CHARGE, charge)
    if state.passive is not None and state.passive[1] <= state.now:
        state = _activate(state, state.passive[0])
    friendly = config.friendly.active(state.now)
    if friendly != state.friendly_now:
        state = dataclasses.replace(state, friendly_now=friendly)
    return _settle(state, config, Cause.CREDIT)


def _activate(state: MeterState, tariff: Tariff) -> MeterState:
    """The passive tariff becomes active: band registers restart (RATING.md)."""
    state = dataclasses.replace(
        state,
        tariff=tariff,
        tariff_activated_at=state.now,
        regs=rating.start_registers(tariff, state.now),
        charged_milli=0,
        passive=None,
        next_midnight=_next_midnight(tariff, state.now),
    )
    return _log(state, state.now, EventCode.TARIFF_ACTIVATED, tariff.tariff_id)


class _NoLoad:
    """No energy flows (power was off, or the meter cannot know when it flowed)."""

    def power_w(self, t: int) -> int:
        del t
        return 0


def power_up(state: MeterState, config: MeterConfig, t: int) -> MeterState:
    """Power returns at ``t``: no energy flowed while off, but days still began (standing
    charges, tariff activations) — the meter's real-time clock ran on its battery."""
    state = advance(state, config, t, _NoLoad())
    return _log(state, state.now, EventCode.POWER_UP, 0)


def power_down(state: MeterState) -> MeterState:
    """A clean power-down (recorded; an unclean one is simply a missing record)."""
    return _log(state, state.now, EventCode.POWER_DOWN, 0)


def set_clock(state: MeterState, config: MeterConfig, t: int) -> MeterState:
    """Time sync. Forward: time passes with no consumption booked in between (the meter
    could not know when it happened). Backward: only the clock moves; registers, the
    next midnight and the block period stay, so nothing is charged twice."""
    before = state.now
    if t > state.now:
        state = advance(state, config, t, _NoLoad())
    else:
        state = dataclasses.replace(state, now=t)
    state = dataclasses.replace(state, clock_set=True)
    return _log(state, t, EventCode.CLOCK_SET, before)


# --------------------------------------------------------------------------- customer & remote


def request_emergency_credit(state: MeterState, config: MeterConfig) -> MeterState:
    """The customer asks for emergency credit; granted only when it is available."""
    if not state.ec_available(config):
        return state
    state = dataclasses.replace(state, ec_active=True)
    state = _log(
        state, state.now, EventCode.EMERGENCY_CREDIT_ACTIVATED, config.emergency_limit_milli
    )
    return _settle(state, config, Cause.EMERGENCY)


def press_button(state: MeterState, config: MeterConfig) -> MeterState:
    """The customer's button: closes an armed relay."""
    if not state.armed:
        return state
    return _settle(state, config, Cause.BUTTON)


def remote_command(state: MeterState, config: MeterConfig, command: RelayCommand) -> MeterState:
    """A utility's remote relay command."""
    if command is RelayCommand.DISCONNECT:
        state = dataclasses.replace(state, remote_disconnect=True, armed=False)
        return _set_relay(state, RelayState.OPEN, RelayCause.REMOTE)
    if command is RelayCommand.CONNECT and state.remote_disconnect:
        state = dataclasses.replace(state, remote_disconnect=False)
        return _settle(state, config, Cause.REMOTE)
    return state


# --------------------------------------------------------------------------- signed messages


def write_message(state: MeterState, config: MeterConfig, data: bytes) -> MeterState:
    """A signed message was committed to the token block: verify, apply once, report.

    The result is in ``token_status`` (and ``token_seq`` has moved on by one).
    """
    trusted = {kid: messages.load_public_key(raw) for kid, raw in state.trusted_keys}
    try:
        msg = messages.verify(
            data, trusted, meter_id=config.meter_id, now=state.now, max_skew_s=config.max_skew_s
        )
        state.window.check(msg.header.msg_id)
    except ProtocolError as exc:
        return _report(state, status_for_error(exc))
    applied = _apply(state, config, msg)
    if applied is None:
        return _report(state, TokenStatus.REFUSED)
    applied = dataclasses.replace(
        applied,
        window=applied.window.accept(msg.header.msg_id),
        last_message_id=msg.header.msg_id,
    )
    applied = _log(applied, applied.now, EventCode.TOKEN_ACCEPTED, msg.header.msg_id)
    applied = _report(applied, TokenStatus.ACCEPTED, logged=True)
    return _settle(applied, config, Cause.CREDIT)


def _report(state: MeterState, status: TokenStatus, *, logged: bool = False) -> MeterState:
    if not logged:
        state = _log(state, state.now, EventCode.TOKEN_REJECTED, status)
    return dataclasses.replace(state, token_status=status, token_seq=(state.token_seq + 1) % 2**16)


def _apply(state: MeterState, config: MeterConfig, msg: messages.Message) -> MeterState | None:
    """The effect of a verified, new message; None if the meter must refuse it."""
    if isinstance(msg, CreditToken):
        if msg.currency != config.currency:
            return None
        credit = state.credit_milli + msg.amount_minor * MILLI_PER_MINOR
        if credit > MAX_CREDIT_MILLI:
            return None
        # A top-up repays emergency credit first (credit is one signed number); once
        # credit is positive again, emergency credit is available afresh.
        return dataclasses.replace(
            state,
            credit_milli=credit,
            ec_active=state.ec_active and credit <= 0,
            last_credit_token_id=msg.header.msg_id,
        )
    if isinstance(msg, TariffMessage):
        if msg.tariff.currency != config.currency:
            return None
        state = dataclasses.replace(state, passive=(msg.tariff, msg.activation_at))
        if msg.activation_at <= state.now:
            state = _activate(state, msg.tariff)
        return state
    return _key_change(state, msg)


def _key_change(state: MeterState, msg: KeyChange) -> MeterState | None:
    keys = dict(state.trusted_keys)
    if msg.action is KeyAction.ADD:
        if msg.target_key_id not in keys and len(keys) >= MAX_TRUSTED_KEYS:
            return None
        keys[msg.target_key_id] = msg.public_key
    else:
        # Never lock the meter out: keep at least one key, and not the revoked signer.
        if (
            msg.target_key_id not in keys
            or msg.target_key_id == msg.header.key_id
            or len(keys) == 1
        ):
            return None
        del keys[msg.target_key_id]
    state = dataclasses.replace(state, trusted_keys=tuple(sorted(keys.items())))
    return _log(state, state.now, EventCode.KEY_CHANGED, msg.target_key_id)
