"""Route tables: each route module declares its operations once, for aiohttp and for OpenAPI.

A route module holds one :class:`RouteTable` named ``routes`` and decorates its handlers::

    routes = RouteTable("tenants", "Utilities on the platform.")

    @routes.post("/v1/tenants", "Create a tenant", body=NewTenant, response=TenantView,
                 status=201, action=Action.TENANT_CREATE, problems=(409,))
    async def create_tenant(request: web.Request) -> web.Response: ...

The decorator records an :class:`Operation` (method, path, summary, body and response
types, success status, the action it checks, extra problem statuses); the application
factory adds every operation to the aiohttp router and the OpenAPI builder describes
them all. Operations are authenticated unless declared ``public=True``: the auth
middleware reads the operation of the matched handler from :data:`OPERATION_OF`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from backend.domain.auth import Action

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PATH_PARAM: Final = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class ListOf:
    """A paged list of ``item`` as a response type: ``{items: [...], next_after}``."""

    item: type[Any]
    #: JSON type of the page cursor (the key of ``item``): ``integer`` or ``string``.
    cursor: str = "integer"


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One HTTP operation as the router and the OpenAPI document both see it."""

    method: str
    path: str
    handler: Handler
    summary: str
    description: str
    tag: str
    body: type[Any] | None = None
    response: type[Any] | ListOf | None = None
    status: int = 200
    action: Action | None = None
    public: bool = False
    problems: tuple[int, ...] = ()
    #: Media type of a non-JSON success response (the docs page, say).
    media_type: str = "application/json"
    #: Path parameters that are strings (the others are integer ids).
    string_params: tuple[str, ...] = ()
    path_params: tuple[str, ...] = field(default=())

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


#: Every registered handler → its operation (read by the auth middleware).
OPERATION_OF: Final[dict[Handler, Operation]] = {}


class RouteTable:
    """The operations of one route module (one OpenAPI tag)."""

    def __init__(self, tag: str, description: str = "") -> None:
        self.tag = tag
        self.description = description
        self.operations: list[Operation] = []

    def route(
        self,
        method: str,
        path: str,
        summary: str,
        **options: Any,
    ) -> Callable[[Handler], Handler]:
        """Register the decorated handler for ``method path`` (options: see :class:`Operation`)."""

        def register(handler: Handler) -> Handler:
            op = Operation(
                method=method,
                path=path,
                handler=handler,
                summary=summary,
                description=(handler.__doc__ or summary).strip(),
                tag=self.tag,
                path_params=tuple(_PATH_PARAM.findall(path)),
                **options,
            )
            self.operations.append(op)
            OPERATION_OF[handler] = op
            return handler

        return register

    def get(self, path: str, summary: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, summary, **options)

    def post(self, path: str, summary: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, summary, **options)

    def delete(self, path: str, summary: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, summary, **options)

    def add_to(self, router: web.UrlDispatcher) -> None:
        """Add every operation to an aiohttp router."""
        for op in self.operations:
            router.add_route(op.method, op.path, op.handler, name=op.operation_id)
