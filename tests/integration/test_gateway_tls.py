"""The gateway on a locked-down Mosquitto: TLS, username/password, the ACL of MQTT.md §2.1.

(tests/support/broker.py cannot yet combine users and TLS in one Mosquitto: it writes
``password_file`` twice; so TLS and passwords are tested on two brokers.)

The gateway may publish only its own state, readings, token results and command results,
and subscribe only to its tokens, its commands and the backend state; anything else it
tried would be dropped by the broker and the test would miss a message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from firmware_protocol.status import TokenStatus
from meter_sim.fleet import TcpLayout, serve
from tests.support.broker import Users
from tests.support.gateway import (
    GW,
    gateway_toml,
    running_backend,
    running_gateway,
    tcp_meter,
    wait_until,
    wall_meter,
    write_config,
)
from tests.support.meters import credit_token
from tests.support.pki import Pki

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

METER = 4_700_000_001
GW_ACL = [
    f"topic write vc/v1/gw/{GW}/state",
    f"topic write vc/v1/gw/{GW}/readings",
    f"topic write vc/v1/gw/{GW}/meter/+/token/result",
    f"topic write vc/v1/gw/{GW}/cmd/result",
    f"topic read vc/v1/gw/{GW}/meter/+/token",
    f"topic read vc/v1/gw/{GW}/cmd",
    "topic read vc/v1/backend/state",
]


async def test_gateway_with_password_inside_the_acl(tmp_path: Path, mosquitto_factory: Any) -> None:
    users = Users(
        passwords={GW: "gw-secret", "backend": "be-secret"},
        acl={GW: GW_ACL, "backend": ["topic readwrite vc/v1/#"]},
    )
    broker = mosquitto_factory(users=users)
    (tmp_path / "gw.password").write_text("gw-secret\n")
    device = wall_meter(METER)
    async with (
        serve([device], TcpLayout(port=0)) as fleet,
        running_backend(broker.port, username="backend", password="be-secret") as backend,  # noqa: S106
    ):
        text = gateway_toml(
            broker_port=broker.port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(METER, fleet.ports[0])],
            poll_interval_s=0.5,
        ).replace("[store]", f'username = "{GW}"\npassword_file = "gw.password"\n[store]')
        async with running_gateway(write_config(tmp_path / "gw.toml", text)):
            await wait_until(lambda: len(backend.distinct_seqs()) >= 2, what="readings")
            backend.deliver(METER, credit_token(METER, 1, 100, now=int(time.time())), 1)
            (result,) = await wait_until(lambda: backend.results_for(METER, 1), what="result")
            assert result.status is TokenStatus.ACCEPTED
            assert backend.snapshot()[2][0].online  # birth allowed on the state topic
        await wait_until(lambda: not backend.snapshot()[2][-1].online, what="clean-stop state")


async def test_gateway_over_tls(tmp_path: Path, mosquitto_factory: Any, pki: Pki) -> None:
    broker = mosquitto_factory(pki=pki)
    device = wall_meter(METER)
    async with (
        serve([device], TcpLayout(port=0)) as fleet,
        running_backend(broker.port) as backend,
    ):
        text = gateway_toml(
            broker_port=broker.tls_port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(METER, fleet.ports[0])],
            poll_interval_s=0.5,
        ).replace(
            f'url = "mqtt://127.0.0.1:{broker.tls_port}"',
            f'url = "mqtts://localhost:{broker.tls_port}"\nca_file = "{pki.ca_cert}"',
        )
        async with running_gateway(write_config(tmp_path / "gw.toml", text)) as gw:
            assert gw.config.mqtt.tls
            await wait_until(lambda: len(backend.distinct_seqs()) >= 2, what="readings over TLS")
            backend.deliver(METER, credit_token(METER, 1, 100, now=int(time.time())), 1)
            (result,) = await wait_until(lambda: backend.results_for(METER, 1), what="result")
            assert result.status is TokenStatus.ACCEPTED


async def test_an_untrusted_server_certificate_is_refused(
    tmp_path: Path, mosquitto_factory: Any, pki: Pki
) -> None:
    broker = mosquitto_factory(pki=pki)
    device = wall_meter(METER)
    other_ca = tmp_path / "other-ca.pem"
    from tests.support.pki import make_pki

    (tmp_path / "other").mkdir()
    other_ca.write_bytes(make_pki(tmp_path / "other").ca_cert.read_bytes())
    async with serve([device], TcpLayout(port=0)) as fleet:
        text = gateway_toml(
            broker_port=broker.tls_port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(METER, fleet.ports[0])],
            poll_interval_s=0.3,
        ).replace(
            f'url = "mqtt://127.0.0.1:{broker.tls_port}"',
            f'url = "mqtts://localhost:{broker.tls_port}"\nca_file = "{other_ca}"',
        )
        async with running_gateway(write_config(tmp_path / "gw.toml", text)) as gw:
            await wait_until(lambda: gw.poller.cycles >= 3, what="polls while refused")
            assert not gw.link.connected


async def test_a_wrong_password_keeps_the_gateway_retrying_without_crashing(
    tmp_path: Path, mosquitto_factory: Any
) -> None:
    users = Users(passwords={GW: "right"}, acl={GW: GW_ACL})
    broker = mosquitto_factory(users=users)
    device = wall_meter(METER)
    async with serve([device], TcpLayout(port=0)) as fleet:
        text = gateway_toml(
            broker_port=broker.port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(METER, fleet.ports[0])],
            poll_interval_s=0.3,
        ).replace("[store]", f'username = "{GW}"\npassword = "wrong"\n[store]')
        async with running_gateway(write_config(tmp_path / "gw.toml", text)) as gw:
            await wait_until(lambda: gw.poller.cycles >= 3, what="polls while refused")
            assert not gw.link.connected
        # The readings wait in the outbox for a broker that lets the gateway in.
        assert gw.flusher.delivered == 0
