"""``voltcredit meter-sim``: run simulated prepaid meters, read and top up a meter by hand.

The technician's tool. ``run`` starts one meter or a fleet; ``status`` reads any meter
(simulated or real, it speaks the same register map) over Modbus; ``token`` writes a
signed message typed in as hex; ``keygen`` and ``make-token`` make a test key pair and
tokens for commissioning without a backend.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import textwrap
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from firmware_protocol import messages
from firmware_protocol import modbus_map as mm
from firmware_protocol.errors import ProtocolError, TariffError, UnitError
from firmware_protocol.tariff import Band, Switch, Tariff, tariff_from_dict
from firmware_protocol.units import CURRENCIES, currency, format_minor
from meter_sim import core, persistence
from meter_sim.clock import AcceleratedClock, system_now
from meter_sim.core import FriendlyHours, MeterConfig
from meter_sim.device import MeterDevice
from meter_sim.fleet import FleetError, RtuLayout, TcpLayout, serve
from meter_sim.profiles import ProfileError, profile_from_spec

log = logging.getLogger(__name__)

DEFAULT_FIRST_METER: Final = 1_000_001
EXIT_USAGE: Final = 2
EXIT_FAIL: Final = 1

EXAMPLES = """\
examples:
  # one meter on Modbus TCP port 5020, unit 1, real time, household load
  voltcredit meter-sim run --trusted-key keys.txt

  # a fleet of 50 meters on one port (units 1..50), a day per minute
  voltcredit meter-sim run --meters 50 --speed 1440 --profile household --profile constant:800

  # three meters on an RS-485 adapter at 9600 8E1
  voltcredit meter-sim run --rtu /dev/ttyUSB0 --baud 9600 --parity E --meters 3

  # read a meter (simulated or real) and top it up by hand
  voltcredit meter-sim status --port 5020 --unit 1
  voltcredit meter-sim token --port 5020 --unit 1 0101000000070000...

  # commissioning without a backend: a test key and a 5.00 EUR token for meter 1000001
  voltcredit meter-sim keygen --out test-key
  voltcredit meter-sim make-token --seed-file test-key.seed --key-id 1 \\
      --meter 1000001 --msg-id 1 --amount 5.00 --currency EUR
"""


class CliError(Exception):
    """A problem the technician can fix; printed without a traceback."""


# --------------------------------------------------------------------------- parsing


def register(subparsers: Any) -> None:
    """Add ``meter-sim`` to the root ``voltcredit`` command (entry-point plugin)."""
    parser = subparsers.add_parser(
        "meter-sim",
        help="simulated prepaid meters over Modbus, and a technician's meter tool",
        description=textwrap.dedent(__doc__ or ""),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="meter_sim_command", metavar="ACTION", required=True)
    _add_run(sub)
    _add_status(sub)
    _add_token(sub)
    _add_keygen(sub)
    _add_make_token(sub)


def _add_connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("meter connection")
    g.add_argument("--host", default="127.0.0.1", help="Modbus TCP host (default %(default)s)")
    g.add_argument("--port", type=_port, default=5020, help="Modbus TCP port (default %(default)s)")
    g.add_argument(
        "--rtu", metavar="DEVICE", help="use Modbus RTU on this serial device instead of TCP"
    )
    g.add_argument("--baud", type=int, default=9600, help="RTU baud rate (default %(default)s)")
    g.add_argument("--parity", choices=("N", "E", "O"), default="N", help="RTU parity (default N)")
    g.add_argument("--unit", type=_unit, default=1, help="Modbus unit id 1..247 (default 1)")
    g.add_argument("--timeout", type=float, default=3.0, help="seconds per request (default 3)")


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run one simulated meter or a fleet",
        description="Run simulated prepaid meters that serve the voltcredit register map "
        "(firmware_protocol/MODBUS.md) over Modbus TCP or RTU until Ctrl-C. State (credit, "
        "registers, keys, tariff) is kept in --state-dir and survives restarts.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("fleet")
    g.add_argument("--meters", type=_positive, default=1, help="how many meters (default 1)")
    g.add_argument(
        "--meter-id",
        type=_meter_id,
        default=DEFAULT_FIRST_METER,
        help="serial number of the first meter; the others count up (default %(default)s)",
    )
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    g.add_argument(
        "--port",
        type=_port,
        default=5020,
        help="first TCP port (default %(default)s); 0 = any free port",
    )
    g.add_argument(
        "--per-port",
        type=_unit,
        default=247,
        help="meters sharing one TCP port as units 1..N; 1 = a port per meter (default 247)",
    )
    g.add_argument(
        "--rtu", metavar="DEVICE", help="serve Modbus RTU on this serial device (one RS-485 line)"
    )
    g.add_argument("--baud", type=int, default=9600, help="RTU baud rate (default %(default)s)")
    g.add_argument("--parity", choices=("N", "E", "O"), default="N", help="RTU parity (default N)")
    g = p.add_argument_group("meter")
    g.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        metavar="FILE",
        help="public keys the meters trust: lines of '<key id> <64 hex chars>' "
        "(repeatable; needed only for meters without saved state)",
    )
    g.add_argument("--currency", default="EUR", help="credit currency, ISO 4217 (default EUR)")
    g.add_argument(
        "--timezone", default="Europe/Berlin", help="IANA time zone (default %(default)s)"
    )
    g.add_argument(
        "--tariff",
        metavar="FILE",
        help="initial tariff as JSON (default: a two-band time-of-use tariff)",
    )
    g.add_argument(
        "--credit", default="0", help="initial credit of new meters, e.g. 10.00 (default 0)"
    )
    g.add_argument(
        "--emergency-limit", default="10.00", help="emergency credit limit (default 10.00)"
    )
    g.add_argument("--low-credit", default="5.00", help="low-credit threshold (default 5.00)")
    g.add_argument(
        "--no-auto-reconnect",
        action="store_true",
        help="after a top-up wait for the customer's button instead of reconnecting",
    )
    g.add_argument(
        "--friendly-night",
        metavar="HH:MM-HH:MM",
        help="friendly hours every night, e.g. 18:00-08:00 (never disconnect)",
    )
    g.add_argument("--friendly-weekends", action="store_true", help="weekends are friendly hours")
    g = p.add_argument_group("load and time")
    g.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="SPEC",
        help="load: constant:<W>, household[:seed=N,...] or csv:<file>; repeat to "
        "cycle over meters (default household)",
    )
    g.add_argument(
        "--speed",
        type=_positive,
        default=1,
        help="simulated seconds per real second (1440 = a day per minute)",
    )
    g.add_argument(
        "--start",
        help="simulated start time, ISO 8601 with offset (default: now, "
        "or where saved state left off)",
    )
    g.add_argument(
        "--state-dir",
        type=Path,
        default=Path("meter-sim-state"),
        help="where meter state lives (default ./meter-sim-state)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--status-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="print status this often (default 5; 0 = never)",
    )
    g.add_argument("--json", action="store_true", help="status as one JSON object per line")
    p.set_defaults(func=cmd_run)


def _add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="read a meter's registers over Modbus and show them",
        description="Read the poll, info and event registers of a meter "
        "(simulated or real) and print them for a person, or as JSON.",
    )
    _add_connection(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--events", action="store_true", help="also show the event log")
    p.set_defaults(func=cmd_status)


def _add_token(sub: Any) -> None:
    p = sub.add_parser(
        "token",
        help="write a signed token (hex) to a meter and show the result",
        description="Write a signed credit token, tariff or key-change message "
        "to a meter's token block (length, block, commit) and print the status "
        "the meter reports. Spaces in the hex are ignored.",
    )
    _add_connection(p)
    p.add_argument("hex", nargs="+", help="the message bytes in hex")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_token)


def _add_keygen(sub: Any) -> None:
    p = sub.add_parser(
        "keygen", help="make a test signing key pair (for commissioning without a backend)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="writes OUT.seed (private, 0600) and OUT.pub"
    )
    p.add_argument("--key-id", type=int, default=1, help="key id written into OUT.pub (default 1)")
    p.set_defaults(func=cmd_keygen)


def _add_make_token(sub: Any) -> None:
    p = sub.add_parser(
        "make-token", help="sign a credit token with a key seed file (test/commissioning)"
    )
    p.add_argument("--seed-file", type=Path, required=True, help="32-byte private seed, hex")
    p.add_argument("--key-id", type=int, required=True)
    p.add_argument("--meter", type=_meter_id, required=True, help="meter serial number")
    p.add_argument("--msg-id", type=int, required=True, help="per-meter message id (>= 1, new)")
    p.add_argument("--amount", required=True, help="amount, e.g. 5.00")
    p.add_argument("--currency", default="EUR")
    p.add_argument("--valid-days", type=_positive, default=7)
    p.set_defaults(func=cmd_make_token)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _unit(text: str) -> int:
    value = _positive(text)
    if value > 247:
        raise argparse.ArgumentTypeError(f"Modbus unit ids are 1..247, got {value}")
    return value


def _meter_id(text: str) -> int:
    value = _positive(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError("meter ids are below 2**64")
    return value


# --------------------------------------------------------------------------- helpers


def parse_money(text: str, code: str) -> int:
    """``'12.34'`` in ``code`` to minor units; refuses more decimals than the currency has."""
    cur = currency(code)
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(frac) > cur.exponent:
        raise CliError(f"bad amount {text!r}: use e.g. 12.34 ({cur.exponent} decimals for {code})")
    scale: int = 10**cur.exponent
    return sign * (int(whole) * scale + int(frac.ljust(cur.exponent, "0") or "0"))


def read_trusted_keys(paths: list[str]) -> dict[int, bytes]:
    """Key files: one ``<key id> <64 hex chars>`` per line, ``#`` comments."""
    keys: dict[int, bytes] = {}
    for name in paths:
        try:
            text = Path(name).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read key file {name}: {exc}") from exc
        for lineno, raw_line in enumerate(text.splitlines(), 1):
            line = raw_line.split("#", 1)[0].strip()
            if line:
                key_id, raw = _key_line(line, f"{name}:{lineno}")
                keys[key_id] = raw
    return keys


def _key_line(line: str, where: str) -> tuple[int, bytes]:
    parts = line.split()
    if len(parts) != 2:
        raise CliError(f"{where}: bad key line: expected '<key id> <hex public key>'")
    try:
        key_id, raw = int(parts[0]), bytes.fromhex(parts[1])
        messages.load_public_key(raw)
    except (ValueError, ProtocolError) as exc:
        raise CliError(f"{where}: bad key line: {exc}") from exc
    return key_id, raw


#: The factory tariff's id: far from the small ids a backend gives its first published
#: versions, so the first tariff message a meter gets is visibly a new tariff (its band
#: registers restart at activation) and not a reset of the same one.
FACTORY_TARIFF_ID: Final = 4_000_000_001


def default_tariff(code: str, timezone: str) -> Tariff:
    """A realistic two-band time-of-use tariff: peak 07:00-21:00 on weekdays."""
    return Tariff(
        tariff_id=FACTORY_TARIFF_ID,
        currency=currency(code),
        timezone=timezone,
        bands=(Band("offpeak", 24_000), Band("peak", 36_500)),
        weekday=(Switch(0, 0), Switch(7 * 60, 1), Switch(21 * 60, 0)),
        weekend=(Switch(0, 0),),
        holiday=(Switch(0, 0),),
        standing_charge_milli_per_day=39_000,
    )


_HH_MM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def _friendly(spec: str | None, weekends: bool, timezone: str) -> FriendlyHours:
    start = end = 0
    if spec is not None:
        # Strict: "18:60" or "25:00" are typing errors, not 19:00 or 01:00; equal ends
        # would silently mean "no friendly night" (FriendlyHours), so they are refused too.
        first, dash, last = spec.partition("-")
        a, b = _HH_MM.fullmatch(first), _HH_MM.fullmatch(last)
        usage = f"bad --friendly-night {spec!r}: use HH:MM-HH:MM (00:00-23:59), e.g. 18:00-08:00"
        if not dash or a is None or b is None:
            raise CliError(usage)
        start, end = int(a[1]) * 60 + int(a[2]), int(b[1]) * 60 + int(b[2])
        if start == end:
            raise CliError(f"{usage}; start and end are equal (an empty window)")
    return FriendlyHours(
        timezone=timezone, night_start_minute=start, night_end_minute=end, weekends=weekends
    )


def _start_time(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CliError(
            f"bad --start {text!r}: use ISO 8601, e.g. 2026-11-26T08:00:00+01:00"
        ) from None
    if when.tzinfo is None:
        raise CliError(f"--start {text!r} needs a UTC offset, e.g. +01:00 or Z")
    return int(when.timestamp())


def build_devices(args: argparse.Namespace) -> tuple[list[MeterDevice], AcceleratedClock]:
    """Meters from saved state where it exists, new ones from the options otherwise."""
    try:
        cur = currency(args.currency)
        tariff = default_tariff(args.currency, args.timezone)
        if args.tariff:
            try:
                tariff = tariff_from_dict(json.loads(Path(args.tariff).read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise CliError(f"cannot read tariff {args.tariff}: {exc}") from exc
        friendly = _friendly(args.friendly_night, args.friendly_weekends, args.timezone)
        config_kw = {
            "currency": cur,
            "low_credit_milli": parse_money(args.low_credit, args.currency) * 1000,
            "emergency_limit_milli": parse_money(args.emergency_limit, args.currency) * 1000,
            "auto_reconnect": not args.no_auto_reconnect,
            "friendly": friendly,
        }
        credit = parse_money(args.credit, args.currency) * 1000
        profiles = [
            profile_from_spec(s, timezone=args.timezone, seed=0)
            for s in args.profile or ["household"]
        ]
    except (UnitError, TariffError, ProfileError) as exc:
        raise CliError(str(exc)) from exc
    keys = read_trusted_keys(args.trusted_key)
    state_dir: Path = args.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create state directory {state_dir}: {exc.strerror}") from exc
    saved = {}
    for i in range(args.meters):
        meter_id = args.meter_id + i
        try:
            saved[meter_id] = persistence.load(state_dir / f"{meter_id}.json")
        except persistence.StateFileError as exc:
            raise CliError(str(exc)) from exc
    wall = system_now()
    resume = max((s.now for s in saved.values() if s is not None), default=None)
    start = _start_time(args.start) or (
        max(resume, wall) if args.speed == 1 and resume else resume or wall
    )
    clock = AcceleratedClock.real(start, args.speed)
    devices = []
    for i in range(args.meters):
        meter_id = args.meter_id + i
        spec = (args.profile or ["household"])[i % len(profiles)]
        profile = profiles[i % len(profiles)]
        if spec == "household":  # a different household behind every meter
            profile = profile_from_spec(
                f"household:seed={meter_id}", timezone=args.timezone, seed=meter_id
            )
        config = MeterConfig(meter_id=meter_id, **config_kw)  # type: ignore[arg-type]
        state = saved[meter_id]
        if state is None:
            if not keys:
                raise CliError(f"meter {meter_id} has no saved state: give --trusted-key FILE")
            try:
                state = core.new_meter(
                    config, tariff=tariff, trusted_keys=keys, now=start, credit_milli=credit
                )
            except (UnitError, ProtocolError) as exc:
                raise CliError(str(exc)) from exc
        else:
            state = core.power_up(state, config, max(start, state.now))
        layout_units = args.per_port if not args.rtu else 247
        devices.append(
            MeterDevice(
                unit_id=i % layout_units + 1,
                config=config,
                state=state,
                profile=profile,
                clock=clock,
                state_path=state_dir / f"{meter_id}.json",
            )
        )
    return devices, clock


def status_dict(device: MeterDevice) -> dict[str, Any]:
    """One meter's status for people and scripts."""
    snap = device.snapshot()
    return _snapshot_dict(snap, device.unit_id, device.config.currency.code)


def _snapshot_dict(snap: mm.MeterSnapshot, unit: int, code: str | None) -> dict[str, Any]:
    return {
        "meter": snap.meter_id,
        "unit": unit,
        "clock": dt.datetime.fromtimestamp(snap.clock_unix, dt.UTC).isoformat(),
        "credit_milli": snap.credit_milli,
        "currency": code,
        "credit_state": snap.credit_state.name.lower(),
        "relay": snap.relay_state.name.lower(),
        "power_w": snap.power_w,
        "import_wh": snap.import_wh,
        "band_wh": list(snap.import_wh_bands),
        "active_band": snap.active_band,
        "tariff_id": snap.active_tariff_id,
        "flags": [f.name.lower() for f in mm.StatusFlag if f in snap.status_flags and f.name],
        "last_token": {
            "seq": snap.token.token_seq,
            "status": snap.token.token_status.name.lower(),
            "message_id": snap.token.last_message_id,
        },
    }


def _human(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'meter':>10} {'unit':>4} {'credit':>12} {'state':<19} {'relay':<6} "
        f"{'power W':>8} {'energy kWh':>11} {'last token':<22}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        credit = r["credit_milli"] // 1000
        money = format_minor(credit, currency(r["currency"])) if r["currency"] else str(credit)
        token = f"#{r['last_token']['message_id']} {r['last_token']['status']}"
        lines.append(
            f"{r['meter']:>10} {r['unit']:>4} {money:>12} {r['credit_state']:<19} {r['relay']:<6} "
            f"{r['power_w']:>8} {r['import_wh'] / 1000:>11.3f} {token:<22}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def _run_cli(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except CliError as exc:
        print(f"voltcredit meter-sim: error: {exc}", file=sys.stderr)
        return EXIT_FAIL


def cmd_run(args: argparse.Namespace) -> int:
    """``meter-sim run``."""
    return _run_cli(_run(args))


async def _run(args: argparse.Namespace) -> int:
    devices, clock = build_devices(args)
    layout: TcpLayout | RtuLayout
    try:
        layout = (
            RtuLayout(args.rtu, args.baud, args.parity)
            if args.rtu
            else TcpLayout(args.host, args.port, args.per_port)
        )
    except FleetError as exc:
        raise CliError(str(exc)) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serve(devices, layout) as fleet:
            where = args.rtu or ", ".join(f"{args.host}:{p}" for p in fleet.ports)
            print(
                f"meter-sim: {len(devices)} meter(s) on {where}, speed x{args.speed}; Ctrl-C stops",
                flush=True,
            )
            if args.json:
                print(
                    json.dumps(
                        {
                            "event": "ready",
                            "ports": fleet.ports,
                            "meters": [d.config.meter_id for d in devices],
                        }
                    ),
                    flush=True,
                )
            while not stop.is_set():
                with_status = args.status_every > 0
                try:
                    await asyncio.wait_for(stop.wait(), args.status_every if with_status else None)
                except TimeoutError:
                    rows = [status_dict(d) for d in devices]
                    if args.json:
                        print(json.dumps({"event": "status", "meters": rows}), flush=True)
                    else:
                        clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
                        when = dt.datetime.fromtimestamp(clock.now(), dt.UTC).isoformat()
                        print(f"{clear}simulated time {when}\n{_human(rows)}", flush=True)
            for d in devices:
                d.state = core.power_down(d.state)
    except FleetError as exc:
        raise CliError(str(exc)) from exc
    print("meter-sim: stopped; state saved in", args.state_dir, flush=True)
    return 0


def _client(args: argparse.Namespace) -> Any:
    if args.rtu:
        return AsyncModbusSerialClient(
            port=args.rtu, baudrate=args.baud, parity=args.parity, timeout=args.timeout, retries=1
        )
    return AsyncModbusTcpClient(args.host, port=args.port, timeout=args.timeout, retries=1)


async def _read(client: Any, unit: int, address: int, count: int) -> list[int]:
    rr = await client.read_input_registers(address, count=count, device_id=unit)
    if rr.isError():
        raise CliError(
            f"meter answered Modbus exception {rr} reading {count} registers at {address}"
        )
    return list(rr.registers)


async def _connect(args: argparse.Namespace) -> Any:
    client = _client(args)
    where = args.rtu or f"{args.host}:{args.port}"
    if not await client.connect():
        raise CliError(f"cannot connect to a meter at {where}")
    return client


def cmd_status(args: argparse.Namespace) -> int:
    """``meter-sim status``."""
    return _run_cli(_status(args))


async def _status(args: argparse.Namespace) -> int:
    client = await _connect(args)
    try:
        snap = mm.decode_poll_block(
            await _read(client, args.unit, mm.POLL_BLOCK_ADDRESS, mm.POLL_BLOCK_COUNT)
        )
        info = mm.decode_info_block(await _read(client, args.unit, *mm.group_span(mm.Group.INFO)))
        events = (
            mm.decode_event_log(await _read(client, args.unit, *mm.group_span(mm.Group.EVENTS)))
            if args.events
            else None
        )
    except ModbusException as exc:
        raise CliError(f"no answer from unit {args.unit}: {exc}") from exc
    except ProtocolError as exc:
        raise CliError(f"the meter's reply is not valid: {exc}") from exc
    finally:
        client.close()
    code = next((c.code for c in _currencies() if c.numeric == info.currency_numeric), None)
    row = _snapshot_dict(snap, args.unit, code)
    if events is not None:
        row["events"] = [
            {"time": e.time_unix, "code": e.code.name.lower(), "arg": e.arg}
            for e in events.records
            if e.code is not mm.EventCode.NONE
        ]
    if args.json:
        print(json.dumps(row))
    else:
        print(_human([row]))
        if events is not None:
            for e in row["events"]:
                when = dt.datetime.fromtimestamp(e["time"], dt.UTC).isoformat()
                print(f"  {when}  {e['code']:<28} {e['arg']}")
    return 0


def _currencies() -> list[Any]:
    return list(CURRENCIES.values())


def cmd_token(args: argparse.Namespace) -> int:
    """``meter-sim token``."""
    return _run_cli(_token(args))


async def _token(args: argparse.Namespace) -> int:
    try:
        data = bytes.fromhex("".join(args.hex))
        plan = mm.token_write_plan(data)
    except (ValueError, ProtocolError) as exc:
        raise CliError(f"not a token: {exc}") from exc
    client = await _connect(args)
    try:
        before = mm.decode_token_result(
            await _read(client, args.unit, *mm.group_span(mm.Group.TOKEN_RESULT))
        )
        for address, words in plan:
            rr = await client.write_registers(address, words, device_id=args.unit)
            if rr.isError():
                raise CliError(f"meter refused the write at {address}: {rr}")
        result = before
        for _ in range(50):
            result = mm.decode_token_result(
                await _read(client, args.unit, *mm.group_span(mm.Group.TOKEN_RESULT))
            )
            if result.token_seq != before.token_seq and result.token_status.final:
                break
            await asyncio.sleep(0.1)
        else:
            raise CliError("the meter did not report a result for the token")
        snap = mm.decode_poll_block(
            await _read(client, args.unit, mm.POLL_BLOCK_ADDRESS, mm.POLL_BLOCK_COUNT)
        )
        info = mm.decode_info_block(await _read(client, args.unit, *mm.group_span(mm.Group.INFO)))
    except ModbusException as exc:
        raise CliError(f"no answer from unit {args.unit}: {exc}") from exc
    except ProtocolError as exc:
        raise CliError(f"the meter's reply is not valid: {exc}") from exc
    finally:
        client.close()
    cur = next((c for c in _currencies() if c.numeric == info.currency_numeric), None)
    shown = format_minor(snap.credit_milli // 1000, cur) if cur else f"{snap.credit_milli} milli"
    out = {
        "status": result.token_status.name.lower(),
        "message_id": result.last_message_id,
        "credit_milli": snap.credit_milli,
        "relay": snap.relay_state.name.lower(),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"token {out['status']} (message id {out['message_id']}); "
            f"credit now {shown}, relay {out['relay']}"
        )
    return 0 if result.token_status.applied else EXIT_FAIL


def cmd_keygen(args: argparse.Namespace) -> int:
    """``meter-sim keygen``: OUT.seed (0600) and OUT.pub."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    seed_path = Path(f"{args.out}.seed")
    pub_path = Path(f"{args.out}.pub")
    try:
        # Created 0600 in one step (O_EXCL: never over an existing file, no window in
        # which another user could open it).
        fd = os.open(seed_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(seed.hex() + "\n")
        pub_path.write_text(f"{args.key_id} {messages.public_key_bytes(key.public_key()).hex()}\n")
    except OSError as exc:
        print(f"voltcredit meter-sim: error: cannot write key files: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(
        f"wrote {seed_path} (private, keep it safe) and {pub_path} "
        "(give it to meters with --trusted-key)"
    )
    return 0


def cmd_make_token(args: argparse.Namespace) -> int:
    """``meter-sim make-token``: print a signed credit token as hex."""
    try:
        seed = bytes.fromhex(Path(args.seed_file).read_text().strip())
        signer = messages.Ed25519Signer(args.key_id, messages.load_private_key(seed))
        amount = parse_money(args.amount, args.currency)
        now = system_now()
        token = messages.CreditToken(
            messages.Header(
                key_id=args.key_id,
                meter_id=args.meter,
                msg_id=args.msg_id,
                issued_at=now,
                expires_at=now + args.valid_days * 86_400,
            ),
            currency(args.currency),
            amount,
        )
        print(messages.encode(token, signer).hex())
    except (OSError, ValueError, ProtocolError, CliError) as exc:
        print(f"voltcredit meter-sim: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return 0
