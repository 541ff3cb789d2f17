"""Routes of the metering network: tariffs (signed for meters), gateways, meters."""

from __future__ import annotations

from aiohttp import web

from backend.api.context import PROVISIONING, body, call_of, int_id, page_of, respond, str_id
from backend.api.registry import ListOf, RouteTable
from backend.domain.auth import Action
from backend.service.provisioning import (
    GatewayCreated,
    GatewayView,
    MeterAttached,
    MeterView,
    NewGateway,
    NewMeter,
    NewTariff,
    TariffPublished,
    TariffView,
)

routes = RouteTable(
    "network",
    "Tariffs and the metering network: gateways (MQTT identities) and meters.",
)


# ---------------------------------------------------------------- tariffs


@routes.post(
    "/v1/tariffs",
    "Publish a tariff version",
    body=NewTariff,
    response=TariffPublished,
    status=201,
    action=Action.TARIFF_PUBLISH,
    problems=(409,),
)
async def publish_tariff(request: web.Request) -> web.Response:
    """Publish the next version of a tariff code. Every meter whose supply account is on
    that code gets a signed tariff message (SPEC.md §2.3) in the token outbox, in the same
    transaction; the dispatcher delivers them. 409 when no signing key is active yet."""
    new = await body(request, NewTariff)
    view = await request.app[PROVISIONING].publish_tariff(call_of(request), new)
    return respond(view, status=201)


@routes.get(
    "/v1/tariffs", "List tariff versions", response=ListOf(TariffView), action=Action.TARIFF_READ
)
async def list_tariffs(request: web.Request) -> web.Response:
    """Every version of every tariff of the caller's tenant."""
    return respond(await request.app[PROVISIONING].list_tariffs(call_of(request), page_of(request)))


@routes.get(
    "/v1/tariffs/{tariff_id}",
    "Show a tariff version",
    response=TariffView,
    action=Action.TARIFF_READ,
)
async def get_tariff(request: web.Request) -> web.Response:
    """One tariff version, by its row id (``id`` in the list)."""
    tariff_id = int_id(request, "tariff_id", "tariff")
    return respond(await request.app[PROVISIONING].get_tariff(call_of(request), tariff_id))


# ---------------------------------------------------------------- gateways


@routes.post(
    "/v1/gateways",
    "Create a gateway",
    body=NewGateway,
    response=GatewayCreated,
    status=201,
    action=Action.GATEWAY_CREATE,
    problems=(409,),
)
async def create_gateway(request: web.Request) -> web.Response:
    """Create a gateway. The response holds its MQTT user name and password, shown this
    once (only an argon2id hash is kept); add them to the broker
    (``mosquitto_passwd``, see systemd/mosquitto-voltcredit.conf)."""
    new = await body(request, NewGateway)
    view = await request.app[PROVISIONING].create_gateway(call_of(request), new)
    return respond(view, status=201)


@routes.get(
    "/v1/gateways",
    "List gateways",
    response=ListOf(GatewayView, cursor="string"),
    action=Action.GATEWAY_READ,
)
async def list_gateways(request: web.Request) -> web.Response:
    """The tenant's gateways, by id."""
    page = page_of(request, cursor=str)
    return respond(await request.app[PROVISIONING].list_gateways(call_of(request), page))


@routes.get(
    "/v1/gateways/{gateway_id}",
    "Show a gateway",
    response=GatewayView,
    action=Action.GATEWAY_READ,
    string_params=("gateway_id",),
)
async def get_gateway(request: web.Request) -> web.Response:
    """One gateway of the tenant."""
    gateway_id = str_id(request, "gateway_id", "gateway")
    return respond(await request.app[PROVISIONING].get_gateway(call_of(request), gateway_id))


# ---------------------------------------------------------------- meters


@routes.post(
    "/v1/meters",
    "Attach a meter",
    body=NewMeter,
    response=MeterAttached,
    status=201,
    action=Action.METER_CREATE,
    problems=(404, 409),
)
async def attach_meter(request: web.Request) -> web.Response:
    """Attach a meter (by serial) to a gateway and a supply account; the account's current
    tariff is queued for it as a signed message."""
    new = await body(request, NewMeter)
    view = await request.app[PROVISIONING].attach_meter(call_of(request), new)
    return respond(view, status=201)


@routes.get("/v1/meters", "List meters", response=ListOf(MeterView), action=Action.METER_READ)
async def list_meters(request: web.Request) -> web.Response:
    """The meters the caller may see (a customer's or reseller's: on their accounts)."""
    return respond(await request.app[PROVISIONING].list_meters(call_of(request), page_of(request)))


@routes.get("/v1/meters/{serial}", "Show a meter", response=MeterView, action=Action.METER_READ)
async def get_meter(request: web.Request) -> web.Response:
    """One meter, by serial."""
    serial = int_id(request, "serial", "meter")
    return respond(await request.app[PROVISIONING].get_meter(call_of(request), serial))
