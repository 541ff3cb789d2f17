"""Schema migrations: ``alembic upgrade head`` for a database URL, configured in code.

The Alembic environment lives in the package (``backend/migrations``), so an installed
backend migrates its own database at start-up without an ``alembic.ini``. To author a
revision against a scratch database::

    python -c "from backend.adapters.db.migrate import alembic_config; \\
    from alembic import command; \\
    command.revision(alembic_config('sqlite+aiosqlite:///dev.db'), 'msg', autogenerate=True)"

Several backend instances may start at once on PostgreSQL: the upgrade holds a
transaction-level advisory lock so they migrate one after another (the later ones find
nothing to do). On SQLite the upgrade runs in a ``BEGIN IMMEDIATE`` write transaction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.adapters.db import alert_tables, ingest_tables, ledger_tables, notify_tables, tables
from backend.adapters.db.base import Base
from backend.adapters.db.engine import SQLITE_BEGIN_OPTION, make_engine

MIGRATIONS_DIR: Final = Path(__file__).resolve().parents[2] / "migrations"
#: pg_advisory_xact_lock key serialising concurrent upgrades (any fixed 64-bit number).
_PG_MIGRATION_LOCK: Final = 0x766F6C74_6D696772  # "voltmigr"
#: Table modules whose classes make up :func:`target_metadata`; add new ones here.
TABLE_MODULES: Final = (ledger_tables, tables, alert_tables, ingest_tables, notify_tables)


def target_metadata() -> MetaData:
    """The metadata of every backend table (each table module is imported above)."""
    return Base.metadata


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic config for the backend's migrations (``url`` for command-line style use)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def _upgrade_on(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    config = alembic_config()
    # env.py runs on this connection instead of opening its own (Alembic cookbook,
    # "Programmatic API use (connection sharing) With Asyncio").
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade_engine(engine: AsyncEngine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision`` in one transaction.

    Alembic is synchronous: it runs in SQLAlchemy's greenlet bridge on this event loop
    and reads its revision files from disk, once, at start-up.
    """
    options = {SQLITE_BEGIN_OPTION: "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}
    async with engine.connect() as plain:
        conn = await plain.execution_options(**options)
        async with conn.begin():
            await conn.run_sync(_upgrade_on, revision)


async def upgrade(url: str | URL, revision: str = "head", **engine_kwargs: Any) -> None:
    """``alembic upgrade head`` for ``url`` (``engine_kwargs`` as for :func:`make_engine`)."""
    engine = make_engine(url, **engine_kwargs)
    try:
        await upgrade_engine(engine, revision)
    finally:
        await engine.dispose()
