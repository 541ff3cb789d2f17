"""``voltcredit demo``: the whole system on one machine, for a first look (README command 1).

It starts every component as its own process, exactly as production would run them,
and stops them all on Ctrl-C. State lives in ``var/demo/`` so a second run continues
where the first stopped. What runs grows with the project: today a fleet of simulated
prepaid meters with different load profiles in accelerated time, a demo signing key,
and the commands to read and top up a meter by hand. The backend, broker and gateway
join as they are built (issues 4 to 7).

This module imports no other voltcredit package: it launches ``voltcredit`` sub-commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Final

from amqtt.broker import Broker  # the demo's embedded broker (Mosquitto in production)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

DEMO_KEY_ID: Final = 1
PROFILES: Final = (
    "household",
    "constant:450",
    "household:evening_peak_w=2500",
    "csv:{csv}",
    "constant:1800",
)


def register(subparsers: Any) -> None:
    """Add ``demo`` to the root command."""
    p = subparsers.add_parser(
        "demo",
        help="run the whole system on this machine (simulated meters, accelerated time)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", type=Path, default=Path("var/demo"), help="state (default %(default)s)")
    p.add_argument("--meters", type=int, default=5, help="simulated meters (default 5)")
    p.add_argument("--speed", type=int, default=60, help="simulated s per real s (default 60)")
    p.add_argument("--modbus-port", type=int, default=5020, help="meters' Modbus TCP port")
    p.add_argument("--mqtt-port", type=int, default=11883, help="embedded broker port")
    p.add_argument("--for-seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    p.set_defaults(func=cmd_demo)


def _demo_key(directory: Path) -> tuple[Path, Path]:
    """The demo signing key pair (created once; the seed file is 0600)."""
    seed_path, pub_path = directory / "demo-key.seed", directory / "demo-key.pub"
    if not seed_path.exists():
        key = Ed25519PrivateKey.generate()
        fd = os.open(seed_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex() + "\n")
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        pub_path.write_text(f"{DEMO_KEY_ID} {raw.hex()}\n")
    return seed_path, pub_path


def _gateway_config(
    directory: Path, pub: Path, meters: int, modbus_port: int, mqtt_port: int
) -> Path:
    """The demo gateway's TOML: every simulated meter, the embedded broker, the demo key."""
    key_id, hex_key = pub.read_text().split()
    lines = [
        'gateway_id = "demo-gw"',
        "poll_interval_s = 10",
        "",
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        "",
        "[store]",
        f'path = "{(directory / "gateway.sqlite").resolve()}"',
        "",
        "[[trusted_keys]]",
        f"id = {key_id}",
        f'public_key = "{hex_key}"',
    ]
    for i in range(meters):
        lines += [
            "",
            "[[meters]]",
            f"id = {1_000_001 + i}",
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or ``--for-seconds``)."""
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    seed, pub = _demo_key(directory)
    csv = Path(__file__).resolve().parents[1] / "meter_sim" / "profiles" / "household_example.csv"
    profiles = [p.format(csv=csv) for p in PROFILES]
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
        "10",
        "--friendly-night",
        "22:00-06:00",
        *(x for p in profiles for x in ("--profile", p)),
    ]
    gateway_cmd = [
        *_voltcredit(),
        "-v",
        "gateway",
        "run",
        "--config",
        str(_gateway_config(directory, pub, args.meters, args.modbus_port, args.mqtt_port)),
    ]
    me = "voltcredit" if Path(sys.argv[0]).name == "voltcredit" else ".venv/bin/voltcredit"
    me = ".venv/bin/voltcredit" if Path(".venv/bin/voltcredit").exists() else me
    print(
        "voltcredit demo\n"
        f"  state:   {directory}/ (delete it to start afresh)\n"
        f"  meters:  {args.meters} simulated prepaid meters, Modbus TCP "
        f"127.0.0.1:{args.modbus_port}, units 1..{args.meters} (serials 1000001..), "
        f"time x{args.speed}\n"
        f"  key:     {pub} (public), {seed} (demo private key, 0600)\n"
        f"  broker:  embedded MQTT (amqtt) on 127.0.0.1:{args.mqtt_port}\n"
        f"  gateway: demo-gw polling every meter every 10 s ({directory}/gateway.toml)\n\n"
        "try, in another terminal:\n"
        f"  {me} meter-sim status --port {args.modbus_port} --unit 1 --events\n"
        f"  mbpoll -a 1 -0 -t 3:hex -r 46 -c 4 -1 127.0.0.1 -p {args.modbus_port}   "
        "# credit_milli: 4 words, high first (firmware_protocol/MODBUS.md)\n"
        f"  T=$({me} meter-sim make-token --seed-file {seed} --key-id {DEMO_KEY_ID} "
        "--meter 1000001 --msg-id 1 --amount 5.00)\n"
        f"  {me} meter-sim token --port {args.modbus_port} --unit 1 $T\n"
        f"  {me} gateway status --config {directory}/gateway.toml\n\n"
        "Ctrl-C stops everything; state is kept.\n",
        flush=True,
    )
    return asyncio.run(
        _supervise([meter_cmd, gateway_cmd], args.for_seconds, directory, args.mqtt_port)
    )


async def _supervise(
    commands: list[list[str]], for_seconds: float, directory: Path, mqtt_port: int
) -> int:
    """Run the broker and the component processes until a signal, a timeout, or an exit."""
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{mqtt_port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        return await _run_processes(commands, for_seconds, directory)
    finally:
        await broker.shutdown()


async def _run_processes(commands: list[list[str]], for_seconds: float, directory: Path) -> int:
    """Start each command; stop them all (SIGINT, then SIGKILL after 15 s) at the end."""
    procs: list[asyncio.subprocess.Process] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for command in commands:
            print("$ voltcredit", shlex.join(command[3:]), flush=True)
            procs.append(await asyncio.create_subprocess_exec(*command))
        waiters = [asyncio.create_task(p.wait()) for p in procs]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait(
            [*waiters, stopper], timeout=for_seconds or None, return_when=asyncio.FIRST_COMPLETED
        )
        failed = [p for p in procs if p.returncode not in (None, 0)]
        stopper.cancel()
        return 1 if failed else 0
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
        print("demo stopped; state kept in", directory, flush=True)
