"""The API's middlewares, outermost first: request id, problem mapping, body limit, authentication.

- **Request id**: ``X-Request-Id`` is taken from the request when it is a sane token
  (1..64 of ``[A-Za-z0-9._:-]``), else drawn fresh; it is echoed on every response and
  recorded in the audit log and in problem documents.
- **Problems**: the one place where exceptions become HTTP statuses
  (:mod:`backend.api.problems`); nothing else in the API chooses an error status.
- **Body limit**: a declared ``Content-Length`` over the limit is refused (413) before
  anything reads it; a chunked body is cut at the same limit by aiohttp's
  ``client_max_size`` when the handler reads it.
- **Authentication**: every operation not declared ``public`` needs
  ``Authorization: Bearer <API key or customer token>``; the caller's scope is put on the
  request for :func:`backend.api.context.call_of`.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from backend.api.context import AUTH, CLOCK, NOW, REQUEST_ID, SCOPE
from backend.api.problems import (
    HTTP_PROBLEMS,
    INTERNAL,
    Problem,
    problem_for,
    problem_response,
    status_of,
)
from backend.api.registry import OPERATION_OF, Handler
from backend.errors import BackendError
from backend.service.refusals import InvalidInputError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER: Final = "X-Request-Id"
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take or draw the request id; echo it on the response."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID] = rid
    response = await handler(request)
    response.headers[REQUEST_ID_HEADER] = rid
    return response


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into an RFC 9457 problem response."""
    rid = request[REQUEST_ID]
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        problem = HTTP_PROBLEMS.get(exc.status) or Problem(
            exc.status, f"http-{exc.status}", exc.reason
        )
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return problem_response(
            problem, status=exc.status, detail=detail, request_id=rid, headers=headers
        )
    except BackendError as exc:
        problem = problem_for(exc)
        status = status_of(problem, exc)
        if status >= 500:
            log.exception("request %s: %s %s failed", rid, request.method, request.path)
            detail = f"the server failed; quote request id {rid} when reporting it"
        else:
            detail = str(exc)
        errors = None
        if isinstance(exc, InvalidInputError) and exc.errors:
            errors = [{"field": e.field, "problem": e.problem} for e in exc.errors]
        challenge = {"WWW-Authenticate": 'Bearer realm="voltcredit"'} if status == 401 else None
        return problem_response(
            problem, status=status, detail=detail, request_id=rid, errors=errors, headers=challenge
        )
    except Exception:
        log.exception("request %s: %s %s crashed", rid, request.method, request.path)
        return problem_response(
            INTERNAL,
            status=500,
            detail=f"the server failed; quote request id {rid} when reporting it",
            request_id=rid,
        )


def body_limit(max_bytes: int) -> Middleware:
    """Refuse a declared body larger than ``max_bytes`` before reading it (413)."""

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if request.method in _BODY_METHODS and length is not None and length > max_bytes:
            raise web.HTTPRequestEntityTooLarge(
                max_size=max_bytes,
                actual_size=length,
                text=f"request body of {length} bytes exceeds the limit of {max_bytes}",
            )
        return await handler(request)

    return limit


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Note the request's time; put the caller's scope on non-public operations."""
    now = request.app[CLOCK]()
    request[NOW] = now
    op = OPERATION_OF.get(request.match_info.handler)
    if op is not None and not op.public:
        header = request.headers.get("Authorization")
        request[SCOPE] = await request.app[AUTH].authenticate(header, now)
    return await handler(request)
