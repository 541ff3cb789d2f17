"""``voltcredit demo``: the whole system on one machine, for a first look (README command 1).

It starts every component as its own process, exactly as production would run them,
and stops them all on Ctrl-C: an embedded MQTT broker (in this process; Mosquitto in
production), the backend (``voltcredit backend run``), a fleet of simulated prepaid
meters in accelerated time and a gateway polling them. On the first run it makes the
backend's signing key, the meters and the gateway trust it, and provisions a utility
over the HTTP API (tenant, partners, a time-of-use tariff, customers with supply
accounts, the gateway and its meters) and gives every customer an opening top-up through
the API, so the backend's ledger knows all the credit the meters hold: the backend then
ingests the gateway's readings, bills the consumption and reconciles each meter's credit
with the ledger. It prints the logins and the commands of the README walkthrough. State
lives in ``var/demo/`` so a second run continues where the first stopped.

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
from collections.abc import Awaitable, Callable
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
#: Opening top-up per customer (minor units), by position; customers past the list get
#: the first amount. Emma's meter draws a constant 1.8 kW (1.8 kWh per real minute at
#: x60, 0.43 to 0.66 EUR a minute): her 1.50 runs out a few minutes after start, so a
#: newcomer sees emergency credit, the relay open and a top-up reconnect her.
OPENING_MINOR: Final = (2000, 2000, 2000, 2000, 150)
#: The meters' emergency credit and low-credit threshold (meter_sim options): small, so
#: emergency credit lasts minutes at x60; the threshold matches the accounts' below.
EMERGENCY_LIMIT: Final = "1.00"
LOW_CREDIT: Final = "3.00"
#: Readings are stamped with the meters' own clocks, which run ``--speed`` times faster
#: than the backend's (and resume from where they stopped on the next run): without this
#: the backend would quarantine every reading more than 15 minutes ahead of its clock
#: (FUTURE_TIMESTAMP). Ten years of meter time is two months of demo running at x60.
MAX_CLOCK_AHEAD_S: Final = 10 * 365 * 86_400
READY_TIMEOUT_S: Final = 60.0
#: How long provisioning waits for a meter's first reading, and for a token to be applied.
WAIT_S: Final = 60.0


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
        "[ingest]",
        "# The meters run in accelerated time: their clocks run ahead of the backend's.",
        f"max_clock_ahead_s = {MAX_CLOCK_AHEAD_S}",
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


def _older_demo(directory: Path) -> str | None:
    """Why ``directory`` cannot be continued (made by an older demo), or None."""
    if (directory / "meters").exists() and not (directory / "backend-keys.pub").exists():
        return "trust another key"
    provisioned = directory / "provisioned.json"
    if provisioned.exists():
        # A file this function cannot make sense of is left to the provisioning to refuse.
        with contextlib.suppress(ValueError, OSError, TypeError, AttributeError, IndexError):
            state = json.loads(provisioned.read_text())
            customers = state.get("customers") or [{}]
            if state.get("done") and "opening_minor" not in customers[0]:
                # Before the backend billed consumption, meters started with credit of
                # their own, which the ledger does not know (a reconciliation alert each).
                return "hold credit the backend's ledger does not know"
    return None


# ------------------------------------------------------------------------ command


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or ``--for-seconds``)."""
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    older = _older_demo(directory)
    if older is not None:
        print(
            f"voltcredit demo: {directory} was made by an older demo whose meters {older}; "
            f"delete it (rm -r {directory}) and run the demo again",
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
        # New meters hold no credit: the opening top-ups bring it through the ledger. With
        # none, a meter leaves its relay open (emergency credit offered), so no energy
        # flows before the backend has its first reading. No friendly hours for the same
        # reason (a meter in them keeps supplying at zero credit) and so that running out
        # of credit shows at once (tests/e2e/test_credit_cycle.py has a friendly night).
        "--credit",
        "0.00",
        "--emergency-limit",
        EMERGENCY_LIMIT,
        "--low-credit",
        LOW_CREDIT,
        "--state-dir",
        str(directory / "meters"),
        "--status-every",
        "60",
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
            provisioner = _Provisioner(http, self.api, self.admin, self.directory)
            state = await provisioner.run(self.args.meters)
            await provisioner.open_accounts()
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
        logins = "\n".join(
            f"    {c['email']:<22} password {c['password']}  (supply account {c['account_id']}, "
            f"meter {c['meter']}, Modbus unit {c['unit']}, opening top-up "
            f"{c['opening_minor'] / 100:.2f} EUR)"
            for c in state["customers"]
        )
        api = self.api
        steps = walkthrough(
            state, api=api, modbus_port=self.args.modbus_port, directory=self.directory, me=me
        )
        print(
            f"\nbackend: {api}  (API docs: {api}/docs, OpenAPI: {api}/openapi.json)\n"
            f"  tenant {state['tenant_id']} {TENANT!r}; its UTILITY_ADMIN API key:\n"
            f"    {state['tenant_key']}\n"
            f"  platform admin key: {self.directory}/admin.key\n"
            f"  customer logins (tenant_id {state['tenant_id']}):\n{logins}\n\n"
            "the README walkthrough, in another terminal in this directory (flush left, so\n"
            "that it pastes as it is):\n\n"
            f"{steps}\n{me} gateway status --config {self.directory}/gateway.toml\n\n"
            "demo ready. Ctrl-C stops everything; state is kept.",
            flush=True,
        )


#: The README's walkthrough (section "Walkthrough"); ``@NAME@`` are filled in by
#: :func:`walkthrough`. tests/e2e/test_demo.py checks that the README holds it verbatim
#: for the default ports and directory.
WALKTHROUGH: Final = """\
# log in as @EMAIL@ (supply account @ACCOUNT@, meter @METER@ = Modbus unit @UNIT@)
API=@API@; J='Content-Type: application/json'
demo() { python3 -c "import json; print(json.load(open('@DIR@/provisioned.json'))$1)"; }
PW=$(demo '["customers"][@INDEX@]["password"]')   # the demo printed it too
TOKEN=$(curl -s -H "$J" $API/v1/auth/login \\
  -d '{"tenant_id": @TENANT@, "email": "@EMAIL@", "password": "'"$PW"'"}' \\
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
H="Authorization: Bearer $TOKEN"

# the credit as the ledger has it (cents) and as the meter last reported it (1/1000 cent)
curl -s -w '\\n' -H "$H" $API/v1/accounts/@ACCOUNT@/balance
# the meter itself, over Modbus (firmware_protocol/MODBUS.md): credit_milli is an i64 at
# 46..49 whose low half (48), read as an int32, is the whole value under 21,474 EUR; then
# credit_state (1 in credit, 2 low, 3 emergency credit offered, 4 on emergency credit,
# 7 disconnected), relay_state (0 open, 1 closed) and status_flags at 54..56
mbpoll -a @UNIT@ -0 -t 3:int -B -r 48 -c 1 -1 127.0.0.1 -p @PORT@ | grep '^\\['
mbpoll -a @UNIT@ -0 -t 3 -r 54 -c 3 -1 127.0.0.1 -p @PORT@ | grep '^\\['
@VC@ meter-sim status --port @PORT@ --unit @UNIT@   # the same, for people

# consumption and its cost, billed from every reading (each 10 s, ten meter minutes), by
# the meter's hours; its clock runs 60 times faster than the backend's, so ask for a month
# ahead; the newest hours last
DAYS="from=$(date -d yesterday +%F)&to=$(date -d '29 days' +%F)"
curl -s -H "$H" "$API/v1/accounts/@ACCOUNT@/consumption?resolution=hour&$DAYS" | python3 -c '
import json, sys
hours = [b for b in json.load(sys.stdin)["buckets"] if b["readings"]]
for b in hours[-5:]:
    print(b["local_start"], b["energy_wh"], "Wh", b["total_milli"] / 100_000, "EUR")'

# @NAME@'s opening @OPENING@ EUR lasts minutes at 1.8 kW: then the relay opens (credit_state 3,
# relay_state 0). Take emergency credit (a real meter's button) and supply returns (4, 1)
# until the debt reaches the 1.00 EUR limit; then the relay opens for good (7, 0)
mbpoll -a @UNIT@ -0 -t 4 -r 1 -1 127.0.0.1 -p @PORT@ 1 | grep Written
mbpoll -a @UNIT@ -0 -t 3 -r 54 -c 3 -1 127.0.0.1 -p @PORT@ | grep '^\\['

# top up 10.00 EUR: the meter repays the debt first, the rest is credit, the relay closes
PAY=$(curl -s -H "$H" -H "$J" -H "Idempotency-Key: $(date +%s%N)" \\
  $API/v1/accounts/@ACCOUNT@/topups -d '{"amount_minor": 1000, "currency": "EUR"}' \\
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["payment_id"])')
sleep 3   # the sandbox settles the payment; the token reaches the meter within a second or two
curl -s -w '\\n' -H "$H" $API/v1/accounts/@ACCOUNT@/tokens   # CREDIT: ISSUED, SENT, APPLIED
curl -s -w '\\n' -H "$H" $API/v1/payments/$PAY/receipt
mbpoll -a @UNIT@ -0 -t 3:int -B -r 48 -c 1 -1 127.0.0.1 -p @PORT@ | grep '^\\['
mbpoll -a @UNIT@ -0 -t 3 -r 54 -c 3 -1 127.0.0.1 -p @PORT@ | grep '^\\['

# the ledger agrees with the meter: after the next reading, ledger_balance_minor x 1000 and
# meter_credit_milli differ by less than a cent (the fraction carried to the next reading),
# and the utility (its API key is in @DIR@/provisioned.json) has no reconciliation alert
curl -s -w '\\n' -H "$H" $API/v1/accounts/@ACCOUNT@/balance
KEY=$(demo '["tenant_key"]')
curl -s -w '\\n' -H "Authorization: Bearer $KEY" "$API/v1/alerts?kind=RECONCILIATION"
curl -s -w '\\n' -H "Authorization: Bearer $KEY" "$API/v1/alerts?kind=OUT_OF_CREDIT"
"""


def walkthrough(
    state: dict[str, Any], *, api: str, modbus_port: int, directory: Path, me: str
) -> str:
    """The walkthrough's commands for this demo, about the customer who runs out first."""
    customers = state["customers"]
    index = min(range(len(customers)), key=lambda i: (customers[i]["opening_minor"], -i))
    who = customers[index]
    text = WALKTHROUGH
    for name, value in (
        ("API", api),
        ("PORT", str(modbus_port)),
        ("DIR", str(directory)),
        ("VC", me),
        ("TENANT", str(state["tenant_id"])),
        ("INDEX", str(index)),
        ("EMAIL", who["email"]),
        ("NAME", who["email"].partition("@")[0].capitalize()),
        ("ACCOUNT", str(who["account_id"])),
        ("METER", str(who["meter"])),
        ("UNIT", str(who["unit"])),
        ("OPENING", f"{who['opening_minor'] / 100:.2f}"),
    ):
        text = text.replace(f"@{name}@", value)
    return text


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

    async def _post(
        self, path: str, body: dict[str, Any], *, key: str, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}", **(headers or {})}
        async with self.http.post(f"{self.api}{path}", json=body, headers=headers) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            if response.status not in (200, 201):
                raise DemoError(
                    f"POST {path}: {response.status} {data.get('title')}: {data.get('detail')} "
                    f"(delete {self.path.parent} to start afresh)"
                )
            return data

    async def _get(self, path: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.state['tenant_key']}"}
        async with self.http.get(f"{self.api}{path}", headers=headers) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            if response.status != 200:
                raise DemoError(f"GET {path}: {response.status} {data.get('title')}")
            return data

    async def _step(
        self,
        name: str,
        path: str,
        body: dict[str, Any],
        *,
        admin: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """POST once: the answer is kept under ``name`` and not asked for again."""
        if name not in self.state:
            key = self.admin if admin else self.state["tenant_key"]
            self.state[name] = await self._post(path, body, key=key, headers=headers)
            self._save()
        return self.state[name]

    async def _until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Poll ``check`` until it holds; DemoError after :data:`WAIT_S`."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not await check():
            if asyncio.get_running_loop().time() > deadline:
                raise DemoError(f"{what} did not happen within {WAIT_S:.0f} s")
            await asyncio.sleep(0.5)

    async def open_accounts(self) -> None:
        """Every customer's opening top-up, once (a run stopped half-way finishes them)."""
        if self.state.get("opened"):
            return
        print("opening top-ups (each after the meter's first reading) ...", flush=True)
        limit = asyncio.Semaphore(8)  # a large --meters fleet must not flood the API

        async def one(i: int, customer: dict[str, Any]) -> None:
            async with limit:
                await self._open_account(i, customer)

        await asyncio.gather(*(one(i, c) for i, c in enumerate(self.state["customers"])))
        self.state["opened"] = True
        self._save()
        print("opening top-ups: applied by every meter", flush=True)

    async def _open_account(self, i: int, customer: dict[str, Any]) -> None:
        """The opening top-up of customer ``i``, once the backend has the meter's baseline.

        The meter starts with no credit and its relay open, so nothing is consumed before
        the backend's first reading of it (the baseline it bills from) and the meter's
        credit equals the ledger's balance from then on. Waiting also for the meter's
        tariff message keeps the order: tariff first, then the energy the top-up lets
        flow (a tariff activation restarts the meter's band registers).
        """
        account = customer["account_id"]
        if f"opening_{i}" not in self.state:

            async def baseline() -> bool:
                # The balance's meter_credit_at is the time of the meter's newest report:
                # a token result (the gateway's clock, before the backend completed the
                # token) or an ingested reading (the meter's clock). A report later than
                # the completion of every token so far is a reading: the baseline exists.
                balance = await self._get(f"/v1/accounts/{account}/balance")
                tokens = (await self._get(f"/v1/accounts/{account}/tokens"))["items"]
                done = [
                    dt.datetime.fromisoformat(t["completed_at"])
                    for t in tokens
                    if t["completed_at"]
                ]
                if balance["meter_credit_at"] is None or balance["tokens_in_flight"] or not done:
                    return False
                return dt.datetime.fromisoformat(balance["meter_credit_at"]) > max(done)

            await self._until(f"the first reading of meter {customer['meter']}", baseline)
        # The same Idempotency-Key on every run: a run stopped after the POST but before
        # saving its answer gets the same payment back, never a second one.
        payment = await self._step(
            f"opening_{i}",
            f"/v1/accounts/{account}/topups",
            {"amount_minor": customer["opening_minor"], "currency": "EUR"},
            headers={"Idempotency-Key": f"demo-opening-{account}"},
        )

        async def applied() -> bool:
            tokens = (await self._get(f"/v1/accounts/{account}/tokens"))["items"]
            return any(
                t["payment_id"] == payment["payment_id"] and t["status"] == "APPLIED"
                for t in tokens
            )

        await self._until(f"the opening top-up of meter {customer['meter']}", applied)

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
                    "opening_minor": OPENING_MINOR[i if i < len(OPENING_MINOR) else 0],
                }
            )
        self.state["customers"] = customers
        self.state["done"] = True
        self._save()
        print(f"provisioning: done ({self.path})", flush=True)
        return self.state
