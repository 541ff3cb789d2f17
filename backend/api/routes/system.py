"""Routes about the service itself: liveness, readiness, the OpenAPI document and its docs page."""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from backend.adapters.db.repos import schema_revisions
from backend.api.context import DATABASE, DOCS_HTML, OPENAPI, SCHEMA_HEAD
from backend.api.registry import RouteTable
from backend.errors import StorageError

routes = RouteTable("system", "Health of the service and this documentation.")

#: How long /readyz waits for the database before calling it unreachable.
READY_TIMEOUT_S: Final = 2.0


@routes.get("/healthz", "Liveness", public=True)
async def healthz(request: web.Request) -> web.Response:  # noqa: ARG001 - aiohttp's signature
    """200 while the process serves requests (touches nothing else: for restarts, not routing)."""
    return web.json_response({"status": "alive"})


@routes.get("/readyz", "Readiness", public=True, problems=(503,))
async def readyz(request: web.Request) -> web.Response:
    """200 when the database answers and its schema is at the migration head this code
    expects; 503 otherwise (take the instance out of the load balancer)."""
    head = request.app[SCHEMA_HEAD]
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), request.app[DATABASE].read() as session:
            revisions = await schema_revisions(session)
    except (StorageError, TimeoutError, OSError) as exc:
        raise web.HTTPServiceUnavailable(text=f"database unreachable: {exc}") from exc
    if revisions != [head]:
        raise web.HTTPServiceUnavailable(
            text=f"database schema at {revisions or 'nothing'}, this code expects {head}"
        )
    return web.json_response({"status": "ready", "schema": head})


@routes.get("/openapi.json", "OpenAPI document", public=True)
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of every operation and error."""
    return web.json_response(request.app[OPENAPI])


@routes.get("/docs", "API documentation", public=True, media_type="text/html")
async def docs(request: web.Request) -> web.Response:
    """A self-contained HTML page rendered from the OpenAPI document."""
    return web.Response(text=request.app[DOCS_HTML], content_type="text/html")
