"""``voltcredit demo``: the whole system on one machine, for a first look (README command 1).

It starts every component as its own process, exactly as production would run them,
and stops them all on Ctrl-C: an embedded MQTT broker (in this process; Mosquitto in
production), the backend (``voltcredit backend run``), a fleet of simulated prepaid
meters in accelerated time and a gateway polling them. On the first run it makes the
backend's signing key, the meters and the gateway trust it, and provisions a utility
over the HTTP API (tenant, partners, a time-of-use tariff, customers with supply
accounts, the gateway and its meters); it prints the logins and the commands to top up.
State lives in ``var/demo/`` so a second run continues where the first stopped.

This module imports no meter_sim or gateway code: it launches ``voltcredit`` sub-commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Final

import aiohttp
from amqtt.broker import Broker  # the demo's embedded broker (Mosquitto in production)

from backend.keys.store import FileKeyStore, KeyState

TENANT: Final = "Stadtwerke Demo"
GATEWAY_ID: Final = "demo-gw"
FIRST_METER: Final = 1_000_001
TARIFF_CODE: Final = "demo-tou"
#: meter_sim's default tariff (meter_sim/cli.py ``default_tariff``), without its id: the
#: backend numbers tariff versions itself.
TARIFF: Final = {
    "currency": "EUR",
    "timezone": "Europe/Berlin",
    "bands": [
        {"name": "offpeak", "price_milli_per_kwh": 24_000},
        {"name": "peak", "price_milli_per_kwh": 36_500},
    ],
    "weekday": [[0, 0], [7 * 60, 1], [21 * 60, 0]],
    "weekend": [[0, 0]],
    "holiday": [[0, 0]],
    "standing_charge_milli_per_day": 39_000,
    "holidays": [],
    "blocks": [],
}
CUSTOMERS: Final = ("anna", "ben", "clara", "david", "emma")
PROFILES: Final = (
    "household",
    "constant:450",
    "household:evening_peak_w=2500",
    "csv:{csv}",
    "constant:1800",
)
READY_TIMEOUT_S: Final = 60.0


class DemoError(Exception):
    """The demo cannot start or provision (message for the user)."""


def register(subparsers: Any) -> None:
    """Add ``demo`` to the root command."""
    p = subparsers.add_parser(
        "demo",
        help="run the whole system on this machine (backend, broker, gateway, simulated meters)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", type=Path, default=Path("var/demo"), help="state (default %(default)s)")
    p.add_argument("--meters", type=int, default=5, help="simulated meters (default 5)")
    p.add_argument("--speed", type=int, default=60, help="simulated s per real s (default 60)")
    p.add_argument("--http-port", type=int, default=8080, help="backend's HTTP port")
    p.add_argument("--modbus-port", type=int, default=5020, help="meters' Modbus TCP port")
    p.add_argument("--mqtt-port", type=int, default=11883, help="embedded broker port")
    p.add_argument("--for-seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    p.set_defaults(func=cmd_demo)


# ------------------------------------------------------------------------ files


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (it must not exist yet)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _secret_file(path: Path, make: str) -> str:
    """The secret in ``path``; ``make`` is written there (0600) the first time."""
    if not path.exists():
        _write_private(path, make + "\n")
    return path.read_text().strip()


def _backend_key(directory: Path) -> tuple[int, str, Path]:
    """The backend's ACTIVE signing key (made once) and the public-key file meters read."""
    store = FileKeyStore(directory / "keys", create=True)
    if not store.list():
        store.generate()
    active = next(i for i in store.list() if i.state is KeyState.ACTIVE)
    pub = directory / "backend-keys.pub"
    pub.write_text(f"{active.key_id} {active.public_key.hex()}\n")
    return active.key_id, active.public_key.hex(), pub


def _backend_config(directory: Path, http_port: int, mqtt_port: int) -> tuple[Path, str]:
    """The backend's TOML (SQLite, key store, embedded broker) and the bootstrap admin key."""
    admin = _secret_file(
        directory / "admin.key", f"vck_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    )
    token_secret = _secret_file(directory / "token-secret", secrets.token_hex(32))
    base = directory.resolve()
    # The sandbox payment provider runs in its default mode: it completes every payment
    # by itself a moment later and POSTs the signed webhook to this backend.
    lines = [
        "[database]",
        f'url = "sqlite+aiosqlite:///{base / "voltcredit.db"}"',
        "[http]",
        'host = "127.0.0.1"',
        f"port = {http_port}",
        "[keys]",
        f'dir = "{base / "keys"}"',
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        "[auth]",
        f'token_secret = "{token_secret}"',
        f'bootstrap_admin_key = "{admin}"',
        "customer_token_ttl_s = 3600",
    ]
    path = directory / "backend.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, admin


def _gateway_config(
    directory: Path, key: tuple[int, str], meters: int, modbus_port: int, mqtt_port: int
) -> Path:
    """The demo gateway's TOML: every simulated meter, the embedded broker, the backend key."""
    lines = [
        f'gateway_id = "{GATEWAY_ID}"',
        "poll_interval_s = 10",
        "",
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        "",
        "[store]",
        f'path = "{(directory / "gateway.sqlite").resolve()}"',
        "",
        "[[trusted_keys]]",
        f"id = {key[0]}",
        f'public_key = "{key[1]}"',
    ]
    for i in range(meters):
        lines += [
            "",
            "[[meters]]",
            f"id = {FIRST_METER + i}",
            'driver = "modbus_tcp"',
            'host = "127.0.0.1"',
            f"port = {modbus_port}",
            f"unit = {i + 1}",
        ]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _voltcredit() -> list[str]:
    """How to start a sub-command: the same interpreter and entry point as this process."""
    return [sys.executable, "-c", "import sys; from backend.cli import main; sys.exit(main())"]


# ------------------------------------------------------------------------ command


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or ``--for-seconds``)."""
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "meters").exists() and not (directory / "backend-keys.pub").exists():
        print(
            f"voltcredit demo: {directory} was made by an older demo whose meters trust "
            f"another key; delete it (rm -r {directory}) and run the demo again",
            file=sys.stderr,
        )
        return 2
    key_id, key_hex, pub = _backend_key(directory)
    backend_toml, admin = _backend_config(directory, args.http_port, args.mqtt_port)
    csv = Path(__file__).resolve().parents[1] / "meter_sim" / "profiles" / "household_example.csv"
    profiles = [p.format(csv=csv) for p in PROFILES]
    backend_cmd = [*_voltcredit(), "backend", "run", "--config", str(backend_toml)]
    meter_cmd = [
        *_voltcredit(),
        "meter-sim",
        "run",
        "--meters",
        str(args.meters),
        "--port",
        str(args.modbus_port),
        "--speed",
        str(args.speed),
        "--trusted-key",
        str(pub),
        "--credit",
        "20.00",
        "--state-dir",
        str(directory / "meters"),
        "--status-every",
        "60",
        "--friendly-night",
        "22:00-06:00",
        *(x for p in profiles for x in ("--profile", p)),
    ]
    gateway_cmd = [
        *_voltcredit(),
        "gateway",
        "run",
        "--config",
        str(
            _gateway_config(
                directory, (key_id, key_hex), args.meters, args.modbus_port, args.mqtt_port
            )
        ),
    ]
    print(
        "voltcredit demo\n"
        f"  state:   {directory}/ (delete it to start afresh)\n"
        f"  broker:  embedded MQTT (amqtt) on 127.0.0.1:{args.mqtt_port}\n"
        f"  backend: http://127.0.0.1:{args.http_port} ({backend_toml}, SQLite "
        f"{directory}/voltcredit.db, signing key {key_id} in {directory}/keys)\n"
        f"  meters:  {args.meters} simulated prepaid meters, Modbus TCP "
        f"127.0.0.1:{args.modbus_port}, units 1..{args.meters} (serials {FIRST_METER}..), "
        f"time x{args.speed}\n"
        f"  gateway: {GATEWAY_ID} polling every meter every 10 s ({directory}/gateway.toml)\n",
        flush=True,
    )
    demo = _Demo(args, directory, admin)
    return asyncio.run(demo.supervise([backend_cmd, meter_cmd, gateway_cmd]))


class _Demo:
    """The running demo: broker, processes, provisioning, shutdown."""

    def __init__(self, args: argparse.Namespace, directory: Path, admin: str) -> None:
        self.args = args
        self.directory = directory
        self.admin = admin
        self.api = f"http://127.0.0.1:{args.http_port}"

    async def supervise(self, commands: list[list[str]]) -> int:
        """Run the broker and the component processes until a signal, a timeout, or an exit."""
        broker = Broker(
            {
                "listeners": {
                    "default": {"type": "tcp", "bind": f"127.0.0.1:{self.args.mqtt_port}"}
                },
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await broker.start()
        try:
            return await self._run_processes(commands)
        finally:
            await broker.shutdown()

    async def _run_processes(self, commands: list[list[str]]) -> int:
        """Start each command and provision; stop them all (SIGINT, then SIGKILL after 15 s)."""
        procs: list[asyncio.subprocess.Process] = []
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        failed_setup = False
        try:
            for command in commands:
                print("$ voltcredit", shlex.join(command[3:]), flush=True)
                procs.append(await asyncio.create_subprocess_exec(*command))
            waiters = [asyncio.create_task(p.wait()) for p in procs]
            stopper = asyncio.create_task(stop.wait())
            setup = asyncio.create_task(self._setup())
            done, _ = await asyncio.wait(
                [*waiters, stopper, setup], return_when=asyncio.FIRST_COMPLETED
            )
            if setup in done and setup.exception() is None:
                done, _ = await asyncio.wait(
                    [*waiters, stopper],
                    timeout=self.args.for_seconds or None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            elif setup in done:
                failed_setup = True
                print(f"voltcredit demo: error: {setup.exception()}", file=sys.stderr, flush=True)
            else:
                setup.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await setup
            failed = [p for p in procs if p.returncode not in (None, 0)]
            stopper.cancel()
            return 1 if failed or failed_setup else 0
        finally:
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    try:
                        await asyncio.wait_for(p.wait(), 15)
                    except TimeoutError:
                        p.kill()
                        await p.wait()
            print("demo stopped; state kept in", self.directory, flush=True)

    async def _setup(self) -> None:
        """Wait for the backend, provision once, print how to use the demo."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await self._wait_ready(http)
            state = await _Provisioner(http, self.api, self.admin, self.directory).run(
                self.args.meters
            )
        self._print_usage(state)

    async def _wait_ready(self, http: aiohttp.ClientSession) -> None:
        """Poll ``/readyz`` until the backend has migrated and answers."""
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{self.api}/readyz") as response:
                    if response.status == 200:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise DemoError(f"the backend did not answer {self.api}/readyz in time")
            await asyncio.sleep(0.3)

    def _print_usage(self, state: dict[str, Any]) -> None:
        me = ".venv/bin/voltcredit" if Path(".venv/bin/voltcredit").exists() else "voltcredit"
        first = state["customers"][0]
        logins = "\n".join(
            f"    {c['email']:<22} password {c['password']}  (supply account {c['account_id']}, "
            f"meter {c['meter']}, Modbus unit {c['unit']})"
            for c in state["customers"]
        )
        api = self.api
        print(
            f"\nbackend: {api}  (API docs: {api}/docs, OpenAPI: {api}/openapi.json)\n"
            f"  tenant {state['tenant_id']} {TENANT!r}; its UTILITY_ADMIN API key:\n"
            f"    {state['tenant_key']}\n"
            f"  platform admin key: {self.directory}/admin.key\n"
            f"  customer logins (tenant_id {state['tenant_id']}):\n{logins}\n\n"
            "try, in another terminal:\n"
            f"  API={api}; J='Content-Type: application/json'\n"
            f'  TOKEN=$(curl -s -H "$J" $API/v1/auth/login -d \'{{"tenant_id": '
            f'{state["tenant_id"]}, "email": "{first["email"]}", "password": '
            f"\"{first['password']}\"}}' | python3 -c 'import json,sys; "
            'print(json.load(sys.stdin)["token"])\')\n'
            '  H="Authorization: Bearer $TOKEN"\n'
            f'  curl -s -H "$H" -H "$J" -H "Idempotency-Key: $(date +%s%N)" '
            f"$API/v1/accounts/{first['account_id']}/topups "
            '-d \'{"amount_minor": 1000, "currency": "EUR"}\'   # 10.00 EUR → payment_id\n'
            f'  curl -s -H "$H" $API/v1/accounts/{first["account_id"]}/balance\n'
            f'  curl -s -H "$H" $API/v1/accounts/{first["account_id"]}/tokens   '
            "# the token: ISSUED → SENT → APPLIED\n"
            '  curl -s -H "$H" $API/v1/payments/<payment_id>/receipt\n'
            f"  {me} meter-sim status --port {self.args.modbus_port} --unit 1   "
            "# the meter's credit rose by 10.00\n"
            f"  {me} gateway status --config {self.directory}/gateway.toml\n\n"
            "demo ready. Ctrl-C stops everything; state is kept.",
            flush=True,
        )


class _Provisioner:
    """Creates the demo utility over the HTTP API, each step once (progress in a file)."""

    def __init__(self, http: aiohttp.ClientSession, api: str, admin: str, directory: Path) -> None:
        self.http = http
        self.api = api
        self.admin = admin
        self.path = directory / "provisioned.json"
        self.state: dict[str, Any] = {}

    def _save(self) -> None:
        # The file holds the tenant's admin key and customer passwords: 0600, replaced whole.
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f, indent=2)
        tmp.replace(self.path)

    async def _post(self, path: str, body: dict[str, Any], *, key: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.post(f"{self.api}{path}", json=body, headers=headers) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            if response.status not in (200, 201):
                raise DemoError(
                    f"POST {path}: {response.status} {data.get('title')}: {data.get('detail')} "
                    f"(delete {self.path.parent} to start afresh)"
                )
            return data

    async def _step(
        self, name: str, path: str, body: dict[str, Any], *, admin: bool = False
    ) -> Any:
        """POST once: the answer is kept under ``name`` and not asked for again."""
        if name not in self.state:
            key = self.admin if admin else self.state["tenant_key"]
            self.state[name] = await self._post(path, body, key=key)
            self._save()
        return self.state[name]

    async def run(self, meters: int) -> dict[str, Any]:
        """Provision what is missing; return the summary that is printed."""
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
        if self.state.get("done"):
            print(f"provisioning: done before ({self.path}), skipped", flush=True)
            return self.state
        print("provisioning the demo utility over the API ...", flush=True)
        tenant = await self._step(
            "tenant",
            "/v1/tenants",
            {
                "name": TENANT,
                "currency": "EUR",
                "timezone": "Europe/Berlin",
                "min_topup_minor": 100,
                "max_topup_minor": 50_000,
            },
            admin=True,
        )
        self.state["tenant_id"] = tenant["id"]
        key = await self._step(
            "api_key",
            "/v1/api-keys",
            {"name": "demo utility admin", "role": "UTILITY_ADMIN", "tenant_id": tenant["id"]},
            admin=True,
        )
        self.state["tenant_key"] = key["key"]
        reseller = await self._step("reseller", "/v1/resellers", {"name": "Kiosk am Markt"})
        for name, body in (
            ("partner_utility", {"name": "Stadtwerke Demo Vertrieb", "kind": "UTILITY"}),
            ("partner_grid", {"name": "Netz Demo GmbH", "kind": "GRID_OPERATOR"}),
            (
                "partner_reseller",
                {"name": "Kiosk am Markt", "kind": "RESELLER", "reseller_id": reseller["id"]},
            ),
            ("partner_tax", {"name": "Finanzamt Demo (VAT)", "kind": "TAX_AUTHORITY"}),
        ):
            await self._step(name, "/v1/partners", body)
        activation = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        await self._step(
            "tariff",
            "/v1/tariffs",
            {"code": TARIFF_CODE, "activation_at": activation, "tariff": TARIFF},
        )
        # The tariff's split rules (after the tariff: a rule set needs a published code).
        # Consumption: grid fee 9 ct/kWh (9_000 milli), VAT 19 % included = 1597 bp of the
        # gross, the rest to the utility. Top-ups: 3 % commission to the reseller's partner
        # (it applies to that reseller's customers only), the rest stays credit. A PUT
        # replaces the whole set, so repeating a step is harmless; each is done once.
        ids = {n: self.state[n]["id"] for n in ("partner_utility", "partner_grid", "partner_tax")}
        for name, applies_to, rules in (
            (
                "split_consumption",
                "CONSUMPTION",
                [
                    {"kind": "PER_KWH", "partner_id": ids["partner_grid"], "value": 9_000},
                    {"kind": "BASIS_POINTS", "partner_id": ids["partner_tax"], "value": 1597},
                    {"kind": "REMAINDER", "partner_id": ids["partner_utility"]},
                ],
            ),
            (
                "split_topup",
                "TOPUP",
                [
                    {
                        "kind": "BASIS_POINTS",
                        "partner_id": self.state["partner_reseller"]["id"],
                        "value": 300,
                    },
                    {"kind": "REMAINDER", "partner_id": ids["partner_utility"]},
                ],
            ),
        ):
            if name in self.state:
                continue
            path = f"/v1/tariffs/{TARIFF_CODE}/split-rules/{applies_to}"
            headers = {"Authorization": f"Bearer {self.state['tenant_key']}"}
            async with self.http.put(
                f"{self.api}{path}", json={"rules": rules}, headers=headers
            ) as response:
                data = await response.json(content_type=None)
                if response.status != 200:
                    raise DemoError(
                        f"PUT {path}: {response.status} {data.get('title')}: "
                        f"{data.get('detail')} (delete {self.path.parent} to start afresh)"
                    )
            self.state[name] = data
            self._save()
        await self._step("gateway", "/v1/gateways", {"id": GATEWAY_ID})
        customers = []
        for i in range(meters):
            who = CUSTOMERS[i] if i < len(CUSTOMERS) else f"customer{i + 1}"
            password = self.state.setdefault(f"password_{i}", secrets.token_urlsafe(9))
            customer = await self._step(
                f"customer_{i}",
                "/v1/customers",
                {"name": who.capitalize(), "email": f"{who}@demo.example", "password": password},
            )
            account = await self._step(
                f"account_{i}",
                "/v1/supply-accounts",
                {
                    "customer_id": customer["id"],
                    "tariff_code": TARIFF_CODE,
                    "label": f"Demostraße {i + 1}, Berlin",
                    "debt_limit_minor": 500,
                    "low_credit_minor": 300,
                },
            )
            await self._step(
                f"meter_{i}",
                "/v1/meters",
                {
                    "serial": FIRST_METER + i,
                    "gateway_id": GATEWAY_ID,
                    "supply_account_id": account["id"],
                    "modbus_unit": i + 1,
                },
            )
            customers.append(
                {
                    "email": customer["email"],
                    "password": password,
                    "customer_id": customer["id"],
                    "account_id": account["id"],
                    "meter": FIRST_METER + i,
                    "unit": i + 1,
                }
            )
        self.state["customers"] = customers
        self.state["done"] = True
        self._save()
        print(f"provisioning: done ({self.path})", flush=True)
        return self.state
