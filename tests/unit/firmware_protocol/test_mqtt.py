"""MQTT contract: topic names and filters, exact payload bytes, round trips, every refusal."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from firmware_protocol import errors, mqtt, mqtt_topics
from firmware_protocol.mqtt import (
    BackendState,
    Command,
    CommandKind,
    CommandResult,
    GatewayState,
    MeterPresence,
    Reading,
    ReadingBatch,
    Relay,
    TimeSyncArgs,
    TokenDelivery,
    TokenResult,
)
from firmware_protocol.mqtt_topics import (
    BackendStateTopic,
    CommandResultTopic,
    CommandTopic,
    GatewayStateTopic,
    ReadingsTopic,
    TokenResultTopic,
    TokenTopic,
    parse_topic,
)
from firmware_protocol.status import TokenStatus

U32 = 2**32 - 1
U64 = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_WH = 2**48
TS = 1_700_000_000

# ===================================================================== topics


def test_topic_names_are_exact() -> None:
    assert mqtt_topics.gateway_state_topic("gw-1") == "vc/v1/gw/gw-1/state"
    assert mqtt_topics.readings_topic("gw-1") == "vc/v1/gw/gw-1/readings"
    assert mqtt_topics.token_topic("gw-1", 42) == "vc/v1/gw/gw-1/meter/42/token"
    assert mqtt_topics.token_result_topic("gw-1", 42) == "vc/v1/gw/gw-1/meter/42/token/result"
    assert mqtt_topics.command_topic("gw-1") == "vc/v1/gw/gw-1/cmd"
    assert mqtt_topics.command_result_topic("gw-1") == "vc/v1/gw/gw-1/cmd/result"
    assert mqtt_topics.BACKEND_STATE_TOPIC == "vc/v1/backend/state"
    assert mqtt_topics.QOS == 1


def test_filters_are_exact() -> None:
    assert mqtt_topics.READINGS_FILTER == "vc/v1/gw/+/readings"
    assert mqtt_topics.READINGS_SHARED_FILTER == "$share/ingest/vc/v1/gw/+/readings"
    assert mqtt_topics.GATEWAY_STATE_FILTER == "vc/v1/gw/+/state"
    # S105 suppressed: a topic filter, not a password ("TOKEN" in the name trips bandit)
    assert mqtt_topics.TOKEN_RESULT_FILTER == "vc/v1/gw/+/meter/+/token/result"  # noqa: S105
    assert mqtt_topics.COMMAND_RESULT_FILTER == "vc/v1/gw/+/cmd/result"
    assert mqtt_topics.shared_filter("vc/v1/gw/+/cmd/result", "results") == (
        "$share/results/vc/v1/gw/+/cmd/result"
    )
    assert mqtt_topics.gateway_subscriptions("gw-1") == (
        "vc/v1/gw/gw-1/meter/+/token",
        "vc/v1/gw/gw-1/cmd",
        "vc/v1/backend/state",
    )


def test_filters_match_what_they_should_and_nothing_else() -> None:
    """Checked with paho's own matcher, the one the gateway and backend run."""
    token, result = "vc/v1/gw/g/meter/7/token", "vc/v1/gw/g/meter/7/token/result"
    token_filter, cmd_filter, backend_filter = mqtt_topics.gateway_subscriptions("g")
    assert topic_matches_sub(token_filter, token)
    assert not topic_matches_sub(token_filter, result)  # a gateway does not hear itself
    assert not topic_matches_sub(token_filter, "vc/v1/gw/other/meter/7/token")
    assert topic_matches_sub(cmd_filter, "vc/v1/gw/g/cmd")
    assert not topic_matches_sub(cmd_filter, "vc/v1/gw/g/cmd/result")
    assert topic_matches_sub(backend_filter, "vc/v1/backend/state")
    assert topic_matches_sub(mqtt_topics.READINGS_FILTER, "vc/v1/gw/g/readings")
    shared = mqtt_topics.READINGS_SHARED_FILTER.split("/", 2)[2]
    assert shared == mqtt_topics.READINGS_FILTER
    assert topic_matches_sub(mqtt_topics.TOKEN_RESULT_FILTER, result)
    assert not topic_matches_sub(mqtt_topics.TOKEN_RESULT_FILTER, token)
    assert topic_matches_sub(mqtt_topics.GATEWAY_STATE_FILTER, "vc/v1/gw/g/state")
    assert topic_matches_sub(mqtt_topics.COMMAND_RESULT_FILTER, "vc/v1/gw/g/cmd/result")


def test_retained_flags() -> None:
    retained = {
        cls
        for cls in (
            GatewayStateTopic,
            ReadingsTopic,
            TokenTopic,
            TokenResultTopic,
            CommandTopic,
            CommandResultTopic,
            BackendStateTopic,
        )
        if cls.retained
    }
    assert retained == {GatewayStateTopic, BackendStateTopic}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vc/v1/gw/gw-1/state", GatewayStateTopic("gw-1")),
        ("vc/v1/gw/gw-1/readings", ReadingsTopic("gw-1")),
        ("vc/v1/gw/gw-1/meter/42/token", TokenTopic("gw-1", 42)),
        ("vc/v1/gw/gw-1/meter/42/token/result", TokenResultTopic("gw-1", 42)),
        ("vc/v1/gw/gw-1/cmd", CommandTopic("gw-1")),
        ("vc/v1/gw/gw-1/cmd/result", CommandResultTopic("gw-1")),
        ("vc/v1/backend/state", BackendStateTopic()),
        (f"vc/v1/gw/{'x' * 64}/meter/{U64}/token", TokenTopic("x" * 64, U64)),
    ],
)
def test_parse_topic(text: str, expected: mqtt_topics.Topic) -> None:
    assert parse_topic(text) == expected
    assert str(expected) == text


gateway_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
meter_ids = st.integers(1, U64)


@given(gateway_ids, meter_ids)
def test_topic_round_trip(gw: str, meter: int) -> None:
    for topic in (
        GatewayStateTopic(gw),
        ReadingsTopic(gw),
        TokenTopic(gw, meter),
        TokenResultTopic(gw, meter),
        CommandTopic(gw),
        CommandResultTopic(gw),
    ):
        assert parse_topic(str(topic)) == topic


@pytest.mark.parametrize(
    "text",
    [
        "",
        "vc",
        "vc/v1",
        "vc/v1/",
        "/vc/v1/backend/state",
        "vc/v1/backend/state/",
        "vc/v1/backend",
        "VC/v1/backend/state",
        "vc/V1/backend/state",
        "vc/vx/backend/state",
        "xx/v1/gw/g/state",
        "$share/ingest/vc/v1/gw/g/readings",
        "vc/v1/gw/+/readings",  # a filter, not a topic
        "vc/v1/gw/g/#",
        "vc/v1/gw/g+/state",
        "vc/v1/gw//state",  # empty level
        "vc/v1/gw/g//state",
        "vc/v1/gw/g",
        "vc/v1/gw/g/status",
        "vc/v1/gw/g/cmd/result/x",
        "vc/v1/gw/g/cmd/other",
        "vc/v1/other/g/state",
        "vc/v1/gw/g.1/state",  # '.' is outside the gateway-id charset
        "vc/v1/gw/gw 1/state",
        "vc/v1/gw/gw\x00/state",
        f"vc/v1/gw/{'x' * 65}/state",
        "vc/v1/gw/g/meter/0/token",  # meter ids start at 1
        "vc/v1/gw/g/meter/007/token",  # leading zeros: two names for one meter
        "vc/v1/gw/g/meter/-1/token",
        "vc/v1/gw/g/meter/+7/token",
        "vc/v1/gw/g/meter/1.5/token",
        "vc/v1/gw/g/meter/0x1f/token",
        "vc/v1/gw/g/meter/\u0661\u0662/token",  # Arabic-Indic digits: int() would take them
        f"vc/v1/gw/g/meter/{2**64}/token",  # u64 overflow, 20 digits
        f"vc/v1/gw/g/meter/1{'0' * 20}/token",  # 21 digits
        "vc/v1/gw/g/meter//token",
        "vc/v1/gw/g/meter/7",
        "vc/v1/gw/g/meter/7/tokens",
        "vc/v1/gw/g/meters/7/token",
        "vc/v1/gw/g/meter/7/token/results",
        "vc/v1/gw/g/meter/7/token/result/x",
    ],
)
def test_parse_topic_refuses(text: str) -> None:
    with pytest.raises(errors.MalformedError) as info:
        parse_topic(text)
    assert type(info.value) is errors.MalformedError
    assert info.value.peer_fault


def test_parse_topic_names_other_versions() -> None:
    with pytest.raises(errors.UnknownVersionError):
        parse_topic("vc/v2/gw/g/state")
    with pytest.raises(errors.UnknownVersionError):
        parse_topic("vc/v10/backend/state")


@pytest.mark.parametrize("gw", ["", "a/b", "a+b", "#", "é", "x" * 65, 7, None, b"gw"])
def test_builders_refuse_bad_gateway_ids(gw: Any) -> None:
    for build in (
        mqtt_topics.gateway_state_topic,
        mqtt_topics.readings_topic,
        mqtt_topics.command_topic,
        mqtt_topics.command_result_topic,
        mqtt_topics.gateway_subscriptions,
        GatewayStateTopic,
        ReadingsTopic,
        CommandTopic,
        CommandResultTopic,
    ):
        with pytest.raises(errors.UnitError, match="gateway id"):
            build(gw)
    with pytest.raises(errors.UnitError):
        mqtt_topics.token_topic(gw, 1)
    with pytest.raises(errors.UnitError):
        TokenResultTopic(gw, 1)


@pytest.mark.parametrize("meter", [0, -1, 2**64, True, "7", 7.0, None])
def test_builders_refuse_bad_meter_ids(meter: Any) -> None:
    for build in (
        mqtt_topics.token_topic,
        mqtt_topics.token_result_topic,
        TokenTopic,
        TokenResultTopic,
    ):
        with pytest.raises(errors.UnitError, match="meter id"):
            build("g", meter)


def test_shared_filter_refuses_bad_group() -> None:
    with pytest.raises(errors.UnitError):
        mqtt_topics.shared_filter(mqtt_topics.READINGS_FILTER, "a/b")


# ===================================================================== example messages


def reading(**changes: Any) -> Reading:
    fields: dict[str, Any] = {
        "meter": 12345678,
        "ts": TS,
        "import_wh": 1_234_567,
        "band_wh": (1_000_000, 234_567),
        "credit_milli": -1500,
        "relay": Relay.CLOSED,
        "power_w": 1500,
        "voltage_dv": 2301,
        "current_ma": 6520,
        "tariff_id": 3,
        "last_token_id": 17,
        "status_flags": 4,
        "block_period": 24286,
        "block_period_wh": 5432,
    }
    fields.update(changes)
    return Reading(**fields)


BATCH = ReadingBatch(gw="gw-1", seq=5, historical=False, readings=(reading(),))
BIRTH = GatewayState(
    online=True,
    boot_seq=3,
    ts=TS,
    fw="vc-gw 0.1.0",
    meters=(
        MeterPresence(meter=7, reachable=True),
        MeterPresence(meter=12345678, reachable=False),
    ),
)
WILL = GatewayState(online=False, boot_seq=3, ts=TS)
DELIVERY = TokenDelivery(msg=b"\x01\x02\xfe\xff", token_id=9, meter=12345678)
RESULT = TokenResult(
    token_id=9, meter=12345678, status=TokenStatus.ACCEPTED, credit_after_milli=2_500_000, ts=TS
)
SYNC = Command(id="c-1", kind=CommandKind.TIME_SYNC, ts=TS, meter=7, args=TimeSyncArgs(ts=TS + 1))
CMD_RESULT = CommandResult(id="c-1", ok=False, detail="meter 7 not reachable", ts=TS)
BACKEND = BackendState(online=True, ts=TS)

EXACT: list[tuple[mqtt.Message, bytes]] = [
    (
        BATCH,
        (
            b'{"gw":"gw-1","historical":false,"readings":[{"band_wh":[1000000,234567],'
            b'"block_period":24286,"block_period_wh":5432,"credit_milli":-1500,"current_ma":6520,'
            b'"import_wh":1234567,"last_token_id":17,"meter":12345678,"power_w":1500,'
            b'"relay":"closed","status_flags":4,"tariff_id":3,"ts":1700000000,"voltage_dv":2301}],'
            b'"seq":5,"v":1}'
        ),
    ),
    (
        BIRTH,
        (
            b'{"boot_seq":3,"fw":"vc-gw 0.1.0","meters":[{"meter":7,"reachable":true},'
            b'{"meter":12345678,"reachable":false}],"online":true,"ts":1700000000,"v":1}'
        ),
    ),
    (WILL, b'{"boot_seq":3,"online":false,"ts":1700000000,"v":1}'),
    (DELIVERY, b'{"meter":12345678,"msg":"AQL+/w==","token_id":9,"v":1}'),
    (
        RESULT,
        (
            b'{"credit_after_milli":2500000,"meter":12345678,"status":"accepted",'
            b'"token_id":9,"ts":1700000000,"v":1}'
        ),
    ),
    (
        TokenResult(
            token_id=9,
            meter=1,
            status=TokenStatus.BAD_SIGNATURE,
            credit_after_milli=None,
            ts=0,
        ),
        b'{"credit_after_milli":null,"meter":1,"status":"bad_signature","token_id":9,"ts":0,"v":1}',
    ),
    (
        SYNC,
        b'{"args":{"ts":1700000001},"id":"c-1","kind":"time_sync","meter":7,"ts":1700000000,"v":1}',
    ),
    (
        Command(id="c-2", kind=CommandKind.REBIRTH, ts=TS),
        b'{"id":"c-2","kind":"rebirth","ts":1700000000,"v":1}',
    ),
    (
        CMD_RESULT,
        b'{"detail":"meter 7 not reachable","id":"c-1","ok":false,"ts":1700000000,"v":1}',
    ),
    (
        CommandResult(id="c-3", ok=True, detail="Zähler 7 \u26a1", ts=1),
        '{"detail":"Zähler 7 \u26a1","id":"c-3","ok":true,"ts":1,"v":1}'.encode(),
    ),
    (BACKEND, b'{"online":true,"ts":1700000000,"v":1}'),
]

DECODERS: dict[type, Any] = {
    ReadingBatch: mqtt.decode_reading_batch,
    GatewayState: mqtt.decode_gateway_state,
    TokenDelivery: mqtt.decode_token_delivery,
    TokenResult: mqtt.decode_token_result,
    Command: mqtt.decode_command,
    CommandResult: mqtt.decode_command_result,
    BackendState: mqtt.decode_backend_state,
}


@pytest.mark.parametrize(("msg", "data"), EXACT)
def test_exact_json(msg: mqtt.Message, data: bytes) -> None:
    assert mqtt.encode(msg) == data
    assert DECODERS[type(msg)](data) == msg


def test_every_message_type_has_an_exact_example() -> None:
    assert {type(msg) for msg, _ in EXACT} == set(DECODERS)


def test_non_canonical_input_is_accepted_and_re_encoded_canonically() -> None:
    data = b' { "v" : 1 , "ts" : 1700000000, "online" : true }\n'
    assert mqtt.decode_backend_state(data) == BACKEND
    assert mqtt.encode(BACKEND) == b'{"online":true,"ts":1700000000,"v":1}'


def test_escaped_characters_decode_to_raw_utf8() -> None:
    data = b'{"detail":"Z\\u00e4hler","id":"c","ok":true,"ts":1,"v":1}'
    msg = mqtt.decode_command_result(data)
    assert msg.detail == "Zähler"
    assert mqtt.encode(msg) == '{"detail":"Zähler","id":"c","ok":true,"ts":1,"v":1}'.encode()


# ===================================================================== round trips

band_lists = st.lists(st.integers(0, MAX_WH), min_size=1, max_size=8).map(tuple)
readings = st.builds(
    Reading,
    meter=meter_ids,
    ts=st.integers(0, U32),
    import_wh=st.integers(0, MAX_WH),
    band_wh=band_lists,
    credit_milli=st.integers(I64_MIN, I64_MAX),
    relay=st.sampled_from(Relay),
    power_w=st.integers(0, U32),
    voltage_dv=st.integers(0, U32),
    current_ma=st.integers(0, U32),
    tariff_id=st.integers(0, U32),
    last_token_id=st.integers(0, U32),
    status_flags=st.integers(0, 2**16 - 1),
    block_period=st.integers(0, U32),
    block_period_wh=st.integers(0, MAX_WH),
)
batches = st.builds(
    ReadingBatch,
    gw=gateway_ids,
    seq=st.integers(0, I64_MAX),
    historical=st.booleans(),
    readings=st.lists(readings, min_size=1, max_size=20, unique_by=lambda r: (r.meter, r.ts)).map(
        tuple
    ),
)
presences = st.lists(
    st.builds(MeterPresence, meter=meter_ids, reachable=st.booleans()),
    max_size=10,
    unique_by=lambda p: p.meter,
).map(lambda ps: tuple(sorted(ps, key=lambda p: p.meter)))
firmware = st.from_regex(r"[ -~]{1,64}", fullmatch=True)
timestamps = st.integers(0, U32)
gateway_states = st.one_of(
    st.builds(
        GatewayState,
        online=st.just(value=True),
        boot_seq=st.integers(0, U32),
        ts=timestamps,
        fw=firmware,
        meters=presences,
    ),
    st.builds(
        GatewayState,
        online=st.just(value=False),
        boot_seq=st.integers(0, U32),
        ts=timestamps,
        fw=st.none() | firmware,
    ),
)
deliveries = st.builds(
    TokenDelivery,
    msg=st.binary(min_size=1, max_size=512),
    token_id=st.integers(0, U32),
    meter=meter_ids,
)
token_results = st.builds(
    TokenResult,
    token_id=st.integers(0, U32),
    meter=meter_ids,
    status=st.sampled_from(TokenStatus),
    credit_after_milli=st.none() | st.integers(I64_MIN, I64_MAX),
    ts=timestamps,
)
command_ids = st.from_regex(r"[!-~]{1,64}", fullmatch=True)


@st.composite
def commands(draw: st.DrawFn) -> Command:
    kind = draw(st.sampled_from(CommandKind))
    meter: int | None
    if kind is CommandKind.REBIRTH:
        meter = None
    elif kind is CommandKind.POLL_NOW:
        meter = draw(st.none() | meter_ids)
    else:
        meter = draw(meter_ids)
    args = TimeSyncArgs(ts=draw(timestamps)) if kind is CommandKind.TIME_SYNC else None
    return Command(id=draw(command_ids), kind=kind, ts=draw(timestamps), meter=meter, args=args)


command_results = st.builds(
    CommandResult,
    id=command_ids,
    ok=st.booleans(),
    detail=st.text(
        st.characters(exclude_categories=("C", "Z"), include_characters=" "), max_size=256
    ),
    ts=timestamps,
)
backend_states = st.builds(BackendState, online=st.booleans(), ts=timestamps)
messages = st.one_of(
    batches,
    gateway_states,
    deliveries,
    token_results,
    commands(),
    command_results,
    backend_states,
)


@given(messages)
def test_round_trip(msg: mqtt.Message) -> None:
    data = mqtt.encode(msg)
    decoded = DECODERS[type(msg)](data)
    assert decoded == msg
    assert mqtt.encode(decoded) == data
    # canonical form: what json.dumps with sorted keys and compact separators gives
    canonical = json.dumps(
        json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert canonical.encode() == data


def test_widest_messages_fit_the_payload_bound() -> None:
    widest = ReadingBatch(
        gw="x" * 64,
        seq=I64_MAX,
        historical=False,
        readings=tuple(
            Reading(
                meter=U64 - i,
                ts=U32,
                import_wh=MAX_WH,
                band_wh=(MAX_WH,) * 8,
                credit_milli=I64_MIN,
                relay=Relay.CLOSED,
                power_w=U32,
                voltage_dv=U32,
                current_ma=U32,
                tariff_id=U32,
                last_token_id=U32,
                status_flags=2**16 - 1,
                block_period=U32,
                block_period_wh=MAX_WH,
            )
            for i in range(mqtt.MAX_READINGS_PER_BATCH)
        ),
    )
    data = mqtt.encode(widest)
    assert len(data) <= mqtt.MAX_PAYLOAD_BYTES
    assert mqtt.decode_reading_batch(data) == widest
    state = GatewayState(
        online=True,
        boot_seq=U32,
        ts=U32,
        fw="x" * 64,
        meters=tuple(
            MeterPresence(meter=U64 - mqtt.MAX_METERS_PER_GATEWAY + i, reachable=False)
            for i in range(mqtt.MAX_METERS_PER_GATEWAY)
        ),
    )
    assert len(mqtt.encode(state)) <= mqtt.MAX_PAYLOAD_BYTES


# ===================================================================== decode_payload


def test_decode_payload_dispatches_on_topic() -> None:
    cases: list[tuple[mqtt_topics.Topic, mqtt.Message]] = [
        (ReadingsTopic("gw-1"), BATCH),
        (GatewayStateTopic("gw-1"), BIRTH),
        (TokenTopic("gw-1", 12345678), DELIVERY),
        (TokenResultTopic("gw-1", 12345678), RESULT),
        (CommandTopic("gw-1"), SYNC),
        (CommandResultTopic("gw-1"), CMD_RESULT),
        (BackendStateTopic(), BACKEND),
    ]
    for topic, msg in cases:
        assert mqtt.decode_payload(topic, mqtt.encode(msg)) == msg


@pytest.mark.parametrize(
    ("topic", "msg", "field"),
    [
        (ReadingsTopic("gw-2"), BATCH, "gw"),
        (TokenTopic("gw-1", 1), DELIVERY, "meter"),
        (TokenResultTopic("gw-1", 1), RESULT, "meter"),
    ],
)
def test_decode_payload_refuses_ids_that_differ_from_the_topic(
    topic: mqtt_topics.Topic, msg: mqtt.Message, field: str
) -> None:
    with pytest.raises(errors.MalformedError, match=f"payload {field}"):
        mqtt.decode_payload(topic, mqtt.encode(msg))


def test_decode_payload_refuses_the_wrong_payload_type() -> None:
    with pytest.raises(errors.MalformedError, match="reading batch is missing field"):
        mqtt.decode_payload(ReadingsTopic("gw-1"), mqtt.encode(BACKEND))


# ===================================================================== refusals


def edit(msg: mqtt.Message, change: Any) -> bytes:
    """The canonical JSON of ``msg`` after ``change(obj)`` edits the decoded object."""
    obj = json.loads(mqtt.encode(msg))
    change(obj)
    return json.dumps(obj).encode()


def refuse(msg: mqtt.Message, data: bytes, match: str | None = None) -> errors.MalformedError:
    with pytest.raises(errors.MalformedError, match=match) as info:
        DECODERS[type(msg)](data)
    assert info.value.peer_fault
    return info.value


ALL = [msg for msg, _ in EXACT]


@pytest.mark.parametrize("msg", ALL)
def test_refuses_what_is_not_a_json_object(msg: mqtt.Message) -> None:
    refuse(msg, b"", "empty")
    refuse(msg, b"\xff\xfe{}", "not UTF-8")
    refuse(msg, '{"v":1}'.encode("utf-16"), "not UTF-8")
    refuse(msg, b"\xef\xbb\xbf" + mqtt.encode(msg), "not JSON")  # a UTF-8 BOM
    refuse(msg, b"{", "not JSON")
    refuse(msg, b"not json", "not JSON")
    refuse(msg, mqtt.encode(msg) + b"{}", "not JSON")  # trailing data
    refuse(msg, b"[1]", "must be a JSON object, got an array")
    refuse(msg, b"null", "got null")
    refuse(msg, b'"v"', "got a string")
    refuse(msg, b"1.5", "got a number with a fraction")
    refuse(msg, b"[" * 100_000 + b"]" * 100_000, "not JSON")  # nesting: RecursionError


@pytest.mark.parametrize("msg", ALL)
def test_refuses_versions(msg: mqtt.Message) -> None:
    with pytest.raises(errors.UnknownVersionError, match="version 2"):
        DECODERS[type(msg)](edit(msg, lambda o: o.update(v=2)))
    with pytest.raises(errors.UnknownVersionError):
        # the version is judged first: a v2 message may carry fields v1 never heard of
        DECODERS[type(msg)](edit(msg, lambda o: o.update(v=2, brand_new=1)))
    refuse(msg, edit(msg, lambda o: o.pop("v")), "no 'v' field")
    for bad in ("1", True, 1.0, None):
        error = refuse(msg, edit(msg, lambda o, b=bad: o.update(v=b)), "'v' must be an integer")
        assert not isinstance(error, errors.UnknownVersionError)


@pytest.mark.parametrize("msg", ALL)
def test_refuses_missing_and_unknown_fields(msg: mqtt.Message) -> None:
    optional = {GatewayState: {"fw", "meters"}, Command: {"meter", "args"}}.get(type(msg), set())
    for key in json.loads(mqtt.encode(msg)):
        if key != "v":
            match = None if key in optional else f"missing field.*{key}"
            refuse(msg, edit(msg, lambda o, k=key: o.pop(k)), match)
    refuse(msg, edit(msg, lambda o: o.update(extra=1)), "unknown field.*extra")


@pytest.mark.parametrize("msg", ALL)
def test_refuses_duplicate_keys_and_non_json_numbers(msg: mqtt.Message) -> None:
    data = mqtt.encode(msg)
    refuse(msg, data[:-1] + b',"v":1}', "duplicate key.*v")
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        refuse(msg, data[:-2] + constant + b"}", "not JSON")


@pytest.mark.parametrize("msg", ALL)
def test_refuses_oversized_payloads(msg: mqtt.Message) -> None:
    data = mqtt.encode(msg)
    padded = data[:-1] + b" " * (mqtt.MAX_PAYLOAD_BYTES - len(data)) + b"}"
    assert len(padded) == mqtt.MAX_PAYLOAD_BYTES
    DECODERS[type(msg)](padded)  # exactly at the bound: fine
    with pytest.raises(errors.PayloadTooLargeError):
        DECODERS[type(msg)](padded + b" ")


INT_FIELDS: list[tuple[mqtt.Message, str, int, int]] = [
    (WILL, "boot_seq", 0, U32),
    (WILL, "ts", 0, U32),
    (BATCH, "seq", 0, I64_MAX),
    (DELIVERY, "token_id", 0, U32),
    (DELIVERY, "meter", 1, U64),
    (RESULT, "token_id", 0, U32),
    (RESULT, "meter", 1, U64),
    (RESULT, "credit_after_milli", I64_MIN, I64_MAX),
    (RESULT, "ts", 0, U32),
    (SYNC, "ts", 0, U32),
    (SYNC, "meter", 1, U64),
    (CMD_RESULT, "ts", 0, U32),
    (BACKEND, "ts", 0, U32),
]


@pytest.mark.parametrize(("msg", "key", "lo", "hi"), INT_FIELDS)
def test_top_level_integer_fields(msg: mqtt.Message, key: str, lo: int, hi: int) -> None:
    decode = DECODERS[type(msg)]
    for good in (lo, hi):
        assert getattr(decode(edit(msg, lambda o, g=good: o.update({key: g}))), key) == good
    in_range = rf"{key} must be in {lo}\.\.{hi}, got"
    not_int = f"{key} must be an integer, got"
    cases = [
        (lo - 1, in_range),
        (hi + 1, in_range),
        (True, f"{not_int} a boolean"),
        (False, f"{not_int} a boolean"),
        (1.0, f"{not_int} a number with a fraction"),
        (str(lo), f"{not_int} a string"),
        ([1], f"{not_int} an array"),
        ({}, f"{not_int} an object"),
    ]
    for bad, match in cases:
        refuse(msg, edit(msg, lambda o, b=bad: o.update({key: b})), match)
    # past CPython's int-parsing digit limit (CVE-2020-10735): json raises ValueError
    huge = edit(msg, lambda o: o.update({key: "HUGE"})).replace(b'"HUGE"', b"1" * 5000)
    refuse(msg, huge, "not JSON")


def test_floats_in_exponent_form_are_not_integers() -> None:
    refuse(BACKEND, b'{"online":true,"ts":1.7e9,"v":1}', "ts must be an integer")
    refuse(BACKEND, b'{"online":true,"ts":1700000000.0,"v":1}', "ts must be an integer")


@pytest.mark.parametrize(
    ("msg", "key"),
    [
        (WILL, "online"),
        (BATCH, "historical"),
        (CMD_RESULT, "ok"),
        (BACKEND, "online"),
    ],
)
def test_boolean_fields(msg: mqtt.Message, key: str) -> None:
    for bad in (0, 1, "true", None):
        refuse(msg, edit(msg, lambda o, b=bad: o.update({key: b})), f"{key} must be a boolean")


READING_INTS = [
    ("meter", 1, U64),
    ("ts", 0, U32),
    ("import_wh", 0, MAX_WH),
    ("credit_milli", I64_MIN, I64_MAX),
    ("power_w", 0, U32),
    ("voltage_dv", 0, U32),
    ("current_ma", 0, U32),
    ("tariff_id", 0, U32),
    ("last_token_id", 0, U32),
    ("status_flags", 0, 2**16 - 1),
    ("block_period", 0, U32),
    ("block_period_wh", 0, MAX_WH),
]


def edit_reading(change: Any, index: int = 0) -> bytes:
    batch = ReadingBatch(
        gw="gw-1",
        seq=5,
        historical=True,
        readings=(reading(meter=1), reading(meter=2), reading(meter=3)),
    )
    return edit(batch, lambda o: change(o["readings"][index]))


@pytest.mark.parametrize(("key", "lo", "hi"), READING_INTS)
def test_reading_integer_fields(key: str, lo: int, hi: int) -> None:
    for good in (lo, hi):
        decoded = mqtt.decode_reading_batch(edit_reading(lambda r, g=good: r.update({key: g})))
        assert getattr(decoded.readings[0], key) == good
    for bad in (lo - 1, hi + 1, True, 1.0, "1", None):
        refuse(
            BATCH,
            edit_reading(lambda r, b=bad: r.update({key: b}), index=2),
            rf"readings\[2\]: {key} must be",
        )


def test_reading_refusals() -> None:
    cases: list[tuple[Any, str]] = [
        (lambda r: r.update(band_wh=[]), "band_wh must be a tuple of 1..8"),
        (lambda r: r.update(band_wh=[0] * 9), "band_wh must be a tuple of 1..8"),
        (lambda r: r.update(band_wh=5), "band_wh must be an array"),
        (lambda r: r.update(band_wh=None), "band_wh must be an array, got null"),
        (lambda r: r.update(band_wh=[1, -1]), r"band_wh\[1\] must be in"),
        (lambda r: r.update(band_wh=[1, MAX_WH + 1]), r"band_wh\[1\] must be in"),
        (lambda r: r.update(band_wh=[True]), r"band_wh\[0\] must be an integer, got a boolean"),
        (lambda r: r.update(band_wh=[1.0]), r"band_wh\[0\] must be an integer"),
        (lambda r: r.update(relay="CLOSED"), "relay must be one of closed, open"),
        (lambda r: r.update(relay="on"), "relay must be one of"),
        (lambda r: r.update(relay=1), "relay must be one of"),
        (lambda r: r.update(relay=["open"]), "relay must be one of"),
        (lambda r: r.pop("relay"), "reading is missing field.*relay"),
        (lambda r: r.update(v=1), "reading has unknown field.*v"),
        (lambda r: r.update(gw="gw-1"), "reading has unknown field.*gw"),
    ]
    for change, match in cases:
        refuse(BATCH, edit_reading(change, index=1), rf"readings\[1\]: .*{match}")


def test_batch_refusals() -> None:
    refuse(BATCH, edit(BATCH, lambda o: o.update(readings=[])), "1..1000 readings")
    refuse(BATCH, edit(BATCH, lambda o: o.update(readings={})), "readings must be an array")
    refuse(BATCH, edit(BATCH, lambda o: o["readings"].append(7)), r"readings\[1\]: must be an obj")
    refuse(BATCH, edit(BATCH, lambda o: o["readings"].append(None)), "got null")
    refuse(BATCH, edit(BATCH, lambda o: o.update(gw="a/b")), "gateway id")
    refuse(BATCH, edit(BATCH, lambda o: o.update(gw=7)), "gateway id")
    duplicate = edit(BATCH, lambda o: o["readings"].append(o["readings"][0]))
    refuse(BATCH, duplicate, r"one reading per \(meter, ts\)")
    # the same meter at another time is fine
    later = edit(BATCH, lambda o: o["readings"].append(dict(o["readings"][0], ts=TS + 900)))
    assert len(mqtt.decode_reading_batch(later).readings) == 2


def test_too_many_readings() -> None:
    obj = json.loads(mqtt.encode(BATCH))
    one = obj["readings"][0]
    obj["readings"] = [dict(one, meter=i) for i in range(1, 1001)]
    assert len(mqtt.decode_reading_batch(json.dumps(obj).encode()).readings) == 1000
    obj["readings"].append(dict(one, meter=1001))
    data = json.dumps(obj).encode()
    assert len(data) < mqtt.MAX_PAYLOAD_BYTES
    refuse(BATCH, data, "at most 1000 readings")


def test_gateway_state_refusals() -> None:
    refuse(BIRTH, edit(BIRTH, lambda o: o.pop("fw")), "online .* carries fw and meters")
    refuse(BIRTH, edit(BIRTH, lambda o: o.pop("meters")), "online .* carries fw and meters")
    refuse(BIRTH, edit(BIRTH, lambda o: o.update(online=False)), "offline state carries no meters")
    refuse(BIRTH, edit(BIRTH, lambda o: o.update(fw=None)), "'fw' must be omitted rather than null")
    refuse(BIRTH, edit(BIRTH, lambda o: o.update(meters=None)), "'meters' must be omitted")
    for fw in ("", "x" * 65, "fw\n", "\u00e9", 1, True):
        refuse(BIRTH, edit(BIRTH, lambda o, f=fw: o.update(fw=f)), "fw must be 1..64 printable")
    refuse(BIRTH, edit(BIRTH, lambda o: o.update(meters={})), "meters must be an array")
    refuse(BIRTH, edit(BIRTH, lambda o: o["meters"].reverse()), "strictly ascending")
    refuse(BIRTH, edit(BIRTH, lambda o: o["meters"].append(o["meters"][1])), "strictly ascending")
    refuse(BIRTH, edit(BIRTH, lambda o: o["meters"].append(8)), r"meters\[\] must be an object")
    refuse(BIRTH, edit(BIRTH, lambda o: o["meters"][0].update(x=1)), "unknown field.*x")
    refuse(BIRTH, edit(BIRTH, lambda o: o["meters"][0].pop("reachable")), "missing.*reachable")
    refuse(BIRTH, edit(BIRTH, lambda o: o["meters"][0].update(reachable=1)), "reachable must be")
    refuse(BIRTH, edit(BIRTH, lambda o: o["meters"][0].update(meter=0)), "meter must be in 1")
    # an offline state may name its firmware; the Will carries only boot_seq and ts
    offline = GatewayState(online=False, boot_seq=1, ts=1, fw="1.0")
    assert mqtt.decode_gateway_state(mqtt.encode(offline)) == offline
    empty = GatewayState(online=True, boot_seq=0, ts=0, fw="1.0", meters=())
    assert mqtt.encode(empty) == b'{"boot_seq":0,"fw":"1.0","meters":[],"online":true,"ts":0,"v":1}'


def test_token_delivery_refusals() -> None:
    def with_msg(text: Any) -> bytes:
        return edit(DELIVERY, lambda o: o.update(msg=text))

    refuse(DELIVERY, with_msg("AQL+/w"), "not base64")  # padding missing
    refuse(DELIVERY, with_msg("AQL-_w=="), "not base64")  # URL-safe alphabet
    refuse(DELIVERY, with_msg("AQL+ /w=="), "not base64")  # whitespace
    refuse(DELIVERY, with_msg("AQL+/w==\n"), "not base64")
    refuse(DELIVERY, with_msg("\u00e9AAA"), "not base64")  # non-ASCII
    refuse(DELIVERY, with_msg("AQL+/x=="), "not canonical base64")  # non-zero pad bits
    refuse(DELIVERY, with_msg(""), "msg must be 1..512 bytes")
    refuse(DELIVERY, with_msg(base64.b64encode(bytes(513)).decode()), "msg must be 1..512 bytes")
    refuse(DELIVERY, with_msg(7), "msg must be a base64 string, got an integer")
    refuse(DELIVERY, with_msg(None), "msg must be a base64 string, got null")
    longest = TokenDelivery(msg=bytes(512), token_id=U32, meter=U64)
    assert mqtt.decode_token_delivery(mqtt.encode(longest)) == longest


def test_token_result_refusals() -> None:
    for name in ("ACCEPTED", "Accepted", "bogus", "", 1, None, True):
        refuse(RESULT, edit(RESULT, lambda o, n=name: o.update(status=n)), "status must be one of")
    for status in TokenStatus:
        data = edit(RESULT, lambda o, s=status: o.update(status=s.name.lower()))
        assert mqtt.decode_token_result(data).status is status


def test_command_refusals() -> None:
    rebirth = Command(id="c-2", kind=CommandKind.REBIRTH, ts=TS)
    poll = Command(id="c-4", kind=CommandKind.POLL_NOW, ts=TS)
    assert mqtt.decode_command(mqtt.encode(poll)).meter is None
    poll_one = dataclasses.replace(poll, meter=7)
    assert mqtt.decode_command(mqtt.encode(poll_one)).meter == 7
    refuse(rebirth, edit(rebirth, lambda o: o.update(meter=7)), "rebirth command names no meter")
    for kind in ("relay_connect", "relay_disconnect", "emergency_credit"):
        refuse(
            rebirth, edit(rebirth, lambda o, k=kind: o.update(kind=k)), f"{kind} .*names a meter"
        )
        with_meter = edit(rebirth, lambda o, k=kind: o.update(kind=k, meter=7))
        assert mqtt.decode_command(with_meter).kind.value == kind
    refuse(SYNC, edit(SYNC, lambda o: o.pop("meter")), "time_sync command names a meter")
    refuse(SYNC, edit(SYNC, lambda o: o.pop("args")), "time_sync command carries args")
    refuse(SYNC, edit(SYNC, lambda o: o.update(args=None)), "'args' must be omitted")
    refuse(SYNC, edit(SYNC, lambda o: o.update(args=[1])), "args must be an object")
    refuse(SYNC, edit(SYNC, lambda o: o.update(args={})), "args is missing field.*ts")
    refuse(SYNC, edit(SYNC, lambda o: o["args"].update(tz=1)), "args has unknown field.*tz")
    refuse(SYNC, edit(SYNC, lambda o: o["args"].update(ts=-1)), "args.ts must be in")
    refuse(SYNC, edit(SYNC, lambda o: o["args"].update(ts="1")), "args.ts must be an integer")
    refuse(SYNC, edit(SYNC, lambda o: o.update(kind="relay_connect")), "relay_connect .*no args")
    refuse(SYNC, edit(SYNC, lambda o: o.update(meter=None)), "'meter' must be omitted")
    for kind in ("config", "TIME_SYNC", "", 3, None):
        refuse(SYNC, edit(SYNC, lambda o, k=kind: o.update(kind=k)), "kind must be one of")
    for bad_id in ("", "a b", "x" * 65, "\u00e9", 7, None):
        refuse(SYNC, edit(SYNC, lambda o, i=bad_id: o.update(id=i)), "id must be 1..64 visible")


def test_command_result_refusals() -> None:
    def with_detail(detail: Any) -> bytes:
        return edit(CMD_RESULT, lambda o: o.update(detail=detail))

    assert mqtt.decode_command_result(with_detail("")).detail == ""
    assert mqtt.decode_command_result(with_detail("x" * 256)).detail == "x" * 256
    for bad in ("x" * 257, "line\nbreak", "tab\t", "\u2028", "\x00", 7, None):
        refuse(CMD_RESULT, with_detail(bad), "detail must be 0..256 printable")
    lone_surrogate = b'{"detail":"\\ud800","id":"c","ok":true,"ts":1,"v":1}'
    refuse(CMD_RESULT, lone_surrogate, "detail must be")
    refuse(CMD_RESULT, edit(CMD_RESULT, lambda o: o.update(id="")), "id must be")


# ===================================================================== construction


def test_construction_errors_are_ours() -> None:
    """Bad arguments raise UnitError (peer_fault False), never a half-built message."""
    bad: list[Any] = [
        lambda: reading(relay="closed"),  # a str, not the Relay member
        lambda: reading(band_wh=[1]),  # a list, not a tuple: the message would be mutable
        lambda: reading(meter=b"1"),
        lambda: ReadingBatch(gw="g", seq=0, historical=False, readings=[reading()]),
        lambda: ReadingBatch(gw="g", seq=0, historical=False, readings=(BATCH,)),
        lambda: GatewayState(online=True, boot_seq=0, ts=0, fw="1", meters=[]),
        lambda: GatewayState(online=True, boot_seq=0, ts=0, fw="1", meters=(7,)),
        lambda: GatewayState(
            online=True,
            boot_seq=0,
            ts=0,
            fw="1",
            meters=tuple(
                MeterPresence(meter=i, reachable=True)
                for i in range(1, mqtt.MAX_METERS_PER_GATEWAY + 2)
            ),
        ),
        lambda: TokenDelivery(msg=bytearray(b"x"), token_id=1, meter=1),
        lambda: TokenDelivery(msg=b"x", token_id=2**32, meter=1),
        lambda: TokenResult(token_id=1, meter=1, status=1, credit_after_milli=None, ts=0),
        lambda: TokenResult(
            token_id=1, meter=1, status=TokenStatus.NONE, credit_after_milli=0.5, ts=0
        ),
        lambda: Command(id="c", kind="rebirth", ts=0),
        lambda: Command(id="c", kind=CommandKind.TIME_SYNC, ts=0, meter=1, args={"ts": 1}),
        lambda: CommandResult(id="c", ok=True, detail=b"x", ts=0),
        lambda: BackendState(online=1, ts=0),
        lambda: MeterPresence(meter=1, reachable=None),
        lambda: TimeSyncArgs(ts=-1),
    ]
    for build in bad:
        with pytest.raises(errors.UnitError) as info:
            build()
        assert not info.value.peer_fault


def test_messages_are_frozen_and_hashable() -> None:
    for msg in ALL:
        hash(msg)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, dataclasses.fields(msg)[0].name, None)
