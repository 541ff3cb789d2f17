"""A background task of the backend that dies is remembered, so the watchdog stops vouching."""

from __future__ import annotations

import asyncio

from backend.service.topup_runtime import _report_crash


async def test_a_task_that_died_is_named_and_a_cancelled_one_is_not() -> None:
    async def boom() -> None:
        raise RuntimeError("a bug")

    async def forever() -> None:
        await asyncio.Event().wait()

    died: list[str] = []
    dead = asyncio.create_task(boom(), name="ingest")
    cancelled = asyncio.create_task(forever(), name="token-dispatcher")
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(dead, cancelled, return_exceptions=True)
    _report_crash(died, dead)
    _report_crash(died, cancelled)
    assert died == ["ingest"]
