"""The backend's configuration: one TOML file plus ``VOLTCREDIT_*`` environment variables.

This is the only backend module that reads configuration files or the environment
(house style rule 7). Precedence, lowest first: built-in defaults, the TOML file
(``--config FILE``, else ``$VOLTCREDIT_CONFIG`` if set), then environment variables.
Unknown sections and keys are refused, so a typo never silently falls back to a
default; every problem is a :class:`ConfigError` reading ``SOURCE: KEY: PROBLEM``, e.g.
``backend.toml: http.port: must be an integer in 0..65535, got 'x'``. Relative paths
(the SQLite file inside the database URL, ``keys.dir``) are relative to the working
directory of the process. The README section "backend" lists every key (it is
generated from :data:`KEYS`; :func:`describe` prints the same table).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from backend.domain.auth import parse_api_key
from backend.errors import BackendError

DEFAULT_DATABASE_URL: Final = "sqlite+aiosqlite:///var/voltcredit.db"
#: Environment variable naming the config file when ``--config`` is not given.
CONFIG_ENV: Final = "VOLTCREDIT_CONFIG"
_DRIVERS: Final = ("sqlite+aiosqlite://", "postgresql+asyncpg://")


class ConfigError(BackendError):
    """The configuration file or environment is unreadable or breaks a rule (operator's fault)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """Everything the backend process needs, validated once at start-up."""

    #: Where the values came from (for messages): a file name, or ``defaults``.
    source: str = "defaults"
    database_url: str = DEFAULT_DATABASE_URL
    http_host: str = "127.0.0.1"
    #: 0 picks a free port (tests); the process logs the one it got.
    http_port: int = 8080
    max_body_bytes: int = 64 * 1024
    key_dir: Path = Path("var/keys")
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    #: The MQTT client id (persistent session): unique per backend instance.
    mqtt_client_id: str = "voltcredit-backend"
    #: Consume readings and token results through ``$share/…`` groups (Mosquitto, EMQX;
    #: not the embedded amqtt broker), so several instances split them.
    mqtt_shared_subscriptions: bool = False
    #: Readings stamped more than this after they arrive are quarantined (meter clocks are
    #: synced by gateways); the demo's accelerated meters need a large value.
    ingest_max_clock_ahead_s: int = 900
    #: HMAC key of customer bearer tokens; ``None``: a random one per process (tokens then
    #: die with the process and are not accepted by other instances).
    token_secret: bytes | None = None
    customer_token_ttl_s: int = 15 * 60
    #: How long a signed tariff message stays valid for a meter that has not received it.
    tariff_message_ttl_s: int = 30 * 86400
    #: A ``vck_…`` key made PLATFORM_ADMIN at start-up if it is not stored yet.
    bootstrap_admin_key: str | None = None
    #: Scheduled alert checks: seconds between rounds, and when a meter is stale and a
    #: gateway offline (3 polls of 5 minutes); attempts per webhook notification.
    alert_check_every_s: int = 60
    meter_stale_after_s: int = 900
    gateway_offline_after_s: int = 900
    webhook_max_attempts: int = 8


# ------------------------------------------------------------------------- the key table


def _string(value: object) -> str:
    if type(value) is not str or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


class _Integer:
    """An integer in ``lo..hi``: a TOML integer, or (environment only) its decimal text."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, value: object) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise ValueError(f"must be an integer in {self.lo}..{self.hi}, got {value!r}")
        return value

    def from_text(self, text: str) -> int:
        try:
            return self(int(text.strip(), 10))
        except ValueError:
            raise ValueError(f"must be an integer in {self.lo}..{self.hi}, got {text!r}") from None


def _integer(lo: int, hi: int) -> _Integer:
    return _Integer(lo, hi)


def _database_url(value: object) -> str:
    url = _string(value)
    if not url.startswith(_DRIVERS):
        raise ValueError(f"must start with one of {', '.join(_DRIVERS)}, got {url!r}")
    return url


def _mqtt_url(value: object) -> str:
    url = _string(value)
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"must be mqtt://host[:port] or mqtts://host[:port], got {url!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return url


def _boolean(value: object) -> bool:
    # TOML booleans; in the environment the words true/false (any case) or 1/0.
    if type(value) is bool:
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "1", "false", "0"}:
        return value.strip().lower() in {"true", "1"}
    raise ValueError(f"must be true or false, got {value!r}")


def _client_id(value: object) -> str:
    text = _string(value)
    if len(text) > 64 or not text.isascii() or not text.isprintable() or "/" in text:
        raise ValueError(f"must be 1..64 printable ASCII characters without '/', got {value!r}")
    return text


def _secret(value: object) -> bytes:
    text = _string(value)
    if len(text) < 32:
        raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
    return text.encode()


def _admin_key(value: object) -> str:
    key = _string(value)
    if parse_api_key(key) is None:
        raise ValueError(
            "must be a key like vck_<8 hex>_<43 base64url>, as create-admin-key prints"
        )
    return key


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: TOML ``section.name``, its environment variable, parser, doc."""

    section: str
    name: str
    env: str
    attribute: str
    parse: Callable[[object], object]
    doc: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


#: Every key, in README order. To add one: a field on BackendConfig and a row here.
KEYS: Final = (
    Key(
        "database",
        "url",
        "VOLTCREDIT_DATABASE_URL",
        "database_url",
        _database_url,
        f"SQLAlchemy URL, `sqlite+aiosqlite:///FILE` or `postgresql+asyncpg://…`"
        f" (default `{DEFAULT_DATABASE_URL}`)",
    ),
    Key("http", "host", "VOLTCREDIT_HTTP_HOST", "http_host", _string, "listen address"),
    Key("http", "port", "VOLTCREDIT_HTTP_PORT", "http_port", _integer(0, 65535), "listen port"),
    Key(
        "http",
        "max_body_bytes",
        "VOLTCREDIT_HTTP_MAX_BODY_BYTES",
        "max_body_bytes",
        _integer(1024, 16 * 1024 * 1024),
        "largest request body; larger ones get 413",
    ),
    Key(
        "keys",
        "dir",
        "VOLTCREDIT_KEY_DIR",
        "key_dir",
        lambda v: Path(_string(v)),
        "signing-key store (`voltcredit keys`), mode 0700",
    ),
    Key("mqtt", "url", "VOLTCREDIT_MQTT_URL", "mqtt_url", _mqtt_url, "broker, mqtt:// or mqtts://"),
    Key(
        "mqtt",
        "client_id",
        "VOLTCREDIT_MQTT_CLIENT_ID",
        "mqtt_client_id",
        _client_id,
        "MQTT client id; unique per backend instance (default voltcredit-backend)",
    ),
    Key(
        "ingest",
        "max_clock_ahead_s",
        "VOLTCREDIT_INGEST_MAX_CLOCK_AHEAD_S",
        "ingest_max_clock_ahead_s",
        _integer(0, 2**32 - 1),
        "readings stamped later than this after arrival are quarantined (default 900)",
    ),
    Key(
        "mqtt",
        "shared_subscriptions",
        "VOLTCREDIT_MQTT_SHARED_SUBSCRIPTIONS",
        "mqtt_shared_subscriptions",
        _boolean,
        "consume through $share groups so instances split the load (not on amqtt)",
    ),
    Key(
        "auth",
        "token_secret",
        "VOLTCREDIT_TOKEN_SECRET",
        "token_secret",
        _secret,
        "HMAC key of customer tokens, >= 32 characters; unset: random per process",
    ),
    Key(
        "auth",
        "customer_token_ttl_s",
        "VOLTCREDIT_CUSTOMER_TOKEN_TTL_S",
        "customer_token_ttl_s",
        _integer(60, 86400),
        "customer bearer token lifetime (default 900)",
    ),
    Key(
        "auth",
        "bootstrap_admin_key",
        "VOLTCREDIT_BOOTSTRAP_ADMIN_KEY",
        "bootstrap_admin_key",
        _admin_key,
        "a vck_ key stored as PLATFORM_ADMIN at start-up if absent",
    ),
    Key(
        "tokens",
        "tariff_message_ttl_s",
        "VOLTCREDIT_TARIFF_MESSAGE_TTL_S",
        "tariff_message_ttl_s",
        _integer(3600, 366 * 86400),
        "validity of signed tariff messages (default 30 days)",
    ),
    Key(
        "alerts",
        "check_every_s",
        "VOLTCREDIT_ALERT_CHECK_EVERY_S",
        "alert_check_every_s",
        _integer(1, 86400),
        "seconds between rounds of alert checks (default 60)",
    ),
    Key(
        "alerts",
        "meter_stale_s",
        "VOLTCREDIT_METER_STALE_S",
        "meter_stale_after_s",
        _integer(60, 30 * 86400),
        "no reading for this long raises METER_STALE (default 900)",
    ),
    Key(
        "alerts",
        "gateway_offline_s",
        "VOLTCREDIT_GATEWAY_OFFLINE_S",
        "gateway_offline_after_s",
        _integer(60, 30 * 86400),
        "offline or silent this long raises GATEWAY_OFFLINE (default 900)",
    ),
    Key(
        "alerts",
        "webhook_max_attempts",
        "VOLTCREDIT_WEBHOOK_MAX_ATTEMPTS",
        "webhook_max_attempts",
        _integer(1, 50),
        "attempts per alert notification before it is given up (default 8)",
    ),
)


def describe() -> str:
    """The key table as Markdown rows (``| TOML key | environment | meaning |``)."""
    return "\n".join(f"| `{k.dotted}` | `{k.env}` | {k.doc} |" for k in KEYS)


# ------------------------------------------------------------------------------- loading


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _from_file(path: Path) -> dict[str, object]:
    data = _read_file(path)
    by_section: dict[str, dict[str, Key]] = {}
    for key in KEYS:
        by_section.setdefault(key.section, {})[key.name] = key
    values: dict[str, object] = {}
    for section, table in data.items():
        known = by_section.get(section)
        if known is None:
            raise ConfigError(
                f"{path}: [{section}]: unknown section (known: {', '.join(sorted(by_section))})"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}: must be a table [{section}]")
        for name, value in table.items():
            found = known.get(name)
            if found is None:
                raise ConfigError(
                    f"{path}: {section}.{name}: unknown key (known: {', '.join(sorted(known))})"
                )
            try:
                values[found.attribute] = found.parse(value)
            except ValueError as exc:
                raise ConfigError(f"{path}: {found.dotted}: {exc}") from exc
    return values


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> BackendConfig:
    """Defaults, then ``path`` (or ``$VOLTCREDIT_CONFIG``), then the environment."""
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    values: dict[str, object] = {}
    source = "defaults"
    if path is not None:
        values.update(_from_file(path))
        source = str(path)
    for key in KEYS:
        raw = env.get(key.env)
        if raw is None or raw == "":
            continue
        try:
            parse = key.parse
            values[key.attribute] = (
                parse.from_text(raw) if isinstance(parse, _Integer) else parse(raw)
            )
        except ValueError as exc:
            raise ConfigError(f"environment: {key.env}: {exc}") from exc
    return BackendConfig(source=source, **values)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemdEnv:
    """What systemd tells a ``Type=notify`` service through its environment (sd_notify(3))."""

    notify_socket: str | None = None
    #: The watchdog interval in microseconds, if this process is the one watched.
    watchdog_usec: int | None = None


def systemd_env(environ: Mapping[str, str] | None = None, pid: int | None = None) -> SystemdEnv:
    """``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``, validated (``environ``/``pid``: this process's).

    ``WATCHDOG_PID`` (when set) names the process the watchdog is for
    (sd_watchdog_enabled(3)); any other process ignores the interval.
    """
    env = os.environ if environ is None else environ
    watchdog: int | None = None
    usec = env.get("WATCHDOG_USEC")
    if usec:
        if not (usec.isascii() and usec.isdigit()) or int(usec) == 0:
            raise ConfigError(f"environment: WATCHDOG_USEC: not a positive integer: {usec!r}")
        owner = env.get("WATCHDOG_PID")
        if not owner or owner == str(os.getpid() if pid is None else pid):
            watchdog = int(usec)
    return SystemdEnv(notify_socket=env.get("NOTIFY_SOCKET") or None, watchdog_usec=watchdog)
