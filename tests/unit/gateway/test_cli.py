"""``voltcredit gateway``: config errors on stderr with exit 2, ``status`` in text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.cli import main
from gateway.store import PollOutcome, Store
from gateway.token_flow import TokenState
from tests.support.gateway import gateway_toml, tcp_meter
from tests.unit.gateway.test_store import ok

T0 = 1_790_000_000


def config(tmp_path: Path) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        gateway_toml(
            broker_port=1883,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(11, 5020, 1), tcp_meter(12, 5020, 2), tcp_meter(13, 5020, 3)],
        )
    )
    return path


def test_run_with_a_bad_config_says_which_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(config(tmp_path).read_text().replace("port = 5020", "port = 70000", 1))
    assert main(["gateway", "run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"voltcredit gateway: error: {path}: meters[0].port: must be 1..65535, got 70000" in err


def test_status_before_the_first_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "status", "--config", str(config(tmp_path))]) == 1
    assert "no store at" in capsys.readouterr().err


def test_status_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path)
    store = Store.open(tmp_path / "gw.sqlite", now=T0)
    store.begin_boot()
    store.record_poll(
        "gw-test",
        [ok(11, T0), PollOutcome(meter=12, reading=None, error="timeout")],
        now=T0 + 2,
        cap_bytes=10**6,
    )
    store.insert_token(
        meter=11,
        token_id=4,
        msg=b"t",
        state=TokenState.STORED,
        status=None,
        credit_after_milli=None,
        now=T0 + 3,
    )
    store.close()
    assert main(["gateway", "status", "--config", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["boot_seq"] == 1
    assert doc["next_seq"] == T0 * 1000 + 1
    assert doc["outbox"]["batches"] == 1
    assert doc["outbox"]["oldest_pending"] == "2026-09-21T14:13:22+00:00"
    assert doc["tokens_in_flight"] == {"stored": 1}
    meters = {m["meter"]: m for m in doc["meters"]}
    assert meters[11]["reachable"] is True
    assert meters[11]["credit_milli"] == 1000
    assert meters[12]["reachable"] is False
    assert meters[12]["last_error"] == "timeout"
    assert meters[13]["reachable"] is None
    assert meters[13]["last_reading"] is None
    assert main(["gateway", "status", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "outbox: 1 batch(es)" in text
    assert "tokens in flight: 1 stored" in text
    assert "NO" in text
    assert "timeout" in text
