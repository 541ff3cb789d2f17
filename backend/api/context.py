"""What handlers share: typed app/request keys and the parse-and-shape helpers of thin handlers.

A handler is three lines — parse, call a use case, shape the response::

    async def create_tenant(request: web.Request) -> web.Response:
        new = await body(request, NewTenant)
        view = await request.app[PROVISIONING].create_tenant(call_of(request), new)
        return respond(view, status=201)

Path ids that cannot name anything (``/v1/customers/abc``, ``/v1/customers/0``) answer
404 like any id that names nothing: the URL identifies no resource. Query strings and
bodies that do not parse answer 400; bodies that parse but break a rule answer 422.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final, TypeVar

from aiohttp import web

from backend.adapters.db.engine import Database
from backend.api.schemas import decode_json, parse, to_json
from backend.config import BackendConfig
from backend.domain.auth import Scope
from backend.domain.fields import MAX_INT64
from backend.service.auth import AuthService
from backend.service.context import MAX_LIMIT, Call, Clock, PageRequest
from backend.service.errors import NotFoundError
from backend.service.live import LiveHub
from backend.service.provisioning import Provisioning, SignerSource
from backend.service.refusals import MalformedRequestError

T = TypeVar("T")

# ---------------------------------------------------------------- application keys
CONFIG: Final = web.AppKey("config", BackendConfig)
CLOCK: Final[web.AppKey[Clock]] = web.AppKey("clock")
DATABASE: Final = web.AppKey("database", Database)
KEY_STORE: Final = web.AppKey("key_store", SignerSource)
AUTH: Final = web.AppKey("auth", AuthService)
PROVISIONING: Final = web.AppKey("provisioning", Provisioning)
#: Live credit snapshots for event streams (made by ``backend.api.routes.consumption``).
LIVE_HUB: Final = web.AppKey("live_hub", LiveHub)
#: Alembic head revision the code expects (for /readyz).
SCHEMA_HEAD: Final = web.AppKey("schema_head", str)
#: The OpenAPI document and its HTML page, built once when the app is made.
OPENAPI: Final = web.AppKey("openapi", dict)
DOCS_HTML: Final = web.AppKey("docs_html", str)

# ---------------------------------------------------------------- request keys
REQUEST_ID: Final = web.RequestKey("request_id", str)
NOW: Final = web.RequestKey("now", datetime)
SCOPE: Final = web.RequestKey("scope", Scope)

JSON_TYPES: Final = frozenset({"application/json"})
_DIGITS: Final = re.compile(r"[1-9][0-9]{0,18}")
_STRING_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def call_of(request: web.Request) -> Call:
    """The use-case :class:`Call` of an authenticated request."""
    return Call(scope=request[SCOPE], request_id=request[REQUEST_ID], now=request[NOW])


async def body(request: web.Request, cls: type[T]) -> T:
    """The request body as ``cls``: 415 unless JSON, 413 if too large, 400/422 if malformed."""
    if request.content_type not in JSON_TYPES:
        raise web.HTTPUnsupportedMediaType(
            text=f"send the body as application/json, not {request.content_type or 'nothing'}"
        )
    raw = await request.read()  # raises 413 past the application's client_max_size
    return parse(cls, decode_json(raw))


def respond(view: object, *, status: int = 200) -> web.Response:
    """A JSON response of a view (or a page of views)."""
    return web.json_response(to_json(view), status=status)


def int_id(request: web.Request, name: str, what: str) -> int:
    """Path parameter ``name`` as a row id; anything else names nothing (404)."""
    raw = request.match_info[name]
    if _DIGITS.fullmatch(raw) is None or int(raw) > MAX_INT64:
        raise NotFoundError(f"{what} {raw!r} not found")
    return int(raw)


def str_id(request: web.Request, name: str, what: str) -> str:
    """Path parameter ``name`` as a string id (gateway ids); anything else is 404."""
    raw = request.match_info[name]
    if _STRING_ID.fullmatch(raw) is None:
        raise NotFoundError(f"{what} {raw!r} not found")
    return raw


def page_of(request: web.Request, *, cursor: type[Any] = int) -> PageRequest:
    """``?limit=&after=`` of a list request (400 for anything else in the query)."""
    query = request.rel_url.query
    unknown = sorted(set(query) - {"limit", "after"})
    if unknown:
        raise MalformedRequestError.one(unknown[0], "unknown query parameter (limit, after)")
    for name in query:
        if len(query.getall(name)) > 1:
            raise MalformedRequestError.one(name, "given more than once")
    options: dict[str, Any] = {}
    if "limit" in query:
        raw = query["limit"]
        if _DIGITS.fullmatch(raw) is None or int(raw) > MAX_LIMIT:
            raise MalformedRequestError.one("limit", f"must be an integer in 1..{MAX_LIMIT}")
        options["limit"] = int(raw)
    if "after" in query:
        raw = query["after"]
        pattern = _STRING_ID if cursor is str else re.compile(r"0|[1-9][0-9]{0,18}")
        if pattern.fullmatch(raw) is None:
            raise MalformedRequestError.one("after", f"not a cursor: {raw!r}")
        options["after"] = raw if cursor is str else int(raw)
    return PageRequest(**options)
