"""``voltcredit demo`` end to end: it provisions, a customer's top-up reaches the meter, the
backend bills consumption and agrees with every meter, Ctrl-C stops everything, and a
second run reuses the data.

The demo runs as a subprocess in a temporary directory on free ports (backend, broker,
Modbus). Provisioning gives every customer an opening top-up through the API. A customer
logs in and tops up 10.00 EUR over the HTTP API; the sandbox completes the payment, the
backend's dispatcher sends the signed token over the embedded broker to the gateway,
which writes it to the simulated meter. The token must become APPLIED and the meter's
credit (read over Modbus with ``meter-sim status``) must rise by the amount, less at most
what the meter consumed meanwhile. Then the backend must show the customer's consumption
(``GET /v1/accounts/{id}/consumption``) and, in its database (read only), a
reconciliation difference of zero for every meter; after the restart too. The README's
walkthrough must be the one the demo prints.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from backend.demo import OPENING_MINOR, walkthrough
from tests.support.broker import free_port

pytestmark = pytest.mark.e2e

VOLTCREDIT = [sys.executable, "-c", "import sys; from backend.cli import main; sys.exit(main())"]
AMOUNT_MINOR = 1000
#: The most meter 1 can consume in ~40 real seconds at x60 (40 simulated minutes at a few
#: kW on the 36.5 ct/kWh peak band, plus one standing charge of 39 ct if midnight passes):
#: far below the 10.00 EUR top-up, so the check still proves the token arrived.
CONSUMPTION_BOUND_MILLI = 200_000


class Demo:
    """A running ``voltcredit demo`` whose output is collected by a thread."""

    def __init__(self, directory: Path, ports: dict[str, int]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                *VOLTCREDIT,
                "demo",
                "--dir",
                str(directory),
                "--http-port",
                str(ports["http"]),
                "--modbus-port",
                str(ports["modbus"]),
                "--mqtt-port",
                str(ports["mqtt"]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith("demo ready") for line in self.lines):
            assert self.proc.poll() is None, f"demo exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"demo not ready:\n{self.output()}"
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def _request(
    url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=dict(headers or {}))  # noqa: S310 - http://127.0.0.1 only
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - as above
        result: dict[str, Any] = json.loads(response.read())
        return result


def _login(api: str, tenant_id: int, customer: dict[str, Any]) -> dict[str, str]:
    login = _request(
        f"{api}/v1/auth/login",
        {"tenant_id": tenant_id, "email": customer["email"], "password": customer["password"]},
    )
    assert login["customer_id"] == customer["customer_id"]
    return {"Authorization": f"Bearer {login['token']}"}


def _meter_credit(modbus_port: int) -> int:
    out = subprocess.run(
        [*VOLTCREDIT, "meter-sim", "status", "--port", str(modbus_port), "--unit", "1", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    status: dict[str, Any] = json.loads(out.stdout)
    assert status["meter"] == 1_000_001
    return int(status["credit_milli"])


def _ingest(directory: Path) -> dict[int, dict[str, Any]]:
    """The backend's per-meter ingest rows and billed totals, read only from its SQLite file."""
    db = sqlite3.connect(f"file:{directory / 'voltcredit.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT m.meter_id, m.last_ts, m.last_token_id, m.reconcile_diff_milli, m.pending,"
            " m.quarantine, (SELECT COUNT(*) FROM consumption_intervals c"
            " WHERE c.meter_id = m.meter_id AND c.import_wh > 0) FROM meter_ingest m"
        ).fetchall()
        alerts = db.execute("SELECT COUNT(*) FROM alerts WHERE kind = 'RECONCILIATION'").fetchone()
    finally:
        db.close()
    assert alerts == (0,), "the backend raised a reconciliation alert"
    keys = ("last_ts", "last_token_id", "diff", "pending", "quarantine", "consuming")
    return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}


def _agreeing(directory: Path, token_ids: dict[int, int], *, after: dict[int, int]) -> bool:
    """Every meter's newest reading shows the tokens in ``token_ids`` applied, is newer
    than ``after``, was billed with consumption, and the ledger agrees with its credit."""
    rows = _ingest(directory)
    return len(rows) == len(token_ids) and all(
        row["last_token_id"] >= token_ids[meter]
        and row["last_ts"] > after.get(meter, 0)
        and row["consuming"] > 0
        and row["diff"] == 0
        and row["pending"] == "{}"
        and row["quarantine"] is None
        for meter, row in rows.items()
    )


def _wait(what: str, check: Any, demo: Demo, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert demo.proc.poll() is None, f"demo exited:\n{demo.output()}"
        assert time.monotonic() < deadline, f"{what}:\n{demo.output()}"
        time.sleep(1)


def _port_free(port: int) -> bool:
    """Nobody listens on ``port`` (SO_REUSEADDR: the closed connections' TIME_WAIT is fine)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_demo_delivers_a_topup_and_restarts_from_its_data(tmp_path: Path) -> None:
    ports = {"http": free_port(), "modbus": free_port(), "mqtt": free_port()}
    api = f"http://127.0.0.1:{ports['http']}"
    directory = tmp_path / "demo"

    demo = Demo(directory, ports)
    try:
        demo.wait_ready()
        assert "provisioning: done (" in demo.output()
        state = json.loads((directory / "provisioned.json").read_text())
        assert (directory / "provisioned.json").stat().st_mode & 0o777 == 0o600
        assert (directory / "admin.key").stat().st_mode & 0o777 == 0o600
        customer = state["customers"][0]
        assert customer["email"] in demo.output()
        assert customer["password"] in demo.output()
        headers = _login(api, state["tenant_id"], customer)
        account = customer["account_id"]

        before = _meter_credit(ports["modbus"])
        topup = _request(
            f"{api}/v1/accounts/{account}/topups",
            {"amount_minor": AMOUNT_MINOR, "currency": "EUR"},
            {**headers, "Idempotency-Key": str(uuid.uuid4())},
        )
        deadline = time.monotonic() + 30
        while True:
            tokens = _request(f"{api}/v1/accounts/{account}/tokens", headers=headers)["items"]
            credit = [t for t in tokens if t["payment_id"] == topup["payment_id"]]
            if credit and credit[0]["status"] == "APPLIED":
                break
            assert time.monotonic() < deadline, f"token not applied: {tokens}\n{demo.output()}"
            time.sleep(0.5)
        after = _meter_credit(ports["modbus"])
        amount_milli = AMOUNT_MINOR * 1000
        assert credit[0]["result_status"] == "ACCEPTED"
        # Consumption only lowers credit, so the rise is at most the amount, and at
        # least the amount less what the meter can have consumed meanwhile.
        for seen in (credit[0]["credit_after_milli"], after):
            assert before + amount_milli - CONSUMPTION_BOUND_MILLI <= seen <= before + amount_milli
        receipt = _request(f"{api}/v1/payments/{topup['payment_id']}/receipt", headers=headers)
        assert receipt["status"] == "SUCCEEDED"
        assert receipt["credited_minor"] == AMOUNT_MINOR
        balance = _request(f"{api}/v1/accounts/{account}/balance", headers=headers)
        assert balance["meter_id"] == 1_000_001
        assert balance["tokens_in_flight"] == 0

        # Every meter got its opening top-up (message 2, after its tariff message) through
        # the ledger; the customer's consumption arrives in the backend, billed; the
        # ledger agrees with every meter's credit to the rating unit.
        assert [c["opening_minor"] for c in state["customers"]] == list(OPENING_MINOR)
        token_ids = {c["meter"]: 2 for c in state["customers"]}
        token_ids[customer["meter"]] = credit[0]["msg_id"]
        _wait(
            "the backend billing and agreeing",
            lambda: _agreeing(directory, token_ids, after={}),
            demo,
        )
        today = dt.datetime.now(dt.UTC).date()
        span = f"from={today - dt.timedelta(days=1)}&to={today + dt.timedelta(days=29)}"
        history = _request(
            f"{api}/v1/accounts/{account}/consumption?resolution=day&{span}", headers=headers
        )
        assert history["totals"]["energy_wh"] > 0
        assert history["totals"]["total_milli"] > 0
        seen = {meter: row["last_ts"] for meter, row in _ingest(directory).items()}
        # The demo printed the walkthrough for its own ports and directory.
        assert f"API={api};" in demo.output()
        assert f"mbpoll -a 5 -0 -t 4 -r 1 -1 127.0.0.1 -p {ports['modbus']} 1" in demo.output()
    finally:
        code = demo.stop()
    assert code == 0, demo.output()
    assert "demo stopped" in demo.output()
    assert all(_port_free(port) for port in ports.values())

    again = Demo(directory, ports)
    try:
        again.wait_ready()
        assert "provisioning: done before" in again.output()
        assert json.loads((directory / "provisioned.json").read_text()) == state
        _login(api, state["tenant_id"], state["customers"][1])
        headers = _login(api, state["tenant_id"], customer)
        tokens = _request(f"{api}/v1/accounts/{account}/tokens", headers=headers)["items"]
        assert [t["status"] for t in tokens if t["payment_id"] == topup["payment_id"]] == [
            "APPLIED"
        ]
        # The meters resume where they stopped: newer readings, billed, still agreeing.
        _wait(
            "the backend agreeing after the restart",
            lambda: _agreeing(directory, token_ids, after=seen),
            again,
        )
    finally:
        code = again.stop()
    assert code == 0, again.output()
    assert all(_port_free(port) for port in ports.values())


def test_readme_walkthrough_is_the_one_the_demo_prints() -> None:
    """README.md holds the walkthrough verbatim for the default ports and directory."""
    state = {
        "tenant_id": 1,
        "customers": [
            {
                "email": f"{name}@demo.example",
                "account_id": i + 1,
                "meter": 1_000_001 + i,
                "unit": i + 1,
                "opening_minor": OPENING_MINOR[i],
            }
            for i, name in enumerate(("anna", "ben", "clara", "david", "emma"))
        ],
    }
    steps = walkthrough(
        state,
        api="http://127.0.0.1:8080",
        modbus_port=5020,
        directory=Path("var/demo"),
        me=".venv/bin/voltcredit",
    )
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"```sh\n{steps}```" in readme
