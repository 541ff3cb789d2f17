"""``voltcredit backend run`` under systemd's eye: READY once it serves, WATCHDOG, STOPPING.

The process runs for real (a subprocess, as ``systemd/voltcredit-backend.service`` runs
it) with ``NOTIFY_SOCKET`` naming a datagram socket the test binds and a 2 s
``WATCHDOG_USEC``. On PostgreSQL the test also takes the database away (connections
refused, the backend's own terminated) and checks the watchdog goes hungry until it
comes back. The check both share with ``/readyz`` is tested on its own at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy.engine import make_url

from backend.adapters.db.engine import Database
from backend.adapters.db.migrate import upgrade
from backend.api.app import head_revision
from backend.api.routes.system import DatabaseHealth, check_database
from tests.support.broker import Mosquitto
from tests.support.db import BACKENDS, target_factory

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

COMMAND = [sys.executable, "-m", "backend.cli", "backend", "run", "--config"]
WATCHDOG_USEC = 2_000_000
Fields = dict[str, str]


class Listener:
    """systemd's side of ``NOTIFY_SOCKET``: every datagram, parsed, with its arrival time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[tuple[float, Fields]] = []

    async def next(self, within: float) -> Fields:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), within)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.got.append((time.monotonic(), fields))
        return fields

    async def until(self, wanted: Callable[[Fields], bool], within: float, what: str) -> Fields:
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {within} s; got {self.got}")
            try:
                fields = await self.next(left)
            except TimeoutError:
                continue
            if wanted(fields):
                return fields

    async def collect(self, seconds: float) -> None:
        """Receive whatever comes for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await self.next(left)

    def watchdogs_since(self, since: float) -> list[float]:
        return [at for at, fields in self.got if at > since and fields.get("WATCHDOG") == "1"]


@contextlib.asynccontextmanager
async def database_url(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A fresh database: a SQLite file, or a PostgreSQL database of its own (so the test can
    refuse connections to it without touching anybody else's)."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'state' / 'vc.db'}"
        return
    import asyncpg  # type: ignore[import-untyped]  # no stubs; tests only

    dsn: str = request.getfixturevalue("postgres_dsn")
    name = f"vc_systemd_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(dsn).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def set_connections(dsn: str, name: str, *, allowed: bool) -> None:
    """Let clients connect to database ``name`` or not; refusing also ends its sessions."""
    import asyncpg

    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'
        )
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
    finally:
        await admin.close()


def write_config(tmp_path: Path, url: str, broker_port: int) -> Path:
    path = tmp_path / "backend.toml"
    path.write_text(
        "\n".join(
            [
                "[database]",
                f'url = "{url}"',
                "[http]",
                "port = 0",
                "[keys]",
                f'dir = "{tmp_path / "keys"}"',
                "[mqtt]",
                f'url = "mqtt://127.0.0.1:{broker_port}"',
                f'client_id = "systemd-test-{uuid.uuid4().hex[:8]}"',
                "shared_subscriptions = true",
            ]
        )
        + "\n"
    )
    return path


@pytest.mark.parametrize("kind", BACKENDS)
async def test_backend_notifies_systemd_and_feeds_the_watchdog_while_healthy(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    mosquitto_factory: Callable[[], Mosquitto],
) -> None:
    broker = mosquitto_factory()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLTCREDIT_", "WATCHDOG_"))}
    env |= {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(env["NOTIFY_SOCKET"])
        sock.setblocking(False)  # noqa: FBT003 - socket API
        listen = Listener(sock)
        async with database_url(kind, tmp_path, request) as url:
            config = write_config(tmp_path, url, broker.port)
            proc = await asyncio.create_subprocess_exec(
                *COMMAND,
                str(config),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await _lifecycle(listen, proc, kind, url, request)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def _lifecycle(
    listen: Listener,
    proc: asyncio.subprocess.Process,
    kind: str,
    url: str,
    request: pytest.FixtureRequest,
) -> None:
    # 1. STATUS through start-up, READY=1 once the API serves (migrations done before).
    ready = await listen.until(lambda f: "READY" in f, 60, "READY=1")
    assert ready["READY"] == "1"
    before = [fields for _, fields in listen.got[:-1]]
    assert before == [{"STATUS": "migrating the database"}, {"STATUS": "starting"}]
    match = re.fullmatch(r"serving (http://127\.0\.0\.1:\d+)", ready["STATUS"])
    assert match, ready
    base = match[1]
    async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as resp:
        assert resp.status == 200, await resp.text()  # READY came after the migrations

    # 2. WATCHDOG=1 again and again, never further apart than systemd's interval.
    started = listen.got[-1][0]
    await listen.until(lambda _: len(listen.watchdogs_since(started)) >= 4, 15, "4 WATCHDOG=1")
    pings = [started, *listen.watchdogs_since(started)]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    statuses = [f["STATUS"] for _, f in listen.got if "STATUS" in f and "READY" not in f]
    assert f"serving {base}; ready" in statuses

    # 3. PostgreSQL goes away: no WATCHDOG=1 while it is gone (systemd would restart the
    #    backend), the STATUS line says why; fed again once it is back.
    if kind == "postgresql":
        dsn: str = request.getfixturevalue("postgres_dsn")
        name = make_url(url).database
        assert name is not None
        await set_connections(dsn, name, allowed=False)
        await listen.until(
            lambda f: "database unreachable" in f.get("STATUS", ""), 10, "an unreachable STATUS"
        )
        hungry_from = listen.got[-1][0]
        await listen.collect(2.5)
        assert listen.watchdogs_since(hungry_from) == []
        await set_connections(dsn, name, allowed=True)
        back = listen.got[-1][0]
        await listen.until(lambda _: len(listen.watchdogs_since(back)) >= 2, 15, "WATCHDOG again")
        assert any(f.get("STATUS") == f"serving {base}; ready" for at, f in listen.got if at > back)

    # 4. SIGTERM: STOPPING=1, then a clean exit.
    proc.send_signal(signal.SIGTERM)
    stopping = await listen.until(lambda f: "STOPPING" in f, 20, "STOPPING=1")
    assert stopping["STOPPING"] == "1"
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert b"stopping" in out


@pytest.mark.parametrize("kind", BACKENDS)
async def test_check_database_answers_for_readyz_and_the_watchdog(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    head = head_revision()
    async with target_factory(kind, tmp_path, request, prefix="health")() as target:
        async with target.database() as db:
            empty = await check_database(db, head)
        await upgrade(target.url, **target.engine_kwargs)
        async with target.database() as db:
            assert await check_database(db, head) == DatabaseHealth(answered=True)
            # Migrated by newer code (a rolling upgrade): alive, but not ready for this code.
            older = await check_database(db, "0001")
    # An empty database has no alembic_version table: it cannot serve either.
    assert not empty.answered
    assert empty.problem is not None
    assert empty.problem.startswith("database unreachable: read alembic_version")
    assert older == DatabaseHealth(
        answered=True, problem=f"database schema at ['{head}'], this code expects 0001"
    )
    async with Database("postgresql+asyncpg://nobody@127.0.0.1:1/none") as db:
        refused = await check_database(db, head, timeout_s=5)
    assert not refused.answered
    assert refused.problem is not None
    assert "Connect call failed" in refused.problem
