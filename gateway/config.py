"""The gateway's configuration: one TOML file and a few environment variables → frozen dataclasses.

This is the only module of the gateway that reads configuration files or the
environment (house style rule 7). Every problem is a :class:`GatewayConfigError` whose
message reads ``FILE: KEY: PROBLEM``, e.g. ``gw.toml: meters[2].port: must be 1..65535,
got 70000`` (array indices count from 0, as in the TOML array). Unknown keys are
refused, so a typo never silently falls back to a default. Relative paths are taken
relative to the directory of the configuration file.

The README section "gateway" holds a complete example with every key.
"""

from __future__ import annotations

import enum
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_protocol import messages
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt import MAX_METERS_PER_GATEWAY
from firmware_protocol.mqtt_topics import check_gateway_id
from gateway.errors import GatewayConfigError

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1
#: Baud rates an RS-485 line may run at (the common UART rates; the meter's manual decides).
BAUD_RATES: Final = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
#: Environment variable of the test-only crash hook (see :class:`CrashPoint`).
CRASH_ENV: Final = "VOLTCREDIT_GATEWAY_CRASH_AT"

_HOST = re.compile(r"[A-Za-z0-9._:-]{1,253}")


class DriverKind(enum.StrEnum):
    """Which meter driver talks to a meter (``meters[].driver``)."""

    MODBUS_TCP = "modbus_tcp"
    MODBUS_RTU = "modbus_rtu"


class CrashPoint(enum.StrEnum):
    """TEST HOOK: where ``VOLTCREDIT_GATEWAY_CRASH_AT`` makes the process ``os._exit(137)``.

    Used only by the crash-recovery integration tests, which need a SIGKILL at an exact
    point of the token path; never set it in production.
    """

    AFTER_STORE = "after_store"  #: token stored (and acknowledged), before it is written
    AFTER_WRITE = "after_write"  #: the meter has processed the token, before the result is stored
    AFTER_RESULT = "after_result"  #: result stored, before it is published


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Per-device timing: each request's timeout, retries within one operation, back-off."""

    timeout_s: float
    retries: int
    backoff_min_s: float
    backoff_max_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpAddress:
    """A meter (or a Modbus TCP gateway in front of it) at ``host:port``, unit ``unit``."""

    host: str
    port: int
    unit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RtuAddress:
    """A meter on an RS-485 line: serial ``device`` at ``baudrate`` 8``parity````stopbits``."""

    device: str
    baudrate: int
    parity: str
    stopbits: int
    unit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterConfig:
    """One meter this gateway serves."""

    id: int
    driver: DriverKind
    address: TcpAddress | RtuAddress
    policy: RetryPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConfig:
    """How to reach the broker (``[mqtt]``)."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    keepalive_s: int
    reconnect_min_s: float
    reconnect_max_s: float
    max_inflight: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """The local SQLite file (outbox, tokens, counters) and its bounds (``[store]``)."""

    path: Path
    outbox_max_bytes: int
    token_retention_days: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Everything the gateway needs, validated."""

    source: str
    gateway_id: str
    poll_interval_s: float
    command_max_age_s: int
    token_result_timeout_s: float
    mqtt: MqttConfig
    store: StoreConfig
    #: (key id, 32 raw Ed25519 public-key bytes), ascending by key id
    trusted_keys: tuple[tuple[int, bytes], ...]
    meters: tuple[MeterConfig, ...]

    def public_keys(self) -> dict[int, Ed25519PublicKey]:
        """The trusted keys as ``messages.verify`` wants them."""
        return {kid: messages.load_public_key(raw) for kid, raw in self.trusted_keys}


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeEnv:
    """What the process learns from its environment: systemd's sockets and the test hook."""

    notify_socket: str | None = None
    #: systemd's watchdog interval in microseconds, if this process is the one watched
    watchdog_usec: int | None = None
    crash_at: CrashPoint | None = None


# ------------------------------------------------------------------------------ plumbing

_MISSING: Final = object()


class _Table:
    """One TOML table being validated: typed getters that name the key in every error."""

    def __init__(self, source: str, prefix: str, data: object) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(data, dict):
            raise GatewayConfigError(f"{source}: {prefix or '(top level)'}: must be a table")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> GatewayConfigError:
        return GatewayConfigError(f"{self.source}: {self.key(name)}: {problem}")

    def get(self, name: str, default: object = _MISSING) -> Any:
        self.used.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise self.error(name, "missing (required)")
        return default

    def string(self, name: str, default: object = _MISSING) -> Any:
        value = self.get(name, default)
        if value is not default and (type(value) is not str or not value):
            raise self.error(name, f"must be a non-empty string, got {_show(value)}")
        return value

    def integer(self, name: str, lo: int, hi: int, default: object = _MISSING) -> int:
        value = self.get(name, default)
        if type(value) is not int:
            raise self.error(name, f"must be an integer, got {_show(value)}")
        if not lo <= value <= hi:
            raise self.error(name, f"must be {lo}..{hi}, got {value}")
        return value

    def number(self, name: str, lo: float, hi: float, default: object = _MISSING) -> float:
        value = self.get(name, default)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self.error(name, f"must be a number, got {_show(value)}")
        if not lo <= value <= hi:
            raise self.error(name, f"must be {lo:g}..{hi:g}, got {value:g}")
        return float(value)

    def table(self, name: str) -> _Table:
        return _Table(self.source, self.key(name), self.get(name, {}))

    def tables(self, name: str) -> list[_Table]:
        items = self.get(name, [])
        if not isinstance(items, list):
            raise self.error(name, "must be an array of tables ([[" + self.key(name) + "]])")
        return [_Table(self.source, f"{self.key(name)}[{i}]", item) for i, item in enumerate(items)]

    def path(self, name: str, base: Path, *, must_exist: bool, default: object = _MISSING) -> Any:
        value = self.string(name, default)
        if value is default:
            return value
        path = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
        if must_exist and not path.is_file():
            raise self.error(name, f"file {path} does not exist")
        return path

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.error(unknown[0], f"unknown key (known here: {known})")


def _show(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})" if value else "an empty string"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__  # pragma: no cover - tomllib makes only the types above


# ------------------------------------------------------------------------------ sections


def load_config(path: Path | str) -> GatewayConfig:
    """Read and validate the TOML file at ``path``."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GatewayConfigError(f"{source}: cannot read: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayConfigError(f"{source}: cannot read: {exc}") from exc
    return parse_config(text, source=source, base_dir=path.resolve().parent)


def parse_config(text: str, *, source: str, base_dir: Path) -> GatewayConfig:
    """Validate TOML ``text``; ``source`` names it in errors, ``base_dir`` anchors paths."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GatewayConfigError(f"{source}: not valid TOML: {exc}") from exc
    top = _Table(source, "", doc)
    gw = top.string("gateway_id")
    try:
        check_gateway_id(gw)
    except ProtocolError:
        raise top.error("gateway_id", f"must be 1..64 of [A-Za-z0-9_-], got {gw!r}") from None
    poll = top.number("poll_interval_s", 0.1, 86_400.0, 60.0)
    max_age = top.integer("command_max_age_s", 1, 30 * 86_400, 900)
    token_timeout = top.number("token_result_timeout_s", 0.5, 300.0, 10.0)
    mqtt = _mqtt(top.table("mqtt"), base_dir)
    store = _store(top.table("store"), base_dir)
    keys = _keys(top)
    meters = _meters(top, _defaults(top.table("modbus")))
    top.finish()
    return GatewayConfig(
        source=source,
        gateway_id=gw,
        poll_interval_s=poll,
        command_max_age_s=max_age,
        token_result_timeout_s=token_timeout,
        mqtt=mqtt,
        store=store,
        trusted_keys=keys,
        meters=meters,
    )


def _mqtt(t: _Table, base: Path) -> MqttConfig:
    url = t.string("url")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise t.error("url", f"scheme must be mqtt:// or mqtts://, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise t.error("url", "put credentials in username / password_file, not in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise t.error("url", f"must be mqtt[s]://host[:port] only, got {url!r}")
    host = parts.hostname
    if not host or not _HOST.fullmatch(host):
        raise t.error("url", f"no valid host in {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise t.error("url", f"port must be 1..65535 in {url!r}") from None
    tls = parts.scheme == "mqtts"
    port = port or (8883 if tls else 1883)
    if port == 0:
        raise t.error("url", f"port must be 1..65535 in {url!r}")
    username = t.string("username", None)
    password = t.string("password", None)
    password_file = t.path("password_file", base, must_exist=True, default=None)
    if password is not None and password_file is not None:
        raise t.error("password_file", "give password or password_file, not both")
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise t.error("password_file", f"cannot read {password_file}: {exc}") from exc
    if password is not None and username is None:
        raise t.error("username", "missing: a password needs a username")
    ca_file = t.path("ca_file", base, must_exist=True, default=None)
    cert_file = t.path("cert_file", base, must_exist=True, default=None)
    key_file = t.path("key_file", base, must_exist=True, default=None)
    if not tls:
        for name, value in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
            if value is not None:
                raise t.error(name, "TLS files need an mqtts:// url")
    if (cert_file is None) != (key_file is None):
        raise t.error(
            "key_file" if key_file is None else "cert_file", "give cert_file and key_file together"
        )
    keepalive = t.integer("keepalive_s", 5, 3600, 30)
    rmin = t.number("reconnect_min_s", 0.05, 3600.0, 0.5)
    rmax = t.number("reconnect_max_s", 0.05, 3600.0, 60.0)
    if rmax < rmin:
        raise t.error("reconnect_max_s", f"must be >= reconnect_min_s ({rmin:g})")
    inflight = t.integer("max_inflight", 1, 100, 10)
    t.finish()
    return MqttConfig(
        host=host,
        port=port,
        tls=tls,
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        keepalive_s=keepalive,
        reconnect_min_s=rmin,
        reconnect_max_s=rmax,
        max_inflight=inflight,
    )


def _store(t: _Table, base: Path) -> StoreConfig:
    path = t.path("path", base, must_exist=False)
    cap = t.integer("outbox_max_bytes", 64 * 1024, 2**40, 64 * 1024 * 1024)
    retention = t.integer("token_retention_days", 1, 3650, 90)
    t.finish()
    return StoreConfig(path=path, outbox_max_bytes=cap, token_retention_days=retention)


def _keys(top: _Table) -> tuple[tuple[int, bytes], ...]:
    keys: dict[int, bytes] = {}
    tables = top.tables("trusted_keys")
    if not tables:
        raise top.error("trusted_keys", "missing: at least one [[trusted_keys]] (id, public_key)")
    for t in tables:
        kid = t.integer("id", 0, U32_MAX)
        text = t.string("public_key")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
            raise t.error("public_key", "must be 64 hex digits (a raw Ed25519 public key)")
        raw = bytes.fromhex(text)
        try:
            messages.load_public_key(raw)
        except (ProtocolError, ValueError) as exc:
            raise t.error("public_key", f"not an Ed25519 public key: {exc}") from exc
        if kid in keys:
            raise t.error("id", f"key id {kid} appears twice")
        keys[kid] = raw
        t.finish()
    return tuple(sorted(keys.items()))


def _defaults(t: _Table) -> RetryPolicy:
    policy = _policy(t, None)
    t.finish()
    return policy


def _policy(t: _Table, base: RetryPolicy | None) -> RetryPolicy:
    def pick(name: str, fallback: float) -> object:
        return fallback if base is None else getattr(base, name)

    timeout = t.number("timeout_s", 0.05, 60.0, pick("timeout_s", 1.0))
    retries = t.integer("retries", 0, 10, pick("retries", 2))
    bmin = t.number("backoff_min_s", 0.05, 3600.0, pick("backoff_min_s", 1.0))
    bmax = t.number("backoff_max_s", 0.05, 86_400.0, pick("backoff_max_s", 120.0))
    if bmax < bmin:
        raise t.error("backoff_max_s", f"must be >= backoff_min_s ({bmin:g})")
    return RetryPolicy(timeout_s=timeout, retries=retries, backoff_min_s=bmin, backoff_max_s=bmax)


def _meters(top: _Table, defaults: RetryPolicy) -> tuple[MeterConfig, ...]:
    tables = top.tables("meters")
    if not tables:
        raise top.error("meters", "missing: at least one [[meters]]")
    if len(tables) > MAX_METERS_PER_GATEWAY:
        raise top.error("meters", f"at most {MAX_METERS_PER_GATEWAY} meters per gateway")
    meters: list[MeterConfig] = []
    ids: dict[int, str] = {}
    units: dict[tuple[object, ...], str] = {}
    lines: dict[str, tuple[RtuAddress, str]] = {}
    for t in tables:
        meter_id = t.integer("id", 1, U64_MAX)
        if meter_id in ids:
            raise t.error("id", f"meter {meter_id} is also {ids[meter_id]}")
        ids[meter_id] = t.prefix
        kind_text = t.string("driver")
        try:
            kind = DriverKind(kind_text)
        except ValueError:
            choices = ", ".join(k.value for k in DriverKind)
            raise t.error("driver", f"must be one of {choices}, got {kind_text!r}") from None
        address: TcpAddress | RtuAddress
        unit = t.integer("unit", 1, 247, 1)  # Modbus over serial line §2.2: 1..247
        if kind is DriverKind.MODBUS_TCP:
            host = t.string("host")
            if not _HOST.fullmatch(host):
                raise t.error("host", f"not a host name or address: {host!r}")
            address = TcpAddress(host=host, port=t.integer("port", 1, 65535, 502), unit=unit)
            where: tuple[object, ...] = ("tcp", address.host, address.port, unit)
        else:
            address = _rtu(t, unit)
            where = ("rtu", address.device, unit)
            other = lines.get(address.device)
            if other is not None and (other[0].baudrate, other[0].parity, other[0].stopbits) != (
                address.baudrate,
                address.parity,
                address.stopbits,
            ):
                raise t.error(
                    "baudrate",
                    f"{address.device} is one RS-485 line: its settings must match {other[1]}",
                )
            lines.setdefault(address.device, (address, t.prefix))
        if where in units:
            raise t.error("unit", f"the same address and unit as {units[where]}")
        units[where] = t.prefix
        meters.append(
            MeterConfig(id=meter_id, driver=kind, address=address, policy=_policy(t, defaults))
        )
        t.finish()
    return tuple(meters)


def _rtu(t: _Table, unit: int) -> RtuAddress:
    device = t.string("device")
    baud = t.integer("baudrate", 1, 10_000_000, 9600)
    if baud not in BAUD_RATES:
        raise t.error("baudrate", f"must be one of {', '.join(map(str, BAUD_RATES))}, got {baud}")
    parity = t.string("parity", "N")
    if parity not in ("N", "E", "O"):
        raise t.error("parity", f"must be N, E or O, got {parity!r}")
    stopbits = t.integer("stopbits", 1, 2, 1)
    return RtuAddress(device=device, baudrate=baud, parity=parity, stopbits=stopbits, unit=unit)


# ------------------------------------------------------------------------------ environment


def runtime_from_env(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> RuntimeEnv:
    """systemd's ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` and the test hook, validated.

    ``environ`` and ``pid`` default to this process's. ``WATCHDOG_PID`` (when set) names
    the process the watchdog is for (sd_watchdog_enabled(3)); any other ignores it.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    notify = environ.get("NOTIFY_SOCKET") or None
    watchdog: int | None = None
    usec = environ.get("WATCHDOG_USEC")
    if usec:
        if not usec.isdigit() or int(usec) == 0:
            raise GatewayConfigError(
                f"environment: WATCHDOG_USEC: not a positive integer: {usec!r}"
            )
        owner = environ.get("WATCHDOG_PID")
        if not owner or owner == str(pid):
            watchdog = int(usec)
    crash: CrashPoint | None = None
    hook = environ.get(CRASH_ENV)
    if hook:
        try:
            crash = CrashPoint(hook)
        except ValueError:
            choices = ", ".join(c.value for c in CrashPoint)
            raise GatewayConfigError(
                f"environment: {CRASH_ENV}: must be one of {choices}, got {hook!r}"
            ) from None
    return RuntimeEnv(notify_socket=notify, watchdog_usec=watchdog, crash_at=crash)
