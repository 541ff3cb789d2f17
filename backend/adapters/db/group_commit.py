"""Group commit for SQLite: many units of work in one write transaction, one commit, one fsync.

A SQLite database has one writer at a time, and every commit waits for an ``fsync`` of
the WAL (``synchronous=FULL``): with concurrent top-ups the disk's flush latency, not the
SQL, sets the pace. :class:`GroupCommitter` queues units of work (``async (session) ->
result``) and runs whatever has queued up in *one* ``Database.write()`` transaction, each
unit inside its own SAVEPOINT, then commits once. The callers see the semantics of one
transaction each:

* a unit that raises is rolled back to its savepoint (nothing it wrote survives) and its
  caller gets the exception; the other units of the batch are unaffected;
* a unit's result is handed back only after the commit that made it durable; if that
  commit fails, every caller of the batch gets the error (nothing was committed);
* units of a batch run one after another, in arrival order, and see each other's writes
  (as consecutive transactions would).

A lone unit runs at once in its own transaction, so there is no added latency when idle;
batches form only while a previous one is running. PostgreSQL needs none of this (its
WAL writer already groups concurrent commits, and batching units there would hold row
locks across units, which invites deadlocks between instances): on PostgreSQL each unit
is one transaction, as with ``Database.write()``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.engine import Database

T = TypeVar("T")
Unit = Callable[[AsyncSession], Awaitable[T]]

#: Most units in one transaction (bounds how long the write lock is held).
DEFAULT_MAX_BATCH: Final = 64


class GroupCommitter:
    """Runs units of work on ``db``, grouping concurrent ones into shared commits (SQLite)."""

    def __init__(self, db: Database, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._db = db
        self._max = max_batch if db.is_sqlite else 1
        self._queue: deque[tuple[Unit[Any], asyncio.Future[Any]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        #: Units and transactions run so far (for tests and benchmarks).
        self.units = 0
        self.transactions = 0

    async def run(self, unit: Unit[T]) -> T:
        """Run ``unit`` in a write transaction (perhaps shared); its result once committed."""
        if self._max == 1:
            self.units += 1
            self.transactions += 1
            async with self._db.write() as session:
                return await unit(session)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((unit, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="group-commit")
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._max, len(self._queue)))]
            try:
                outcomes = await self._run_batch(batch)
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - the commit failed: every unit failed with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():  # the caller was cancelled meanwhile
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    async def _run_batch(
        self, batch: list[tuple[Unit[Any], asyncio.Future[Any]]]
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        async with self._db.write() as session:
            for unit, future in batch:
                if future.cancelled():
                    outcomes.append((False, asyncio.CancelledError()))
                    continue
                try:
                    async with session.begin_nested():
                        value = await unit(session)
                except Exception as exc:  # noqa: BLE001 - isolate the unit; its caller gets it
                    outcomes.append((False, exc))
                else:
                    outcomes.append((True, value))
        self.units += len(batch)
        self.transactions += 1
        return outcomes
