"""Async engine and units of work for SQLite (aiosqlite, WAL) and PostgreSQL (asyncpg).

Writers must not lose updates (DESIGN §3, §8). The two databases get there differently:

- **PostgreSQL** runs each unit of work in READ COMMITTED; a repository locks the rows it
  will change with ``SELECT … FOR UPDATE`` in ascending key order (deadlock-free), so
  concurrent writers to one account queue on its row lock and each sees the last commit.
- **SQLite** has one writer at a time per database file. A write unit of work starts with
  ``BEGIN IMMEDIATE``, taking the write lock *before* it reads, so nobody can commit
  between its read and its write (a plain deferred ``BEGIN`` would fail with "database is
  locked" when it tries to upgrade, or read stale balances). Python's sqlite3 module
  (under aiosqlite) would emit its own deferred ``BEGIN`` before DML only, so we switch
  that off (``isolation_level = None``) and emit ``BEGIN`` ourselves from SQLAlchemy's
  ``begin`` event — the recipe in SQLAlchemy's SQLite dialect docs, "Transactions with
  SQLite and the sqlite3 driver". Within one process, writers also queue on an
  ``asyncio.Lock`` so they wait without polling; other processes on the same file wait
  in SQLite's busy handler (``busy_timeout``).

Use :meth:`Database.write` for anything that changes data and :meth:`Database.read` for
the rest. Sessions never expire loaded objects on commit and never lazy-load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, Final, Self

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from backend.errors import StorageError

#: ``Session.info`` key set by :meth:`Database.write`; repositories check it before writing.
WRITE_SESSION: Final = "voltcredit.write"
#: Connection execution option read by the SQLite ``begin`` hook: the ``BEGIN`` mode
#: (``DEFERRED`` unless set, ``IMMEDIATE`` for writers).
SQLITE_BEGIN_OPTION: Final = "voltcredit_sqlite_begin"
#: How long a SQLite connection waits for another process's write lock (milliseconds).
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000

SUPPORTED_DRIVERS: Final = ("sqlite+aiosqlite", "postgresql+asyncpg")


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # We emit BEGIN ourselves (see the module docstring), so the driver must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers never block the writer nor the writer readers (sqlite.org/wal.html).
        cursor.execute("PRAGMA journal_mode=WAL")
        # synchronous=FULL: a committed top-up survives a power cut, not only a crash.
        cursor.execute("PRAGMA synchronous=FULL")
        # SQLite enforces foreign keys only when asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str | URL, **engine_kwargs: Any) -> AsyncEngine:
    """An async engine for ``sqlite+aiosqlite:///path`` or ``postgresql+asyncpg://…``.

    ``engine_kwargs`` go to :func:`create_async_engine` (e.g. ``connect_args`` with asyncpg
    ``server_settings`` to choose a ``search_path``).
    """
    url = make_url(url)
    if url.drivername not in SUPPORTED_DRIVERS:
        raise StorageError(
            f"unsupported database URL scheme {url.drivername!r}; use one of {SUPPORTED_DRIVERS}"
        )
    engine = create_async_engine(url, **engine_kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
    return engine


class Database:
    """The backend's database: an engine, a session factory and the two kinds of unit of work.

    Use as ``async with Database(url) as db:``; leaving it disposes of the connection pool.
    """

    def __init__(self, url: str | URL, **engine_kwargs: Any) -> None:
        self.engine: AsyncEngine = make_engine(url, **engine_kwargs)
        self.sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )
        self.is_sqlite: bool = self.engine.dialect.name == "sqlite"
        # One SQLite writer at a time anyway: queue in-process writers here, not in the
        # busy handler's sleep-and-retry loop.
        self._sqlite_writer = asyncio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in a write transaction: committed on normal exit, rolled back on error.

        SQLite: ``BEGIN IMMEDIATE`` (the write lock up front). PostgreSQL: ``BEGIN`` in
        READ COMMITTED; repositories take row locks.
        """
        with _unavailable("write"):
            async with contextlib.AsyncExitStack() as stack:
                options: Mapping[str, Any] = {}
                if self.is_sqlite:
                    await stack.enter_async_context(self._sqlite_writer)
                    options = {SQLITE_BEGIN_OPTION: "IMMEDIATE"}
                session = await stack.enter_async_context(self.sessionmaker())
                session.info[WRITE_SESSION] = True
                async with session.begin():
                    # Open the transaction now, with the options the begin hook reads.
                    await session.connection(execution_options=dict(options))
                    yield session

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reading (a deferred transaction; WAL readers never wait for writers)."""
        with _unavailable("read"):
            async with self.sessionmaker() as session, session.begin():
                yield session


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Database failures outside the repositories (connect, begin, commit) → StorageError.

    Repositories translate what their statements raise; opening a connection to a
    database that is down, or a commit that fails, happens here, and callers' retry loops
    (dispatcher, ingest) must see "storage, try again" rather than a driver's exception.
    """
    try:
        yield
    except IntegrityError:
        # A constraint at commit is the caller's business (a duplicate that raced it).
        raise
    except DBAPIError as exc:
        raise StorageError(f"database {what} failed: {exc.orig}") from exc
    except OSError as exc:  # asyncpg: connection refused, reset, unreachable host
        raise StorageError(f"database {what} failed: {exc}") from exc
