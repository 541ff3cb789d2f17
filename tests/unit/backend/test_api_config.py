"""Backend configuration: defaults, TOML file, environment overrides, and every refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backend.config import KEYS, BackendConfig, ConfigError, describe, load_config

KEY = "vck_0badcafe_" + "A" * 43


def test_defaults() -> None:
    config = load_config(None, {})
    assert config == BackendConfig()
    assert config.database_url == "sqlite+aiosqlite:///var/voltcredit.db"
    assert (config.http_host, config.http_port) == ("127.0.0.1", 8080)
    assert config.customer_token_ttl_s == 900
    assert config.token_secret is None


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "backend.toml"
    path.write_text(
        '[database]\nurl = "postgresql+asyncpg://u@db/vc"\n'
        '[http]\nhost = "0.0.0.0"\nport = 9000\nmax_body_bytes = 4096\n'
        '[keys]\ndir = "/srv/keys"\n[mqtt]\nurl = "mqtts://broker:8883"\n'
        f'[auth]\ntoken_secret = "{"k" * 40}"\ncustomer_token_ttl_s = 600\n'
        f'bootstrap_admin_key = "{KEY}"\n'
        "[tokens]\ntariff_message_ttl_s = 86400\n"
    )
    config = load_config(path, {"VOLTCREDIT_HTTP_PORT": "9100", "VOLTCREDIT_KEY_DIR": ""})
    assert config.source == str(path)
    assert config.database_url == "postgresql+asyncpg://u@db/vc"
    assert (config.http_host, config.http_port) == ("0.0.0.0", 9100)  # noqa: S104 - a config value
    assert config.max_body_bytes == 4096
    assert config.key_dir == Path("/srv/keys")  # an empty variable does not override
    assert config.mqtt_url == "mqtts://broker:8883"
    assert config.token_secret == b"k" * 40
    assert config.customer_token_ttl_s == 600
    assert config.bootstrap_admin_key == KEY
    assert config.tariff_message_ttl_s == 86400


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text("[http]\nport = 1234\n")
    assert load_config(None, {"VOLTCREDIT_CONFIG": str(path)}).http_port == 1234


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[http]\nport = 70000\n", "b.toml: http.port: must be an integer in 0..65535, got 70000"),
        ("[http]\nport = true\n", "http.port: must be an integer"),
        ('[http]\nport = "80"\n', None),
        (
            "[http]\nprot = 80\n",
            "b.toml: http.prot: unknown key (known: host, max_body_bytes, port)",
        ),
        ("[web]\nport = 80\n", "b.toml: [web]: unknown section"),
        ("http = 5\n", "b.toml: http: must be a table"),
        ('[database]\nurl = "mysql://x"\n', "database.url: must start with one of"),
        ('[mqtt]\nurl = "http://x"\n', "mqtt.url: must be mqtt://host"),
        ('[mqtt]\nurl = "mqtt://x:99999"\n', "mqtt.url: bad port"),
        ('[auth]\ntoken_secret = "short"\n', "auth.token_secret: must be at least 32"),
        ('[auth]\nbootstrap_admin_key = "vck_x"\n', "auth.bootstrap_admin_key: must be a key"),
        ('[keys]\ndir = ""\n', "keys.dir: must be a non-empty string"),
        ("[http\n", "b.toml: not valid TOML"),
        ('[mqtt]\nshared_subscriptions = "yes"\n', "mqtt.shared_subscriptions: must be true"),
        ('[mqtt]\nclient_id = "a/b"\n', "mqtt.client_id: must be 1..64 printable"),
        ("[ingest]\nmax_clock_ahead_s = -1\n", "ingest.max_clock_ahead_s: must be an integer"),
        ("[alerts]\nmeter_stale_s = 5\n", "alerts.meter_stale_s: must be an integer"),
    ],
)
def test_file_refusals_name_file_and_key(tmp_path: Path, text: str, message: str | None) -> None:
    path = tmp_path / "b.toml"
    path.write_text(text)
    if message is None:  # a TOML string where an integer belongs is still refused
        message = "http.port: must be an integer"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, {})


def test_environment_refusals_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment: VOLTCREDIT_HTTP_PORT: must be an integer"):
        load_config(None, {"VOLTCREDIT_HTTP_PORT": "eighty"})


def test_unreadable_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Path("/nonexistent/backend.toml"), {})


def test_describe_lists_every_key() -> None:
    table = describe()
    for key in KEYS:
        assert f"`{key.dotted}`" in table
        assert f"`{key.env}`" in table
