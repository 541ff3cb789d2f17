"""``voltcredit gateway``: run a gateway from its TOML file, or show what its store says.

``run`` is what the systemd unit starts (``Type=notify``: READY once running, the
watchdog fed while healthy, a clean stop on SIGTERM). ``status`` reads the store of a
configured gateway — running or not — and prints the outbox depth, tokens in flight,
each meter's reachability and last reading, and the boot counter.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Final

from gateway.config import GatewayConfig, load_config, runtime_from_env
from gateway.errors import GatewayConfigError, GatewayError
from gateway.service import Gateway
from gateway.store import Store, StoreStatus

DEFAULT_CONFIG: Final = Path("/etc/voltcredit/gateway.toml")
EXIT_FAIL: Final = 1
EXIT_CONFIG: Final = 2

EXAMPLES = """\
examples:
  voltcredit -v gateway run --config /etc/voltcredit/gateway/site-7.toml
  voltcredit gateway status --config /etc/voltcredit/gateway/site-7.toml
  voltcredit gateway status --config site-7.toml --json
"""


def register(subparsers: Any) -> None:
    """Add ``gateway`` to the root ``voltcredit`` command (entry-point plugin)."""
    parser = subparsers.add_parser(
        "gateway",
        help="the meter gateway: tokens to meters, readings to the backend over MQTT",
        description=textwrap.dedent(__doc__ or ""),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="gateway_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run the gateway until SIGTERM/Ctrl-C")
    run.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="TOML file (default %(default)s)"
    )
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="outbox, tokens in flight, meters, from the store")
    status.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="TOML file (default %(default)s)"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)


def _error(message: str) -> None:
    print(f"voltcredit gateway: error: {message}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """``gateway run``."""
    try:
        config = load_config(args.config)
        runtime = runtime_from_env()
    except GatewayConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    return asyncio.run(_run(config, runtime))


async def _run(config: GatewayConfig, runtime: Any) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failures: list[BaseException] = []
    try:
        await Gateway(config, runtime).run(stop)
    except* GatewayError as group:
        failures += group.exceptions
    for exc in failures:
        _error(str(exc))
    return EXIT_FAIL if failures else 0


def cmd_status(args: argparse.Namespace) -> int:
    """``gateway status``."""
    try:
        config = load_config(args.config)
        store = Store.open_readonly(config.store.path)
    except GatewayConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except GatewayError as exc:
        _error(str(exc))
        return EXIT_FAIL
    try:
        status = store.status()
    except GatewayError as exc:
        _error(str(exc))
        return EXIT_FAIL
    finally:
        store.close()
    doc = status_document(config, status, now=int(time.time()))
    print(json.dumps(doc, indent=2) if args.json else render_status(doc))
    return 0


def _iso(t: int | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def status_document(config: GatewayConfig, status: StoreStatus, *, now: int) -> dict[str, Any]:
    """The status as a JSON-ready dict (the ``--json`` output)."""
    rows = {m.meter: m for m in status.meters}
    meters = []
    for m in sorted(config.meters, key=lambda m: m.id):
        row = rows.get(m.id)
        meters.append(
            {
                "meter": m.id,
                "driver": m.driver.value,
                "reachable": None if row is None else row.reachable,
                "last_reading": None if row is None else _iso(row.last_ok),
                "last_reading_age_s": None
                if row is None or row.last_ok is None
                else now - row.last_ok,
                "meter_clock": None if row is None else _iso(row.last_ts),
                "credit_milli": None if row is None else row.last_credit_milli,
                "last_error": None if row is None else row.last_error,
            }
        )
    return {
        "gateway": config.gateway_id,
        "store": str(config.store.path),
        "boot_seq": status.boot_seq,
        "next_seq": status.next_seq,
        "outbox": {
            "batches": status.outbox_batches,
            "bytes": status.outbox_bytes,
            "cap_bytes": config.store.outbox_max_bytes,
            "oldest_pending": _iso(status.oldest_pending),
            "oldest_pending_age_s": None
            if status.oldest_pending is None
            else now - status.oldest_pending,
        },
        "tokens_in_flight": dict(status.tokens_open),
        "oldest_token_in_flight": _iso(status.oldest_open_token),
        "meters": meters,
    }


def render_status(doc: dict[str, Any]) -> str:
    """The status for people."""
    out = doc["outbox"]
    tokens = doc["tokens_in_flight"]
    lines = [
        f"gateway {doc['gateway']}  (store {doc['store']})",
        f"boot_seq {doc['boot_seq']}   next seq {doc['next_seq']}",
        f"outbox: {out['batches']} batch(es), {out['bytes']:,} of {out['cap_bytes']:,} bytes"
        + (
            f", oldest {out['oldest_pending']} ({out['oldest_pending_age_s']} s ago)"
            if out["oldest_pending"]
            else ""
        ),
        "tokens in flight: "
        + (", ".join(f"{n} {state}" for state, n in sorted(tokens.items())) if tokens else "none"),
        "",
        (
            f"{'meter':>20}  {'driver':<10} {'reachable':<9}  {'last reading':<25} "
            f"{'credit milli':>14}  last error"
        ),
    ]
    for m in doc["meters"]:
        reach = {None: "?", True: "yes", False: "NO"}[m["reachable"]]
        credit = "" if m["credit_milli"] is None else f"{m['credit_milli']:,}"
        lines.append(
            f"{m['meter']:>20}  {m['driver']:<10} {reach:<9}  {m['last_reading'] or 'never':<25} "
            f"{credit:>14}  {m['last_error'] or ''}"
        )
    return "\n".join(lines)
