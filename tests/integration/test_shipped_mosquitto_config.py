"""The Mosquitto configuration we ship (systemd/) really confines gateways to their topics.

The example config is started as shipped, except for what must differ on a test machine:
ports, file paths and TLS material (the TLS listener gets a throw-away CA).
"""

from __future__ import annotations

import os
import queue
import subprocess
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import free_port, mosquitto_binary, wait_port
from tests.support.pki import Pki

pytestmark = pytest.mark.integration

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
PASSWORDS = {"backend": "pw-backend", "gw1": "pw-gw1", "gw2": "pw-gw2"}


def _config(tmp: Path, pki: Pki, port: int, tls_port: int) -> Path:
    lines = []
    for shipped in (SYSTEMD / "mosquitto-voltcredit.conf").read_text().splitlines():
        key, line = shipped.split(" ", 1)[0], shipped
        if key == "listener":
            line = (
                f"listener {tls_port} 127.0.0.1" if "8883" in line else f"listener {port} 127.0.0.1"
            )
        elif key == "password_file":
            line = f"password_file {tmp / 'passwd'}"
        elif key == "acl_file":
            line = f"acl_file {tmp / 'acl'}"
        elif key == "persistence_location":
            line = f"persistence_location {tmp}/"
        elif key in ("cafile", "certfile", "keyfile"):
            path = {"cafile": pki.ca_cert, "certfile": pki.server_cert, "keyfile": pki.server_key}[
                key
            ]
            line = f"{key} {path}"
        lines.append(line)
    if os.geteuid() == 0:
        lines.insert(0, "user root")  # mosquitto would drop to a user who cannot read tmp
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    (tmp / "acl").write_text((SYSTEMD / "voltcredit.acl").read_text())
    pw = tmp / "passwd"
    pw.write_text("")
    pw.chmod(0o600)
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True)
    return conf


def _client(port: int, user: str) -> tuple[mqtt.Client, queue.Queue[tuple[str, bytes]]]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    done: queue.Queue[Any] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}")
    c.username_pw_set(user, PASSWORDS[user])
    c.on_message = lambda _c, _u, m: got.put((m.topic, m.payload))
    c.on_connect = lambda _c, _u, _f, rc, _p: done.put(rc)
    c.on_subscribe = lambda _c, _u, _m, codes, _p: done.put(codes)
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert not done.get(timeout=10).is_failure
    c._test_done = done  # type: ignore[attr-defined]
    return c, got


def _subscribe(c: mqtt.Client, topic: str) -> None:
    c.subscribe(topic, qos=1)
    c._test_done.get(timeout=10)  # type: ignore[attr-defined]


def test_shipped_acl_confines_gateways(tmp_path: Path, pki: Pki) -> None:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed")
    port, tls_port = free_port(), free_port()
    conf = _config(tmp_path, pki, port, tls_port)
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    try:
        wait_port(port)
        wait_port(tls_port)
        backend, backend_got = _client(port, "backend")
        _subscribe(backend, "$share/ingest/vc/v1/gw/+/readings")
        _subscribe(backend, "vc/v1/gw/+/meter/+/token/result")
        gw1, gw1_got = _client(port, "gw1")
        _subscribe(gw1, "vc/v1/gw/gw1/meter/+/token")
        _subscribe(gw1, "vc/v1/gw/gw2/meter/+/token")  # refused by the ACL: receives nothing
        # gw1 impersonating gw2, then speaking for itself.
        gw1.publish("vc/v1/gw/gw2/readings", b"forged", qos=1).wait_for_publish(5)
        gw1.publish("vc/v1/gw/gw2/meter/7/token/result", b"forged", qos=1).wait_for_publish(5)
        gw1.publish("vc/v1/gw/gw1/readings", b"own", qos=1).wait_for_publish(5)
        assert backend_got.get(timeout=10) == ("vc/v1/gw/gw1/readings", b"own")
        # The backend sends a token to each gateway; gw1 sees only its own.
        backend.publish("vc/v1/gw/gw2/meter/7/token", b"for-gw2", qos=1).wait_for_publish(5)
        backend.publish("vc/v1/gw/gw1/meter/5/token", b"for-gw1", qos=1).wait_for_publish(5)
        assert gw1_got.get(timeout=10) == ("vc/v1/gw/gw1/meter/5/token", b"for-gw1")
        with pytest.raises(queue.Empty):
            backend_got.get(timeout=0.5)
        with pytest.raises(queue.Empty):
            gw1_got.get(timeout=0.2)
        for c in (backend, gw1):
            c.loop_stop()
            c.disconnect()
    finally:
        proc.terminate()
        proc.wait(10)
