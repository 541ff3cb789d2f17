"""Routes about the service itself: liveness, readiness, the OpenAPI document and its docs page."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from backend.adapters.db.engine import Database
from backend.adapters.db.repos import schema_revisions
from backend.api.context import DATABASE, DOCS_HTML, OPENAPI, SCHEMA_HEAD
from backend.api.registry import RouteTable
from backend.errors import StorageError

routes = RouteTable("system", "Health of the service and this documentation.")

#: How long /readyz waits for the database before calling it unreachable.
READY_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseHealth:
    """What the database said: whether it answered at all, and why it is not ready if not."""

    #: It answered a query in time (liveness: the systemd watchdog is fed on this).
    answered: bool
    #: ``None`` when ready; else a sentence saying what is wrong (readiness: /readyz).
    problem: str | None = None

    @property
    def ready(self) -> bool:
        return self.problem is None


async def check_database(
    db: Database, head: str, *, timeout_s: float = READY_TIMEOUT_S
) -> DatabaseHealth:
    """Ask the database for its schema revisions within ``timeout_s``; compare with ``head``.

    Shared by /readyz and the systemd watchdog of ``voltcredit backend run``.
    """
    try:
        async with asyncio.timeout(timeout_s), db.read() as session:
            revisions = await schema_revisions(session)
    except TimeoutError:
        return DatabaseHealth(
            answered=False, problem=f"database unreachable: no answer within {timeout_s:g} s"
        )
    except (StorageError, OSError) as exc:
        return DatabaseHealth(answered=False, problem=f"database unreachable: {exc}")
    if revisions != [head]:
        return DatabaseHealth(
            answered=True,
            problem=f"database schema at {revisions or 'nothing'}, this code expects {head}",
        )
    return DatabaseHealth(answered=True)


@routes.get("/healthz", "Liveness", public=True)
async def healthz(request: web.Request) -> web.Response:  # noqa: ARG001 - aiohttp's signature
    """200 while the process serves requests (touches nothing else: for restarts, not routing)."""
    return web.json_response({"status": "alive"})


@routes.get("/readyz", "Readiness", public=True, problems=(503,))
async def readyz(request: web.Request) -> web.Response:
    """200 when the database answers and its schema is at the migration head this code
    expects; 503 otherwise (take the instance out of the load balancer)."""
    head = request.app[SCHEMA_HEAD]
    health = await check_database(request.app[DATABASE], head)
    if health.problem is not None:
        raise web.HTTPServiceUnavailable(text=health.problem)
    return web.json_response({"status": "ready", "schema": head})


@routes.get("/openapi.json", "OpenAPI document", public=True)
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of every operation and error."""
    return web.json_response(request.app[OPENAPI])


@routes.get("/docs", "API documentation", public=True, media_type="text/html")
async def docs(request: web.Request) -> web.Response:
    """A self-contained HTML page rendered from the OpenAPI document."""
    return web.Response(text=request.app[DOCS_HTML], content_type="text/html")
