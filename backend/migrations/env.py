"""Alembic environment of the backend: runs revisions on a shared connection, a URL, or offline.

Normally :func:`backend.adapters.db.migrate.upgrade_engine` hands us a connection already
in a transaction (``config.attributes["connection"]``). Run from the ``alembic`` command
line with ``sqlalchemy.url`` set, we open our own async engine; with ``--sql`` we only
render the SQL.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from backend.adapters.db.engine import make_engine
from backend.adapters.db.migrate import target_metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        # SQLite cannot ALTER most things in place: autogenerate "move and copy" batches.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_on_connection(connection: Connection) -> None:
    """Run the pending revisions on ``connection`` (inside the caller's transaction)."""
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Render the SQL of the pending revisions instead of executing it (``alembic --sql``)."""
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online_from_url(url: str) -> None:
    # Command-line use by a developer; the backend itself goes through upgrade_engine.
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on_connection)
    finally:
        await engine.dispose()


def main() -> None:
    shared = context.config.attributes.get("connection")
    if isinstance(shared, Connection):
        run_on_connection(shared)
    elif context.is_offline_mode():
        run_offline()
    else:
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError(
                "set sqlalchemy.url (see backend.adapters.db.migrate.alembic_config)"
            )
        asyncio.run(_run_online_from_url(url))


main()
