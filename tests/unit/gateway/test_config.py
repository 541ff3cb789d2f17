"""Config validation: a full example parses to the right values; bad keys name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    CrashPoint,
    DriverKind,
    RtuAddress,
    TcpAddress,
    load_config,
    parse_config,
    runtime_from_env,
)
from gateway.errors import GatewayConfigError
from tests.support.meters import SIGNER

KEY = SIGNER.public_key_bytes().hex()

BASE = f"""
gateway_id = "site-7"
poll_interval_s = 60
command_max_age_s = 900
token_result_timeout_s = 10

[mqtt]
url = "mqtts://broker.example.net:8883"
username = "site-7"
password = "s3cret"
ca_file = "ca.pem"
keepalive_s = 30
reconnect_min_s = 1
reconnect_max_s = 60
max_inflight = 16

[store]
path = "state/gw.sqlite"
outbox_max_bytes = 1048576
token_retention_days = 30

[[trusted_keys]]
id = 7
public_key = "{KEY}"

[modbus]
timeout_s = 1.0
retries = 2
backoff_min_s = 1
backoff_max_s = 120

[[meters]]
id = 1000001
driver = "modbus_tcp"
host = "10.0.0.21"
port = 502
unit = 1

[[meters]]
id = 1000002
driver = "modbus_rtu"
device = "/dev/ttyUSB0"
baudrate = 9600
parity = "E"
unit = 5
timeout_s = 0.5

[[meters]]
id = 1000003
driver = "modbus_rtu"
device = "/dev/ttyUSB0"
baudrate = 9600
parity = "E"
unit = 6
"""


def parse(text: str, tmp_path: Path) -> object:
    (tmp_path / "ca.pem").write_text("not checked here")
    return parse_config(text, source="gw.toml", base_dir=tmp_path)


def test_full_example_parses(tmp_path: Path) -> None:
    cfg = parse(BASE, tmp_path)
    assert cfg.gateway_id == "site-7"  # type: ignore[attr-defined]
    assert cfg.poll_interval_s == 60.0  # type: ignore[attr-defined]
    mqtt = cfg.mqtt  # type: ignore[attr-defined]
    assert (mqtt.host, mqtt.port, mqtt.tls, mqtt.username, mqtt.password) == (
        "broker.example.net",
        8883,
        True,
        "site-7",
        "s3cret",
    )
    assert mqtt.ca_file == tmp_path / "ca.pem"
    assert cfg.store.path == (tmp_path / "state" / "gw.sqlite").resolve()  # type: ignore[attr-defined]
    assert cfg.trusted_keys == ((7, SIGNER.public_key_bytes()),)  # type: ignore[attr-defined]
    assert set(cfg.public_keys()) == {7}  # type: ignore[attr-defined]
    m1, m2, m3 = cfg.meters  # type: ignore[attr-defined]
    assert m1.driver is DriverKind.MODBUS_TCP
    assert m1.address == TcpAddress(host="10.0.0.21", port=502, unit=1)
    assert m1.policy.timeout_s == 1.0
    assert m1.policy.retries == 2
    assert m2.address == RtuAddress(
        device="/dev/ttyUSB0", baudrate=9600, parity="E", stopbits=1, unit=5
    )
    assert m2.policy.timeout_s == 0.5
    assert m2.policy.backoff_max_s == 120.0
    assert m3.policy.timeout_s == 1.0


def test_defaults_and_plain_mqtt(tmp_path: Path) -> None:
    text = f"""
gateway_id = "g"
[mqtt]
url = "mqtt://localhost"
[store]
path = "/var/lib/g.sqlite"
[[trusted_keys]]
id = 1
public_key = "{KEY}"
[[meters]]
id = 5
driver = "modbus_tcp"
host = "meter-5.local"
"""
    cfg = parse(text, tmp_path)
    assert cfg.mqtt.port == 1883
    assert not cfg.mqtt.tls
    assert cfg.mqtt.username is None
    assert cfg.poll_interval_s == 60.0
    assert cfg.command_max_age_s == 900
    assert cfg.store.outbox_max_bytes == 64 * 1024 * 1024  # type: ignore[attr-defined]
    assert cfg.meters[0].address == TcpAddress(host="meter-5.local", port=502, unit=1)  # type: ignore[attr-defined]


def test_password_file_is_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    cfg = parse(BASE.replace('password = "s3cret"', 'password_file = "pw"'), tmp_path)
    assert cfg.mqtt.password == "from-file"  # noqa: S105 - a test value  # type: ignore[attr-defined]


def _drop(key_line: str) -> str:
    return BASE.replace(key_line + "\n", "")


# (what is wrong, the broken config, the exact "FILE: KEY: PROBLEM" start expected)
BAD = [
    ("not toml", BASE + "\n[[", "gw.toml: not valid TOML"),
    (
        "missing gateway id",
        _drop('gateway_id = "site-7"'),
        "gw.toml: gateway_id: missing (required)",
    ),
    (
        "bad gateway id",
        BASE.replace('"site-7"\npoll', '"site/7"\npoll'),
        "gw.toml: gateway_id: must be 1..64",
    ),
    (
        "typo at top level",
        BASE.replace("poll_interval_s", "poll_intervall_s"),
        "gw.toml: poll_intervall_s: unknown key",
    ),
    (
        "poll too fast",
        BASE.replace("poll_interval_s = 60", "poll_interval_s = 0"),
        "gw.toml: poll_interval_s: must be 0.1..86400",
    ),
    (
        "poll as string",
        BASE.replace("poll_interval_s = 60", 'poll_interval_s = "60"'),
        "gw.toml: poll_interval_s: must be a number",
    ),
    (
        "bool for int",
        BASE.replace("command_max_age_s = 900", "command_max_age_s = true"),
        "gw.toml: command_max_age_s: must be an integer",
    ),
    ("no url", _drop('url = "mqtts://broker.example.net:8883"'), "gw.toml: mqtt.url: missing"),
    (
        "bad scheme",
        BASE.replace("mqtts://", "http://"),
        "gw.toml: mqtt.url: scheme must be mqtt:// or mqtts://",
    ),
    (
        "credentials in url",
        BASE.replace("mqtts://broker", "mqtts://u:p@broker"),
        "gw.toml: mqtt.url: put credentials",
    ),
    ("bad port", BASE.replace(":8883", ":99999"), "gw.toml: mqtt.url: port must be 1..65535"),
    (
        "path in url",
        BASE.replace(":8883", ":8883/x"),
        "gw.toml: mqtt.url: must be mqtt[s]://host[:port] only",
    ),
    (
        "both passwords",
        BASE.replace('password = "s3cret"', 'password = "a"\npassword_file = "ca.pem"'),
        "gw.toml: mqtt.password_file: give password or password_file",
    ),
    (
        "password file missing",
        BASE.replace('password = "s3cret"', 'password_file = "nope"'),
        "gw.toml: mqtt.password_file: file",
    ),
    (
        "password without user",
        _drop('username = "site-7"'),
        "gw.toml: mqtt.username: missing: a password needs a username",
    ),
    ("ca file missing", BASE.replace('"ca.pem"', '"missing.pem"'), "gw.toml: mqtt.ca_file: file"),
    (
        "tls file on plain mqtt",
        BASE.replace("mqtts://", "mqtt://"),
        "gw.toml: mqtt.ca_file: TLS files need an mqtts:// url",
    ),
    (
        "cert without key",
        BASE.replace('ca_file = "ca.pem"', 'ca_file = "ca.pem"\ncert_file = "ca.pem"'),
        "gw.toml: mqtt.key_file: give cert_file and key_file together",
    ),
    (
        "reconnect max < min",
        BASE.replace("reconnect_max_s = 60", "reconnect_max_s = 0.5"),
        "gw.toml: mqtt.reconnect_max_s: must be >= reconnect_min_s",
    ),
    (
        "inflight 0",
        BASE.replace("max_inflight = 16", "max_inflight = 0"),
        "gw.toml: mqtt.max_inflight: must be 1..100",
    ),
    (
        "unknown mqtt key",
        BASE.replace("keepalive_s = 30", "keepalive = 30"),
        "gw.toml: mqtt.keepalive: unknown key",
    ),
    ("no store path", _drop('path = "state/gw.sqlite"'), "gw.toml: store.path: missing"),
    (
        "tiny cap",
        BASE.replace("outbox_max_bytes = 1048576", "outbox_max_bytes = 10"),
        "gw.toml: store.outbox_max_bytes: must be 65536..",
    ),
    (
        "no keys",
        BASE.replace("[[trusted_keys]]\nid = 7\n", "").replace(f'public_key = "{KEY}"\n', ""),
        "gw.toml: trusted_keys: missing",
    ),
    (
        "short key",
        BASE.replace(KEY, KEY[:10]),
        "gw.toml: trusted_keys[0].public_key: must be 64 hex digits",
    ),
    (
        "key id too big",
        BASE.replace("id = 7\n", "id = 4294967296\n"),
        "gw.toml: trusted_keys[0].id: must be 0..4294967295",
    ),
    (
        "duplicate key",
        BASE.replace("[modbus]", f'[[trusted_keys]]\nid = 7\npublic_key = "{KEY}"\n[modbus]'),
        "gw.toml: trusted_keys[1].id: key id 7 appears twice",
    ),
    (
        "backoff max < min",
        BASE.replace("backoff_max_s = 120", "backoff_max_s = 0.5"),
        "gw.toml: modbus.backoff_max_s: must be >= backoff_min_s",
    ),
    (
        "retries too many",
        BASE.replace("retries = 2", "retries = 11"),
        "gw.toml: modbus.retries: must be 0..10",
    ),
    ("no meters", BASE.split("[[meters]]", maxsplit=1)[0], "gw.toml: meters: missing"),
    (
        "meters not tables",
        "meters = 3\n" + BASE.split("[[meters]]", maxsplit=1)[0],
        "gw.toml: meters: must be an array of tables",
    ),
    (
        "meter id 0",
        BASE.replace("id = 1000001", "id = 0"),
        "gw.toml: meters[0].id: must be 1..18446744073709551615",
    ),
    (
        "duplicate meter",
        BASE.replace("id = 1000002", "id = 1000001"),
        "gw.toml: meters[1].id: meter 1000001 is also meters[0]",
    ),
    (
        "unknown driver",
        BASE.replace('"modbus_tcp"', '"dlms"'),
        "gw.toml: meters[0].driver: must be one of modbus_tcp, modbus_rtu",
    ),
    ("no host", _drop('host = "10.0.0.21"'), "gw.toml: meters[0].host: missing"),
    ("bad host", BASE.replace('"10.0.0.21"', '"a b"'), "gw.toml: meters[0].host: not a host name"),
    (
        "bad port",
        BASE.replace("port = 502", "port = 70000"),
        "gw.toml: meters[0].port: must be 1..65535, got 70000",
    ),
    ("unit 0", BASE.replace("unit = 1\n", "unit = 0\n"), "gw.toml: meters[0].unit: must be 1..247"),
    (
        "odd baud",
        BASE.replace(
            'baudrate = 9600\nparity = "E"\nunit = 5', 'baudrate = 9601\nparity = "E"\nunit = 5'
        ),
        "gw.toml: meters[1].baudrate: must be one of",
    ),
    (
        "bad parity",
        BASE.replace('parity = "E"\nunit = 5', 'parity = "X"\nunit = 5'),
        "gw.toml: meters[1].parity: must be N, E or O",
    ),
    (
        "one line, two settings",
        BASE.replace('parity = "E"\nunit = 6', 'parity = "N"\nunit = 6'),
        "gw.toml: meters[2].baudrate: /dev/ttyUSB0 is one RS-485 line",
    ),
    (
        "same unit twice",
        BASE.replace("unit = 6", "unit = 5"),
        "gw.toml: meters[2].unit: the same address and unit as meters[1]",
    ),
    (
        "meter timeout 0",
        BASE.replace("timeout_s = 0.5", "timeout_s = 0"),
        "gw.toml: meters[1].timeout_s: must be 0.05..60",
    ),
    ("typo in meter", BASE.replace("unit = 6", "unti = 6"), "gw.toml: meters[2].unti: unknown key"),
    (
        "table expected",
        BASE.replace("[mqtt]", "mqtt = 1\n[mqttx]"),
        "gw.toml: mqtt: must be a table",
    ),
]


@pytest.mark.parametrize(("what", "text", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, what: str, text: str, message: str
) -> None:
    with pytest.raises(GatewayConfigError) as info:
        parse(text, tmp_path)
    assert str(info.value).startswith(message), str(info.value)


def test_load_config_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match=r"nope\.toml: cannot read: no such file"):
        load_config(tmp_path / "nope.toml")


def test_load_config_anchors_paths_at_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "ca.pem").write_text("x")
    path = tmp_path / "etc" / "gw.toml"
    path.write_text(BASE)
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.mqtt.ca_file == tmp_path / "etc" / "ca.pem"


def test_runtime_env() -> None:
    assert runtime_from_env({}, pid=1).crash_at is None
    env = {
        "NOTIFY_SOCKET": "@sd",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "42",
        "VOLTCREDIT_GATEWAY_CRASH_AT": "after_write",
    }
    rt = runtime_from_env(env, pid=42)
    assert (rt.notify_socket, rt.watchdog_usec, rt.crash_at) == (
        "@sd",
        30_000_000,
        CrashPoint.AFTER_WRITE,
    )
    # The watchdog is another process's: ignore it.
    assert runtime_from_env(env, pid=43).watchdog_usec is None
    with pytest.raises(
        GatewayConfigError, match="environment: VOLTCREDIT_GATEWAY_CRASH_AT: must be one of"
    ):
        runtime_from_env({"VOLTCREDIT_GATEWAY_CRASH_AT": "later"}, pid=1)
    with pytest.raises(
        GatewayConfigError, match="environment: WATCHDOG_USEC: not a positive integer"
    ):
        runtime_from_env({"WATCHDOG_USEC": "soon"}, pid=1)


def test_the_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("## gateway:", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    for name in ("site-7.password", "site-7.crt", "site-7.key", "ca.pem"):
        (tmp_path / name).write_text("x\n")
    cfg = parse_config(
        example.replace("/etc/voltcredit/ca.pem", str(tmp_path / "ca.pem")),
        source="site-7.toml",
        base_dir=tmp_path,
    )
    assert cfg.gateway_id == "site-7"
    assert [m.driver for m in cfg.meters] == [DriverKind.MODBUS_TCP, DriverKind.MODBUS_RTU]
    assert cfg.meters[1].policy.timeout_s == 0.5
