"""``voltcredit backend``: serve the HTTP API, or mint the first platform-admin API key.

``run`` migrates the database to the code's schema, then serves until SIGINT or SIGTERM
(a clean stop: in-flight requests finish, the database pool closes). Configuration comes
from ``--config FILE`` (TOML; else ``$VOLTCREDIT_CONFIG``) and ``VOLTCREDIT_*``
environment variables; the README section "backend" lists every key. ``create-admin-key``
migrates too, stores a new PLATFORM_ADMIN key and prints it, once, alone on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from sqlalchemy.engine import make_url

from backend.adapters.db.engine import Database
from backend.adapters.db.migrate import upgrade
from backend.api.app import create_app
from backend.config import BackendConfig, ConfigError, describe, load_config
from backend.domain.auth import Role, Scope
from backend.domain.fields import NAME
from backend.errors import BackendError
from backend.service.auth import AuthService, password_hasher
from backend.service.context import Call, utc_now

EXIT_FAIL: Final = 1
EXIT_CONFIG: Final = 2

EPILOG = f"""\
configuration keys (TOML [section] key, or environment variable):
{describe()}

examples:
  voltcredit backend run --config /etc/voltcredit/backend.toml
  KEY=$(voltcredit backend create-admin-key --name ops)
  curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8080/v1/tenants
"""


def register(subparsers: Any) -> None:
    """Add ``backend`` to the root ``voltcredit`` command (entry-point plugin)."""
    parser = subparsers.add_parser(
        "backend",
        help="the backend: HTTP API (tenants, customers, tariffs, meters, top-ups)",
        description=textwrap.dedent(__doc__ or ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="backend_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="migrate the database, then serve the API until SIGTERM")
    run.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    run.set_defaults(func=cmd_run)
    key = sub.add_parser("create-admin-key", help="store and print a new PLATFORM_ADMIN key")
    key.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    key.add_argument("--name", default="admin", help="name of the key (default %(default)s)")
    key.set_defaults(func=cmd_create_admin_key)


def _error(message: str) -> None:
    print(f"voltcredit backend: error: {message}", file=sys.stderr, flush=True)


def _load(path: Path | None) -> BackendConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        _error(str(exc))
        return None


def _prepare(config: BackendConfig) -> None:
    """Make the directory of a SQLite database file (SQLite makes the file, not its dirs)."""
    url = make_url(config.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def cmd_run(args: argparse.Namespace) -> int:
    """``backend run``."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        return asyncio.run(serve(config))
    except (BackendError, OSError) as exc:
        _error(str(exc))
        return EXIT_FAIL


async def serve(config: BackendConfig) -> int:
    """Migrate, serve until SIGINT/SIGTERM, stop cleanly."""
    _prepare(config)
    await upgrade(config.database_url)
    runner = web.AppRunner(create_app(config), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.http_host, config.http_port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            print(f"voltcredit backend: listening on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("voltcredit backend: stopping", flush=True)
    finally:
        await runner.cleanup()
    return 0


def cmd_create_admin_key(args: argparse.Namespace) -> int:
    """``backend create-admin-key``."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if not 1 <= len(args.name) <= NAME.max_len or not args.name.isprintable():
        _error(f"--name must be 1..{NAME.max_len} printable characters")
        return EXIT_CONFIG
    try:
        key = asyncio.run(create_admin_key(config, args.name))
    except BackendError as exc:
        _error(str(exc))
        return EXIT_FAIL
    print(key, flush=True)
    print("store it now: it is shown only once", file=sys.stderr)
    return 0


async def create_admin_key(config: BackendConfig, name: str) -> str:
    """A new PLATFORM_ADMIN key in the configured database (migrated first)."""
    _prepare(config)
    await upgrade(config.database_url)
    async with Database(config.database_url) as db:
        auth = AuthService(
            db,
            token_secret=config.token_secret,
            customer_token_ttl_s=config.customer_token_ttl_s,
            hasher=password_hasher(),
        )
        call = Call(
            scope=Scope(role=Role.PLATFORM_ADMIN, actor="cli"),
            request_id=f"cli-{uuid.uuid4().hex}",
            now=utc_now(),
        )
        created = await auth.create_platform_key(call, name)
    return created.key
