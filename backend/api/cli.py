"""``voltcredit backend``: serve the HTTP API, or mint the first platform-admin API key.

``run`` migrates the database to the code's schema, then serves until SIGINT or SIGTERM
(a clean stop: in-flight requests finish, the database pool closes). Under systemd
(``Type=notify``, ``systemd/voltcredit-backend.service``) it reports READY=1 once it
serves, keeps a STATUS line, feeds the watchdog (``WatchdogSec``) at half its interval
while the event loop runs and the database answers, and sends STOPPING=1 on a stop.
Configuration comes from ``--config FILE`` (TOML; else ``$VOLTCREDIT_CONFIG``) and
``VOLTCREDIT_*`` environment variables; the README section "backend" lists every key.
``create-admin-key`` migrates too, stores a new PLATFORM_ADMIN key and prints it, once,
alone on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from sqlalchemy.engine import make_url

from backend.adapters.db.engine import Database
from backend.adapters.db.migrate import upgrade
from backend.adapters.sdnotify import Notifier
from backend.api.app import create_app
from backend.api.context import DATABASE, SCHEMA_HEAD
from backend.api.routes.system import READY_TIMEOUT_S, DatabaseHealth, check_database
from backend.api.routes.topups import TOPUP_RUNTIME
from backend.config import (
    BackendConfig,
    ConfigError,
    SystemdEnv,
    describe,
    load_config,
    systemd_env,
)
from backend.domain.auth import Role, Scope
from backend.domain.fields import NAME
from backend.errors import BackendError
from backend.service.auth import AuthService, password_hasher
from backend.service.context import Call, utc_now

log = logging.getLogger(__name__)

EXIT_FAIL: Final = 1
EXIT_CONFIG: Final = 2
#: How often the STATUS line is refreshed when systemd does not watch the process.
STATUS_EVERY_S: Final = 30.0

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
        systemd = systemd_env()
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    try:
        return asyncio.run(serve(config, systemd))
    except (BackendError, OSError) as exc:
        _error(str(exc))
        return EXIT_FAIL


async def serve(config: BackendConfig, systemd: SystemdEnv | None = None) -> int:
    """Migrate, serve until SIGINT/SIGTERM, stop cleanly; tell systemd (if it asks) how it goes."""
    systemd = systemd or SystemdEnv()
    notifier = Notifier(systemd.notify_socket)
    notifier.status("migrating the database")
    _prepare(config)
    await upgrade(config.database_url)
    notifier.status("starting")
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    watch: asyncio.Task[None] | None = None
    try:
        site = web.TCPSite(runner, config.http_host, config.http_port)
        await site.start()
        urls = [f"http://{address[0]}:{address[1]}" for address in runner.addresses]
        for url in urls:
            print(f"voltcredit backend: listening on {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        serving = f"serving {' '.join(urls)}"
        notifier.ready(serving)
        if notifier.enabled:
            db, head = app[DATABASE], app[SCHEMA_HEAD]

            async def check(timeout_s: float) -> DatabaseHealth:
                runtime = app.get(TOPUP_RUNTIME)
                if runtime is not None and runtime.died:
                    return DatabaseHealth(
                        answered=False,
                        problem=f"background task(s) died: {', '.join(runtime.died)}",
                    )
                return await check_database(db, head, timeout_s=timeout_s)

            watch = loop.create_task(
                watchdog(
                    check,
                    notifier,
                    watchdog_usec=systemd.watchdog_usec,
                    serving=serving,
                ),
                name="systemd-watchdog",
            )
        await stop.wait()
        print("voltcredit backend: stopping", flush=True)
        notifier.stopping()
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await runner.cleanup()
    return 0


async def watchdog(
    check: Callable[[float], Awaitable[DatabaseHealth]],
    notifier: Notifier,
    *,
    watchdog_usec: int | None,
    serving: str,
) -> None:
    """Feed systemd's watchdog every half interval while the database answers; keep STATUS.

    The loop runs on the event loop it vouches for, so a blocked loop feeds nothing either.
    ``check(timeout_s)`` asks the database (``/readyz``'s check). A database that answers
    but is at another schema revision (a rolling upgrade migrated it) still feeds the
    watchdog: the process lives, /readyz takes it out of the load balancer, and a restart
    would not help. Without ``watchdog_usec`` only the STATUS line is kept.
    """
    period = STATUS_EVERY_S if watchdog_usec is None else watchdog_usec / 2_000_000
    # An answer slower than half a period is no answer: the next keep-alive is due.
    timeout_s = min(READY_TIMEOUT_S, period / 2)
    loop = asyncio.get_running_loop()
    shown: str | None = None
    while True:
        started = loop.time()
        try:
            health = await check(timeout_s)
        except Exception as exc:  # noqa: BLE001 - whatever breaks the probe means "not healthy"
            health = DatabaseHealth(answered=False, problem=f"database check failed: {exc!r}")
        if health.answered:
            if watchdog_usec is not None:
                notifier.watchdog()
        else:
            log.error("%s: not feeding the systemd watchdog", health.problem)
        status = f"{serving}; {'ready' if health.problem is None else health.problem}"
        if status != shown:
            notifier.status(status)
            shown = status
        await asyncio.sleep(max(0.0, period - (loop.time() - started)))


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
