"""Routes of authentication: customer login and the API keys of staff and systems."""

from __future__ import annotations

from aiohttp import web

from backend.api.context import AUTH, NOW, body, call_of, int_id, page_of, respond
from backend.api.registry import ListOf, RouteTable
from backend.domain.auth import Action
from backend.service.auth import ApiKeyCreated, ApiKeyView, Login, LoginResult, NewApiKey

routes = RouteTable(
    "auth",
    "Customer login (short-lived bearer tokens) and API keys (shown once, stored hashed).",
)


@routes.post(
    "/v1/auth/login",
    "Log a customer in",
    body=Login,
    response=LoginResult,
    public=True,
    problems=(401,),
)
async def login(request: web.Request) -> web.Response:
    """Exchange a customer's tenant, e-mail and password for a bearer token (15 minutes)."""
    credentials = await body(request, Login)
    return respond(await request.app[AUTH].login(credentials, request[NOW]))


@routes.post(
    "/v1/api-keys",
    "Create an API key",
    body=NewApiKey,
    response=ApiKeyCreated,
    status=201,
    action=Action.API_KEY_CREATE,
    problems=(404,),
)
async def create_api_key(request: web.Request) -> web.Response:
    """Create a key; the response holds the whole key, which is never shown again.

    A platform admin creates keys of any role (a tenant's first UTILITY_ADMIN key, say);
    a utility admin creates UTILITY_ADMIN, RESELLER and SUPPORT keys in its own tenant.
    """
    new = await body(request, NewApiKey)
    return respond(await request.app[AUTH].create_api_key(call_of(request), new), status=201)


@routes.get(
    "/v1/api-keys",
    "List API keys",
    response=ListOf(ApiKeyView),
    action=Action.API_KEY_READ,
)
async def list_api_keys(request: web.Request) -> web.Response:
    """The keys the caller may see, without their secrets."""
    return respond(await request.app[AUTH].list_api_keys(call_of(request), page_of(request)))


@routes.get(
    "/v1/api-keys/{key_id}",
    "Show an API key",
    response=ApiKeyView,
    action=Action.API_KEY_READ,
)
async def get_api_key(request: web.Request) -> web.Response:
    """One key, without its secret."""
    key_id = int_id(request, "key_id", "api key")
    return respond(await request.app[AUTH].get_api_key(call_of(request), key_id))


@routes.delete(
    "/v1/api-keys/{key_id}",
    "Revoke an API key",
    response=ApiKeyView,
    action=Action.API_KEY_REVOKE,
)
async def revoke_api_key(request: web.Request) -> web.Response:
    """Revoke a key at once: its next request is refused (401). Revoking twice is harmless."""
    key_id = int_id(request, "key_id", "api key")
    return respond(await request.app[AUTH].revoke_api_key(call_of(request), key_id))
