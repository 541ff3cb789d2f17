"""The MQTT topic scheme under ``vc/v1`` (DESIGN §5, MQTT.md §2): builders, filters, parser.

Publishers call the builder functions (they return the ``str`` paho wants); consumers
call :func:`parse_topic` on every incoming topic and ``match`` on the typed result.
Building with a bad id is our fault (:class:`UnitError`); parsing a topic that is not
exactly one of ours is the peer's (:class:`MalformedError`). Wildcard filters are for
subscribing only and never parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Final

from firmware_protocol.errors import MalformedError, UnitError, UnknownVersionError

#: Every topic starts with this root; the second level is the contract version.
ROOT: Final = "vc/v1"
#: Every publish and subscription of the contract uses QoS 1 (at least once): all
#: consumers are idempotent (MQTT.md §4), so duplicates are harmless and nothing is lost.
QOS: Final = 1
#: Shared-subscription group of the backend instances consuming readings (MQTT 5 §4.8.2).
INGEST_GROUP: Final = "ingest"
MAX_GATEWAY_ID_LEN: Final = 64
U64_MAX: Final = 2**64 - 1

_GATEWAY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Decimal, no sign, no leading zeros (so each meter has exactly one topic), at most 20 digits;
# the u64 bound is checked after int(). ``[0-9]`` rather than ``\d``: \d admits non-ASCII digits.
_METER_ID = re.compile(r"[1-9][0-9]{0,19}")
_VERSION_LEVEL = re.compile(r"v[0-9]+")


def check_gateway_id(gw: object) -> str:
    """Return ``gw`` if it is a valid gateway id (1..64 of ``[A-Za-z0-9_-]``), else raise UnitError.

    The charset keeps ids free of the MQTT separators and wildcards (``/ + #``) and of
    anything a Mosquitto ACL pattern (``%c``/``%u``) or a file name would trip over.
    """
    if type(gw) is not str or _GATEWAY_ID.fullmatch(gw) is None:
        raise UnitError(f"gateway id must be 1..64 characters of [A-Za-z0-9_-], got {gw!r}")
    return gw


def check_meter_id(meter: object) -> int:
    """Return ``meter`` if it is a meter serial number (an int in 1..2**64-1), else UnitError."""
    if type(meter) is not int or not 1 <= meter <= U64_MAX:
        raise UnitError(f"meter id must be an integer in 1..{U64_MAX}, got {meter!r}")
    return meter


# ------------------------------------------------------------------ topic names (publish)


def gateway_state_topic(gw: str) -> str:
    """``vc/v1/gw/{gw}/state``: the gateway's retained birth / Will / clean-stop state."""
    return f"{ROOT}/gw/{check_gateway_id(gw)}/state"


def readings_topic(gw: str) -> str:
    """``vc/v1/gw/{gw}/readings``: batches of meter readings from one gateway."""
    return f"{ROOT}/gw/{check_gateway_id(gw)}/readings"


def token_topic(gw: str, meter: int) -> str:
    """``vc/v1/gw/{gw}/meter/{meter}/token``: a signed message for one meter."""
    return f"{ROOT}/gw/{check_gateway_id(gw)}/meter/{check_meter_id(meter)}/token"


def token_result_topic(gw: str, meter: int) -> str:
    """``vc/v1/gw/{gw}/meter/{meter}/token/result``: what the meter did with it."""
    return f"{ROOT}/gw/{check_gateway_id(gw)}/meter/{check_meter_id(meter)}/token/result"


def command_topic(gw: str) -> str:
    """``vc/v1/gw/{gw}/cmd``: a command to the gateway or one of its meters."""
    return f"{ROOT}/gw/{check_gateway_id(gw)}/cmd"


def command_result_topic(gw: str) -> str:
    """``vc/v1/gw/{gw}/cmd/result``: the outcome of a command."""
    return f"{ROOT}/gw/{check_gateway_id(gw)}/cmd/result"


#: ``vc/v1/backend/state``: the backend's retained online flag (and its Will).
BACKEND_STATE_TOPIC: Final = f"{ROOT}/backend/state"

# ------------------------------------------------------------------ filters (subscribe)

#: Every gateway's readings; what one backend instance subscribes to on a broker
#: without shared subscriptions (the embedded amqtt broker is MQTT 3.1.1 only).
READINGS_FILTER: Final = f"{ROOT}/gw/+/readings"
#: The same, load-balanced over all backend instances (MQTT 5 §4.8.2, Mosquitto on 3.1.1 too).
READINGS_SHARED_FILTER: Final = f"$share/{INGEST_GROUP}/{READINGS_FILTER}"
#: Every gateway's retained state. Subscribe without ``$share``: brokers do not send
#: retained messages to shared subscriptions (MQTT 5 §4.8.2), and every instance wants them.
GATEWAY_STATE_FILTER: Final = f"{ROOT}/gw/+/state"
#: Every token result of every gateway.
TOKEN_RESULT_FILTER: Final = f"{ROOT}/gw/+/meter/+/token/result"
#: Every command result of every gateway.
COMMAND_RESULT_FILTER: Final = f"{ROOT}/gw/+/cmd/result"


def shared_filter(topic_filter: str, group: str = INGEST_GROUP) -> str:
    """``$share/{group}/{topic_filter}``: one subscriber of the group gets each message."""
    check_gateway_id(group)  # same safe charset: no '/', '+', '#'
    return f"$share/{group}/{topic_filter}"


def gateway_subscriptions(gw: str) -> tuple[str, ...]:
    """The filters gateway ``gw`` subscribes to: its meters' tokens, its commands, the backend.

    ``meter/+/token`` matches exactly one level after ``meter`` and ends at ``token``, so the
    gateway does not hear its own ``token/result`` publications.
    """
    check_gateway_id(gw)
    return (f"{ROOT}/gw/{gw}/meter/+/token", f"{ROOT}/gw/{gw}/cmd", BACKEND_STATE_TOPIC)


# ------------------------------------------------------------------ typed topics (parse)


@dataclass(frozen=True, slots=True)
class GatewayStateTopic:
    """``vc/v1/gw/{gw}/state``."""

    retained: ClassVar[bool] = True
    gw: str

    def __post_init__(self) -> None:
        check_gateway_id(self.gw)

    def __str__(self) -> str:
        return gateway_state_topic(self.gw)


@dataclass(frozen=True, slots=True)
class ReadingsTopic:
    """``vc/v1/gw/{gw}/readings``."""

    retained: ClassVar[bool] = False
    gw: str

    def __post_init__(self) -> None:
        check_gateway_id(self.gw)

    def __str__(self) -> str:
        return readings_topic(self.gw)


@dataclass(frozen=True, slots=True)
class TokenTopic:
    """``vc/v1/gw/{gw}/meter/{meter}/token``. Never retained: a retained token would be
    re-delivered to every new session; the persistent session queues it instead."""

    retained: ClassVar[bool] = False
    gw: str
    meter: int

    def __post_init__(self) -> None:
        check_gateway_id(self.gw)
        check_meter_id(self.meter)

    def __str__(self) -> str:
        return token_topic(self.gw, self.meter)


@dataclass(frozen=True, slots=True)
class TokenResultTopic:
    """``vc/v1/gw/{gw}/meter/{meter}/token/result``."""

    retained: ClassVar[bool] = False
    gw: str
    meter: int

    def __post_init__(self) -> None:
        check_gateway_id(self.gw)
        check_meter_id(self.meter)

    def __str__(self) -> str:
        return token_result_topic(self.gw, self.meter)


@dataclass(frozen=True, slots=True)
class CommandTopic:
    """``vc/v1/gw/{gw}/cmd``."""

    retained: ClassVar[bool] = False
    gw: str

    def __post_init__(self) -> None:
        check_gateway_id(self.gw)

    def __str__(self) -> str:
        return command_topic(self.gw)


@dataclass(frozen=True, slots=True)
class CommandResultTopic:
    """``vc/v1/gw/{gw}/cmd/result``."""

    retained: ClassVar[bool] = False
    gw: str

    def __post_init__(self) -> None:
        check_gateway_id(self.gw)

    def __str__(self) -> str:
        return command_result_topic(self.gw)


@dataclass(frozen=True, slots=True)
class BackendStateTopic:
    """``vc/v1/backend/state``."""

    retained: ClassVar[bool] = True

    def __str__(self) -> str:
        return BACKEND_STATE_TOPIC


Topic = (
    GatewayStateTopic
    | ReadingsTopic
    | TokenTopic
    | TokenResultTopic
    | CommandTopic
    | CommandResultTopic
    | BackendStateTopic
)


def parse_topic(topic: str) -> Topic:
    """The typed topic of a concrete topic name; anything not exactly ours is MalformedError.

    A root of ``vc/v{n}`` with ``n != 1`` raises :class:`UnknownVersionError` (a subclass),
    so a node can tell "newer contract" from "garbage".
    """
    levels = topic.split("/")
    if "+" in topic or "#" in topic:
        raise MalformedError(f"topic {topic!r} contains a wildcard; only filters may")
    if len(levels) < 3 or levels[0] != "vc":
        raise MalformedError(f"topic {topic!r} is not under {ROOT}/")
    if levels[1] != "v1":
        if _VERSION_LEVEL.fullmatch(levels[1]):
            raise UnknownVersionError(f"topic {topic!r}: this build speaks {ROOT} only")
        raise MalformedError(f"topic {topic!r} is not under {ROOT}/")
    rest = levels[2:]
    try:
        if rest == ["backend", "state"]:
            return BackendStateTopic()
        if rest[0] == "gw" and len(rest) >= 3:
            gw = rest[1]
            tail = rest[2:]
            if tail == ["state"]:
                return GatewayStateTopic(gw)
            if tail == ["readings"]:
                return ReadingsTopic(gw)
            if tail == ["cmd"]:
                return CommandTopic(gw)
            if tail == ["cmd", "result"]:
                return CommandResultTopic(gw)
            if len(tail) >= 3 and tail[0] == "meter" and tail[2] == "token":
                if tail[3:] == []:
                    return TokenTopic(gw, _parse_meter(tail[1]))
                if tail[3:] == ["result"]:
                    return TokenResultTopic(gw, _parse_meter(tail[1]))
    except UnitError as exc:
        raise MalformedError(f"topic {topic!r}: {exc}") from exc
    raise MalformedError(f"topic {topic!r} is not a {ROOT} topic")


def _parse_meter(level: str) -> int:
    if _METER_ID.fullmatch(level) is None:
        raise UnitError(f"meter id must be decimal without sign or leading zeros, got {level!r}")
    return check_meter_id(int(level))
