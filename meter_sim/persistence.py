"""The meter's non-volatile memory: a state file written atomically (temp, fsync, rename).

A real meter keeps credit, registers, the anti-replay window, tariffs and keys in
EEPROM/flash with a two-slot commit; the simulator's equivalent is one JSON file
replaced by ``os.replace`` after ``fsync``, so a power cut at any instant leaves the
old state or the new one, never a mix. Loading validates everything: a damaged file
is refused with a clear error, never half-read.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from firmware_protocol import rating
from firmware_protocol.errors import ProtocolError
from firmware_protocol.messages import load_public_key
from firmware_protocol.modbus_map import (
    EVENT_LOG_LEN,
    CreditState,
    EventCode,
    EventRecord,
    RelayState,
)
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import Tariff, tariff_from_dict, tariff_to_dict
from meter_sim.core import MAX_TRUSTED_KEYS, WS_PER_WH, MeterState

FORMAT: Final = 1

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)


class StateFileError(Exception):
    """The state file cannot be read or is not a valid meter state."""


def to_dict(state: MeterState) -> dict[str, Any]:
    """JSON-ready form of the whole state."""
    r = state.regs
    return {
        "format": FORMAT,
        "now": state.now,
        "tariff": tariff_to_dict(state.tariff),
        "tariff_activated_at": state.tariff_activated_at,
        "regs": {
            "band_wh": list(r.band_wh),
            "block_period": r.block_period,
            "block_period_wh": r.block_period_wh,
            "prev_block_period_wh": r.prev_block_period_wh,
            "closed_block_milli": r.closed_block_milli,
        },
        "trusted_keys": {str(k): v.hex() for k, v in state.trusted_keys},
        "credit_milli": state.credit_milli,
        "charged_milli": state.charged_milli,
        "import_wh": state.import_wh,
        "carry_ws": state.carry_ws,
        "next_midnight": state.next_midnight,
        "passive": None
        if state.passive is None
        else {"tariff": tariff_to_dict(state.passive[0]), "activation_at": state.passive[1]},
        "ec_active": state.ec_active,
        "credit_state": state.credit_state.name,
        "relay": state.relay.name,
        "armed": state.armed,
        "remote_disconnect": state.remote_disconnect,
        "window": state.window.to_bytes().hex(),
        "token_seq": state.token_seq,
        "token_status": state.token_status.name,
        "last_message_id": state.last_message_id,
        "last_credit_token_id": state.last_credit_token_id,
        "events": [[e.time_unix, e.code.name, e.arg] for e in state.events],
        "event_count": state.event_count,
        "power_w": state.power_w,
        "friendly_now": state.friendly_now,
        "clock_set": state.clock_set,
    }


_FIELDS: Final = frozenset(
    (
        "format", "now", "tariff", "tariff_activated_at", "regs", "trusted_keys",
        "credit_milli", "charged_milli", "import_wh", "carry_ws", "next_midnight", "passive",
        "ec_active", "credit_state", "relay", "armed", "remote_disconnect", "window",
        "token_seq", "token_status", "last_message_id", "last_credit_token_id", "events",
        "event_count", "power_w", "friendly_now", "clock_set",
    )
)  # fmt: skip
_U32: Final = 2**32 - 1
_I64: Final = 2**63 - 1
#: Errors a field's parser may raise on bad input (ProtocolError covers TariffError,
#: RegisterError, MalformedError from keys and the replay window, UnitError).
_PARSE_ERRORS: Final = (KeyError, TypeError, ValueError, AttributeError, ProtocolError)


def from_dict(data: Any) -> MeterState:
    """Inverse of :func:`to_dict`; raises :class:`StateFileError` on anything invalid.

    Every message names the field at fault. Beyond types and ranges, the state must be
    one the meter could have written: band registers that fit the tariff, ``charged_milli``
    equal to the registers' cumulative charge (else the next booking would take or give
    credit out of thin air), 1..4 valid trusted keys, a passive tariff in the meter's
    currency, at most EVENT_LOG_LEN events.
    """
    if not isinstance(data, dict):
        raise StateFileError(
            f"invalid meter state: must be a JSON object, got {type(data).__name__}"
        )
    fmt = data.get("format")
    if type(fmt) is not int or fmt != FORMAT:
        raise StateFileError(f"state format {fmt!r}, expected {FORMAT}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise StateFileError(f"invalid meter state: unknown fields {', '.join(sorted(unknown))}")
    f = _Fields(data)
    tariff = f.get("tariff", tariff_from_dict)
    state = MeterState(
        now=f.get("now", _u32),
        tariff=tariff,
        tariff_activated_at=f.get("tariff_activated_at", _u32),
        regs=f.get("regs", _registers),
        trusted_keys=f.get("trusted_keys", _keys),
        credit_milli=f.get("credit_milli", lambda v: _int(v, -_I64 - 1, _I64)),
        charged_milli=f.get("charged_milli", lambda v: _int(v, 0, _I64)),
        import_wh=f.get("import_wh", lambda v: _int(v, 0, _I64)),
        carry_ws=f.get("carry_ws", lambda v: _int(v, 0, WS_PER_WH - 1)),
        next_midnight=f.get("next_midnight", _u32),
        passive=f.get("passive", _passive),
        ec_active=f.get("ec_active", _bool),
        credit_state=f.get("credit_state", lambda v: _enum(CreditState, v)),
        relay=f.get("relay", lambda v: _enum(RelayState, v)),
        armed=f.get("armed", _bool),
        remote_disconnect=f.get("remote_disconnect", _bool),
        window=f.get("window", lambda v: ReplayWindow.from_bytes(_hex(v))),
        token_seq=f.get("token_seq", lambda v: _int(v, 0, 0xFFFF)),
        token_status=f.get("token_status", lambda v: _enum(TokenStatus, v)),
        last_message_id=f.get("last_message_id", _u32),
        last_credit_token_id=f.get("last_credit_token_id", _u32),
        events=f.get("events", _events),
        event_count=f.get("event_count", _u32),
        power_w=f.get("power_w", lambda v: _int(v, 0, _I64)),
        friendly_now=f.get("friendly_now", _bool),
        clock_set=f.get("clock_set", _bool),
    )
    if len(state.regs.band_wh) != len(tariff.bands):
        raise StateFileError(
            f"invalid meter state: regs: {len(state.regs.band_wh)} band registers, "
            f"the tariff has {len(tariff.bands)} bands"
        )
    expected = rating.cumulative_charge_milli(tariff, state.regs)
    if state.charged_milli != expected:
        raise StateFileError(
            f"invalid meter state: charged_milli is {state.charged_milli}, "
            f"the registers' cumulative charge is {expected}"
        )
    if state.passive is not None and state.passive[0].currency != tariff.currency:
        raise StateFileError("invalid meter state: passive tariff in another currency")
    return state


class _Fields:
    """Reads one field at a time so an error names the field."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def get(self, name: str, parse: Callable[[Any], _T]) -> _T:
        if name not in self._data:
            raise StateFileError(f"invalid meter state: missing field {name!r}")
        try:
            return parse(self._data[name])
        except _PARSE_ERRORS as exc:
            raise StateFileError(f"invalid meter state: {name}: {exc}") from exc


def _int(value: object, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{value} is outside {lo}..{hi}")
    return value


def _u32(value: object) -> int:
    return _int(value, 0, _U32)


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected true/false, got {value!r}")
    return value


def _hex(value: object) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected a hex string, got {value!r}")
    return bytes.fromhex(value)


def _enum(kind: type[_E], value: object) -> _E:
    if not isinstance(value, str) or value not in kind.__members__:
        raise ValueError(f"expected one of {', '.join(kind.__members__)}, got {value!r}")
    return kind[value]


def _object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {value!r}")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON array, got {value!r}")
    return value


def _registers(value: object) -> rating.Registers:
    r = _object(value)
    if set(r) != _REG_FIELDS:
        raise ValueError(f"expected exactly the fields {', '.join(sorted(_REG_FIELDS))}")
    return rating.Registers(
        tuple(_list(r["band_wh"])),
        r["block_period"],
        r["block_period_wh"],
        r["prev_block_period_wh"],
        r["closed_block_milli"],
    )


_REG_FIELDS: Final = frozenset(
    ("band_wh", "block_period", "block_period_wh", "prev_block_period_wh", "closed_block_milli")
)


def _keys(value: object) -> tuple[tuple[int, bytes], ...]:
    keys = _object(value)
    if not 1 <= len(keys) <= MAX_TRUSTED_KEYS:
        raise ValueError(f"a meter trusts 1..{MAX_TRUSTED_KEYS} keys, got {len(keys)}")
    out = []
    for k, v in keys.items():
        # Canonical decimal only, so "7" and "07" cannot name the same key twice.
        if not (k.isascii() and k.isdigit()) or k != str(int(k)):
            raise ValueError(f"key id {k!r} is not a canonical decimal number")
        raw = _hex(v)
        load_public_key(raw)
        out.append((_u32(int(k)), raw))
    return tuple(sorted(out))


def _passive(value: object) -> tuple[Tariff, int] | None:
    if value is None:
        return None
    p = _object(value)
    if set(p) != {"tariff", "activation_at"}:
        raise ValueError("expected exactly the fields activation_at, tariff")
    return tariff_from_dict(p["tariff"]), _u32(p["activation_at"])


def _events(value: object) -> tuple[EventRecord, ...]:
    items = _list(value)
    if len(items) > EVENT_LOG_LEN:
        raise ValueError(f"at most {EVENT_LOG_LEN} events, got {len(items)}")
    out = []
    for item in items:
        t, code, arg = _list(item)
        out.append(EventRecord(_u32(t), _enum(EventCode, code), _u32(arg)))
    return tuple(out)


def save(path: Path, state: MeterState) -> None:
    """Write ``state`` to ``path`` atomically and durably.

    If anything fails before the rename, ``path`` still holds the previous state and the
    temporary file is removed; the error propagates (the shell must not answer as if the
    new state were safe).
    """
    data = json.dumps(to_dict(state), separators=(",", ":"), sort_keys=True).encode()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> MeterState | None:
    """The saved state, or None if there is none yet; a damaged file raises."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path}: not JSON: {exc}") from exc
    try:
        return from_dict(data)
    except StateFileError as exc:
        raise StateFileError(f"{path}: {exc}") from exc
