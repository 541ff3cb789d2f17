"""Routes of alerts and their webhook notifications; ``setup`` runs the checks and the deliverer.

``setup(app)`` opens the alerting runtime (:func:`backend.service.alerting.alerting_runtime`:
the scheduled checks and the notification deliverer) in the application's ``cleanup_ctx``,
after the database. Its settings are ``app[ALERTING_SETTINGS]`` when a caller set them
(tests), else derived from the backend configuration (keys ``alerts.*``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from backend.adapters.db.alert_tables import AlertKind
from backend.api.context import CLOCK, CONFIG, DATABASE, body, call_of, int_id, page_of, respond
from backend.api.registry import ListOf, RouteTable
from backend.config import BackendConfig
from backend.domain.auth import Action
from backend.service.alert_admin import (
    AlertAdmin,
    AlertFilter,
    AlertView,
    NewWebhookEndpoint,
    WebhookEndpointCreated,
    WebhookEndpointView,
)
from backend.service.alerting import AlertingRuntime, AlertingSettings, alerting_runtime
from backend.service.notify import DeliverySettings
from backend.service.refusals import MalformedRequestError

routes = RouteTable(
    "alerts",
    "Alerts (low credit, stale meters, offline gateways, refused tokens, …) and the"
    " utility's webhook endpoints that receive them, signed.",
)

ALERTING_SETTINGS: Final = web.AppKey("alerting_settings", AlertingSettings)
ALERTING: Final = web.AppKey("alerting", AlertingRuntime)
ALERT_ADMIN: Final = web.AppKey("alert_admin", AlertAdmin)

_FILTERS: Final = ("kind", "open")
_BOOLEANS: Final = {"true": True, "false": False}


def _alert_filter(request: web.Request) -> tuple[web.Request, AlertFilter]:
    """``?kind=&open=`` of an alert list (400 for a bad value), and the request without them."""
    query = request.rel_url.query
    for name in _FILTERS:
        values = query.getall(name, [])
        if len(values) > 1:
            raise MalformedRequestError.one(name, "given more than once")
    kind = query.get("kind")
    if kind is not None and kind not in AlertKind.__members__:
        raise MalformedRequestError.one(
            "kind", f"must be one of {', '.join(AlertKind)}, got {kind[:40]!r}"
        )
    is_open = query.get("open")
    if is_open is not None and is_open not in _BOOLEANS:
        raise MalformedRequestError.one("open", f"must be true or false, got {is_open[:40]!r}")
    rest = request.clone(rel_url=request.rel_url.without_query_params(*_FILTERS))
    where = AlertFilter(
        kind=None if kind is None else AlertKind(kind),
        open=None if is_open is None else _BOOLEANS[is_open],
    )
    return rest, where


# ---------------------------------------------------------------- alerts


@routes.get("/v1/alerts", "List alerts", response=ListOf(AlertView), action=Action.ALERT_READ)
async def list_alerts(request: web.Request) -> web.Response:
    """The tenant's alerts, oldest first. ``?kind=LOW_CREDIT`` keeps one kind;
    ``?open=true`` only unresolved ones, ``?open=false`` only resolved ones."""
    rest, where = _alert_filter(request)
    page = page_of(rest)
    return respond(await request.app[ALERT_ADMIN].list_alerts(call_of(request), page, where))


@routes.post(
    "/v1/alerts/{alert_id}/resolve",
    "Resolve an alert",
    response=AlertView,
    action=Action.ALERT_RESOLVE,
)
async def resolve_alert(request: web.Request) -> web.Response:
    """Mark an alert resolved (someone has dealt with it). Resolving twice is harmless:
    the first time stays. The checks raise a new alert on the next crossing or episode
    whether or not the last one was resolved."""
    alert_id = int_id(request, "alert_id", "alert")
    return respond(await request.app[ALERT_ADMIN].resolve_alert(call_of(request), alert_id))


# ---------------------------------------------------------------- webhook endpoints


@routes.post(
    "/v1/webhook-endpoints",
    "Register a webhook endpoint",
    body=NewWebhookEndpoint,
    response=WebhookEndpointCreated,
    status=201,
    action=Action.WEBHOOK_ENDPOINT_CREATE,
    problems=(404, 409),
)
async def create_webhook_endpoint(request: web.Request) -> web.Response:
    """Register a URL that receives the tenant's alerts of the given kinds, raised from now
    on, as JSON POSTs (``{"id", "type": "alert.raised", "created_at", "tenant_id",
    "alert": {...}}``). Each is signed: ``Voltcredit-Signature: t=<unix s>,v1=<hex>``,
    the HMAC-SHA256 of ``<t>.<body>`` keyed with the ``secret`` in this response — shown
    this once. ``Voltcredit-Event-Id`` stays the same across retries: drop repeats by it.
    Anything but a 2xx answer is retried with growing delays, then given up. A platform
    admin names the ``tenant_id``; 409 past 16 endpoints per tenant."""
    new = await body(request, NewWebhookEndpoint)
    view = await request.app[ALERT_ADMIN].create_endpoint(call_of(request), new)
    return respond(view, status=201)


@routes.get(
    "/v1/webhook-endpoints",
    "List webhook endpoints",
    response=ListOf(WebhookEndpointView),
    action=Action.WEBHOOK_ENDPOINT_READ,
)
async def list_webhook_endpoints(request: web.Request) -> web.Response:
    """The endpoints not deleted, by id (without their secrets)."""
    page = page_of(request)
    return respond(await request.app[ALERT_ADMIN].list_endpoints(call_of(request), page))


@routes.get(
    "/v1/webhook-endpoints/{endpoint_id}",
    "Show a webhook endpoint",
    response=WebhookEndpointView,
    action=Action.WEBHOOK_ENDPOINT_READ,
)
async def get_webhook_endpoint(request: web.Request) -> web.Response:
    """One endpoint (without its secret); a deleted one shows when it was deleted."""
    endpoint_id = int_id(request, "endpoint_id", "webhook endpoint")
    return respond(await request.app[ALERT_ADMIN].get_endpoint(call_of(request), endpoint_id))


@routes.delete(
    "/v1/webhook-endpoints/{endpoint_id}",
    "Delete a webhook endpoint",
    response=WebhookEndpointView,
    action=Action.WEBHOOK_ENDPOINT_DELETE,
)
async def delete_webhook_endpoint(request: web.Request) -> web.Response:
    """Stop notifying an endpoint at once; notifications not yet delivered to it are
    cancelled. Deleting twice is harmless."""
    endpoint_id = int_id(request, "endpoint_id", "webhook endpoint")
    return respond(await request.app[ALERT_ADMIN].delete_endpoint(call_of(request), endpoint_id))


# ---------------------------------------------------------------- wiring


def settings_from_config(config: BackendConfig) -> AlertingSettings:
    """The alerting settings of a backend configuration (keys ``alerts.*``)."""
    return AlertingSettings(
        check_every_s=float(config.alert_check_every_s),
        meter_stale_after_s=config.meter_stale_after_s,
        gateway_offline_after_s=config.gateway_offline_after_s,
        delivery=dataclasses.replace(DeliverySettings(), max_attempts=config.webhook_max_attempts),
    )


async def _runtime(app: web.Application) -> AsyncIterator[None]:
    settings = app.get(ALERTING_SETTINGS) or settings_from_config(app[CONFIG])
    app[ALERT_ADMIN] = AlertAdmin(app[DATABASE])
    async with alerting_runtime(app[DATABASE], settings, clock=app[CLOCK]) as runtime:
        app[ALERTING] = runtime
        yield


def setup(app: web.Application) -> None:
    """Open the alerting runtime with the application (after the database)."""
    app.cleanup_ctx.append(_runtime)
