"""Group commit: many units of work per SQLite transaction, each with one-transaction semantics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.engine import Database
from backend.adapters.db.group_commit import GroupCommitter
from backend.adapters.db.tables import AuditRow
from tests.support.topups import T0, Target, fresh_target

pytestmark = pytest.mark.integration

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    async with fresh_target(request.param, tmp_path, dsn) as t:
        yield t


def row(n: int) -> AuditRow:
    return AuditRow(
        at=T0, tenant_id=None, actor="t", action=f"a{n}", target="x", request_id="r", detail={}
    )


async def actions(db: Database) -> list[str]:
    async with db.read() as s:
        return sorted((await s.scalars(select(AuditRow.action))).all())


async def test_concurrent_units_share_commits_and_fail_alone(target: Target) -> None:
    async with target.database() as db:
        committer = GroupCommitter(db)
        seen: list[tuple[int, int]] = []

        def unit(n: int) -> Callable[[AsyncSession], Awaitable[int]]:
            async def work(session: AsyncSession) -> int:
                session.add(row(n))
                await session.flush()
                # Each unit sees the writes of the units before it in the batch.
                count = await session.scalar(select(func.count()).select_from(AuditRow))
                seen.append((n, int(count or 0)))
                if n % 5 == 4:
                    raise ValueError(f"unit {n} refuses")
                return n

            return work

        outcomes = await asyncio.gather(
            *(committer.run(unit(n)) for n in range(20)), return_exceptions=True
        )
        assert [o for o in outcomes if isinstance(o, int)] == [n for n in range(20) if n % 5 != 4]
        assert [str(o) for o in outcomes if isinstance(o, Exception)] == [
            f"unit {n} refuses" for n in (4, 9, 14, 19)
        ]
        # The refused units left nothing behind; the others all committed.
        assert await actions(db) == sorted(f"a{n}" for n in range(20) if n % 5 != 4)
        assert committer.units == 20
        if db.is_sqlite:
            # In order, each unit seeing the rows of the successful units before it, as
            # consecutive transactions would; fewer commits than units.
            expected = [(n, 1 + sum(1 for m in range(n) if m % 5 != 4)) for n in range(20)]
            assert seen == expected
            assert committer.transactions < 20
        else:
            assert committer.transactions == 20  # one each on PostgreSQL


async def test_a_failed_commit_fails_every_unit_of_the_batch(tmp_path: Path) -> None:
    async with fresh_target("sqlite", tmp_path) as t, t.database() as db:
        committer = GroupCommitter(db, max_batch=8)

        async def ok(session: AsyncSession) -> str:
            session.add(row(1))
            return "ok"

        async def poison(session: AsyncSession) -> str:
            # Deferred until COMMIT: the whole transaction fails there.
            await session.execute(text("PRAGMA defer_foreign_keys = ON"))
            await session.execute(
                text(
                    "INSERT INTO resellers (tenant_id, name, created_at) "
                    "VALUES (999, 'x', '2026-01-01 00:00:00')"
                )
            )
            return "poison"

        first = asyncio.ensure_future(committer.run(ok))  # runs alone, commits
        await asyncio.sleep(0)
        batch = await asyncio.gather(
            committer.run(ok), committer.run(poison), return_exceptions=True
        )
        assert await first == "ok"
        assert all(isinstance(o, Exception) for o in batch), batch
        assert await actions(db) == ["a1"]


def test_max_batch_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommitter(Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"), max_batch=0)
