"""Fresh test databases: a new SQLite file or a new PostgreSQL schema per use.

Moved here from ``tests/integration/test_ledger_db.py`` so every database test shares
one way of isolating itself: on PostgreSQL a schema of its own, found first on the
``search_path``, keeps concurrent suites (and concurrent developers) apart, and is
dropped afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from backend.adapters.db.engine import Database

#: Parametrise a fixture with these to run on both databases (PostgreSQL marked).
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@dataclass(frozen=True)
class Target:
    """Where a test's database lives: a URL and the engine arguments it needs."""

    url: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def database(self) -> Database:
        return Database(self.url, **self.engine_kwargs)


TargetFactory = Callable[[], contextlib.AbstractAsyncContextManager[Target]]


def target_factory(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, *, prefix: str = "ledger"
) -> TargetFactory:
    """Makes fresh, empty databases of one kind: a new SQLite file or a new PostgreSQL schema."""
    if kind == "sqlite":

        @contextlib.asynccontextmanager
        async def new_sqlite_file() -> AsyncIterator[Target]:
            yield Target(f"sqlite+aiosqlite:///{tmp_path / f'{prefix}-{uuid.uuid4().hex}.db'}")

        return new_sqlite_file

    dsn: str = request.getfixturevalue("postgres_dsn")
    url = make_url(dsn).set(drivername="postgresql+asyncpg")

    @contextlib.asynccontextmanager
    async def new_postgres_schema() -> AsyncIterator[Target]:
        import asyncpg  # type: ignore[import-untyped]  # no stubs; tests only

        schema = f"{prefix}_test_{uuid.uuid4().hex}"
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'CREATE SCHEMA "{schema}"')
            yield Target(
                url.render_as_string(hide_password=False),
                {"connect_args": {"server_settings": {"search_path": schema}}},
            )
        finally:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await admin.close()

    return new_postgres_schema
