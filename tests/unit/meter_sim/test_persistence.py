"""The meter's state file: exact round trips, and every kind of damage refused by name."""

from __future__ import annotations

import copy
import functools
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firmware_protocol.modbus_map import EVENT_LOG_LEN, CreditState, RelayCommand, RelayState
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import flat_tariff, tariff_to_dict
from firmware_protocol.units import currency
from firmware_protocol.vectors import EXAMPLE_TOU
from meter_sim import core, persistence
from meter_sim.core import MeterState
from meter_sim.persistence import StateFileError
from tests.unit.meter_sim.test_core import (
    CONFIG,
    FLAT,
    HOUR,
    KW,
    PUB1,
    PUB2,
    T0,
    Constant,
    credit_token,
    new,
    run,
    tariff_token,
    write,
)


@functools.cache
def rich_state() -> MeterState:
    """A state with every optional part in use (immutable, so built once)."""
    s = new(100_000, keys={7: PUB1, 8: PUB2})
    s = write(s, tariff_token(1, EXAMPLE_TOU, T0 + 30 * 86_400))  # passive
    s = run(s, T0 + HOUR)  # runs out after 56 minutes
    s = core.request_emergency_credit(s, CONFIG)
    s = run(s, T0 + HOUR + 617, Constant(1_234))  # leaves W·s in the carry
    s = write(s, credit_token(5, 1))
    s = write(s, credit_token(3, 1))  # out of order: a sparse window bitmap
    s = write(s, b"junk")
    s = core.remote_command(s, CONFIG, RelayCommand.DISCONNECT)
    assert s.passive is not None
    assert s.ec_active
    assert s.credit_milli < 0
    assert s.carry_ws > 0
    assert s.window.bitmap == 0b10101
    assert s.token_status is TokenStatus.MALFORMED
    assert (s.relay, s.remote_disconnect, s.credit_state) == (
        RelayState.OPEN,
        True,
        CreditState.EMERGENCY_IN_USE,
    )
    assert len(s.events) > 5
    return s


def test_round_trip_of_a_rich_state(tmp_path: Path) -> None:
    path = tmp_path / "meter.json"
    s = rich_state()
    persistence.save(path, s)
    assert persistence.load(path) == s
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_bytes()) == persistence.to_dict(s)
    # Saving again replaces the file whole.
    later = run(s, s.now + 86_400, KW)
    persistence.save(path, later)
    assert persistence.load(path) == later
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meter.json"]


def test_round_trip_of_a_fresh_meter_through_json_text() -> None:
    s = new()
    text = json.dumps(persistence.to_dict(s))
    assert persistence.from_dict(json.loads(text)) == s


def test_load_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert persistence.load(tmp_path / "nothing-yet.json") is None


def test_load_of_an_unreadable_path_raises(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="cannot read"):
        persistence.load(tmp_path)  # a directory


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe{}", b"NaN-ish"])
def test_a_file_that_is_not_json_is_refused(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "meter.json"
    path.write_bytes(raw)
    with pytest.raises(StateFileError, match=r"meter\.json: not JSON"):
        persistence.load(path)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d[key] = value

    return mutate


def _set_in(outer: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d[outer][key] = value

    return mutate


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        del d[key]

    return mutate


def _drop_in(outer: str, key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        del d[outer][key]

    return mutate


def _bump_charged(d: dict[str, Any]) -> None:
    d["charged_milli"] += 1


_USD_FLAT = tariff_to_dict(
    flat_tariff(tariff_id=9, currency=currency("USD"), timezone="UTC", price_milli_per_kwh=1)
)
_EVENT = [T0, "POWER_UP", 0]

DAMAGE = [
    ("format-2", _set("format", 2), "state format 2, expected 1"),
    ("format-true", _set("format", value=True), "state format True"),
    ("format-missing", _drop("format"), "state format None"),
    ("unknown-field", _set("colour", "blue"), "unknown fields colour"),
    ("missing-credit", _drop("credit_milli"), "missing field 'credit_milli'"),
    ("missing-events", _drop("events"), "missing field 'events'"),
    ("credit-string", _set("credit_milli", "5"), "credit_milli: expected an integer"),
    ("credit-float", _set("credit_milli", 1.5), "credit_milli: expected an integer"),
    ("int-bool", _set("import_wh", value=True), "import_wh: expected an integer"),
    ("import-negative", _set("import_wh", -1), "import_wh: -1 is outside"),
    ("now-negative", _set("now", -1), "now: -1 is outside"),
    ("carry-whole-wh", _set("carry_ws", 3_600), "carry_ws: 3600 is outside"),
    ("token-seq-17-bits", _set("token_seq", 65_536), "token_seq: 65536 is outside"),
    ("bool-as-int", _set("ec_active", 1), "ec_active: expected true/false"),
    ("relay-name", _set("relay", "HALF"), "relay: expected one of OPEN, CLOSED"),
    ("credit-state-number", _set("credit_state", 1), "credit_state: expected one of"),
    ("token-status-null", _set("token_status", None), "token_status: expected one of"),
    ("window-bad-hex", _set("window", "zz"), "window: non-hexadecimal"),
    ("window-short", _set("window", "00"), "window: replay window state is 12 bytes"),
    ("window-number", _set("window", 12), "window: expected a hex string"),
    ("window-inconsistent", _set("window", "000000050000000000000000"), "window: replay"),
    ("keys-none", _set("trusted_keys", {}), "trusted_keys: a meter trusts 1..4 keys, got 0"),
    ("keys-five", _set("trusted_keys", {str(i): PUB1.hex() for i in range(5)}), "trusted_keys"),
    ("keys-list", _set("trusted_keys", [PUB1.hex()]), "trusted_keys: expected a JSON object"),
    ("key-bad-hex", _set("trusted_keys", {"7": "zz"}), "trusted_keys: non-hexadecimal"),
    ("key-31-bytes", _set("trusted_keys", {"7": "00" * 31}), "trusted_keys: .*32 bytes"),
    ("key-id-name", _set("trusted_keys", {"seven": PUB1.hex()}), "trusted_keys: key id"),
    ("key-id-twice", _set("trusted_keys", {"7": PUB1.hex(), "07": PUB2.hex()}), "key id '07'"),
    ("key-id-u64", _set("trusted_keys", {str(2**32): PUB1.hex()}), "trusted_keys: .*outside"),
    ("regs-list", _set("regs", [0]), "regs: expected a JSON object"),
    ("regs-missing", _drop_in("regs", "block_period"), "regs: expected exactly the fields"),
    ("regs-string-wh", _set_in("regs", "band_wh", ["1"]), r"regs: band_wh\[0\]"),
    ("regs-period", _set_in("regs", "block_period", 5), "regs: block_period"),
    ("regs-more-bands", _set_in("regs", "band_wh", [0, 0]), "2 band registers, the tariff has 1"),
    ("regs-vs-tariff", _set("tariff", tariff_to_dict(EXAMPLE_TOU)), "1 band registers, the tar"),
    ("charged-off-by-one", _bump_charged, "charged_milli is .* cumulative charge is"),
    ("tariff-empty", _set("tariff", {}), "tariff: missing tariff fields"),
    ("tariff-list", _set("tariff", []), "tariff: a tariff is a JSON object"),
    ("passive-list", _set("passive", []), "passive: expected a JSON object"),
    ("passive-no-time", _set("passive", {"tariff": tariff_to_dict(FLAT)}), "passive: expected"),
    (
        "passive-currency",
        _set("passive", {"tariff": _USD_FLAT, "activation_at": T0}),
        "passive tariff in another currency",
    ),
    ("events-string", _set("events", "x"), "events: expected a JSON array"),
    ("events-too-many", _set("events", [_EVENT] * (EVENT_LOG_LEN + 1)), "events: at most 16"),
    ("event-code", _set("events", [[T0, "NOPE", 0]]), "events: expected one of"),
    ("event-short", _set("events", [[T0, "POWER_UP"]]), "events: not enough values"),
    ("event-empty-slot", _set("events", [[T0, "NONE", 0]]), "events: an empty event slot"),
    ("event-arg", _set("events", [[T0, "POWER_UP", -1]]), "events: -1 is outside"),
]


@pytest.mark.parametrize(
    ("mutate", "match"), [pytest.param(m, e, id=name) for name, m, e in DAMAGE]
)
def test_damaged_state_is_refused_with_a_clear_message(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    data = copy.deepcopy(persistence.to_dict(rich_state()))
    mutate(data)
    path = tmp_path / "meter.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StateFileError, match=match) as info:
        persistence.load(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("data", [[], "state", 7, None])
def test_a_state_that_is_not_an_object_is_refused(data: object) -> None:
    with pytest.raises(StateFileError, match="must be a JSON object"):
        persistence.from_dict(data)


async def test_overlapping_saves_of_one_meter_run_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleet's periodic save and a request's save must not write the same file at once.

    Both used to write ``<meter>.json.tmp`` together; the second rename then failed and
    took the whole fleet down (seen with 2,000 meters under polling).
    """
    import asyncio
    import threading

    from meter_sim.clock import ManualClock
    from tests.support.meters import make_meter

    clock = ManualClock(1_790_000_000)
    meter = make_meter(clock, meter_id=42, state_path=tmp_path / "42.json")
    real_save = persistence.save
    inside, most = 0, 0
    guard = threading.Lock()

    def slow_save(path: Path, state: MeterState) -> None:
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        try:
            threading.Event().wait(0.05)
            real_save(path, state)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(persistence, "save", slow_save)
    for _ in range(3):
        clock.advance(60)
        meter.tick()
        await asyncio.gather(*(meter.persist() for _ in range(4)))
    assert most == 1
    assert (tmp_path / "42.json").exists()
