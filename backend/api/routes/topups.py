"""Routes of the top-up path: top-ups, balance, token history, receipts, payment webhooks.

``setup(app)`` opens the top-up runtime (:mod:`backend.service.topup_runtime`: sandbox
provider, MQTT link, token dispatcher, reconciliation) in the application's
``cleanup_ctx``, after the database. Its settings are ``app[TOPUP_SETTINGS]`` when a
caller set them (tests, benchmarks), else derived from the backend configuration.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Final
from urllib.parse import unquote, urlsplit

from aiohttp import web

from backend.adapters.mqtt import MqttSettings
from backend.api.context import (
    CLOCK,
    CONFIG,
    DATABASE,
    KEY_STORE,
    LIVE_HUB,
    REQUEST_ID,
    body,
    call_of,
    int_id,
    page_of,
    respond,
)
from backend.api.registry import ListOf, RouteTable
from backend.config import BackendConfig
from backend.domain.auth import Action
from backend.domain.consumption import IngestPolicy
from backend.domain.fields import MAX_INT64, Doc, Range, Text
from backend.domain.topups import PaymentState
from backend.service.accounts import AccountService, BalanceView, ReceiptView, TokenView
from backend.service.errors import NotFoundError
from backend.service.refusals import MalformedRequestError
from backend.service.topup_runtime import (
    SandboxMode,
    TopupRuntime,
    TopupSettings,
    topup_runtime,
)
from backend.service.topups import MAX_KEY_LEN, SettleOutcome, TopupResult, TopupService

routes = RouteTable(
    "topups",
    "Top-ups (payments that become signed credit tokens), balances, tokens, receipts.",
)

TOPUP_SETTINGS: Final = web.AppKey("topup_settings", TopupSettings)
TOPUP_RUNTIME: Final = web.AppKey("topup_runtime", TopupRuntime)
TOPUPS: Final = web.AppKey("topups", TopupService)
ACCOUNTS: Final = web.AppKey("accounts", AccountService)

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
#: Set on the answer to a replayed top-up request (as Stripe does).
REPLAYED_HEADER: Final = "Idempotent-Replayed"


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTopup:
    """Top up a supply account."""

    amount_minor: Annotated[
        int, Range(1, MAX_INT64), Doc("amount in minor units of the tenant's currency", 2000)
    ]
    currency: Annotated[str, Text(3, 3, "[A-Z]{3}"), Doc("ISO 4217 code (the tenant's)", "EUR")]


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookAck:
    """What the backend did with a provider event."""

    outcome: SettleOutcome
    payment_id: uuid.UUID | None
    status: PaymentState | None


# ---------------------------------------------------------------- top-ups


@routes.post(
    "/v1/accounts/{account_id}/topups",
    "Top up a supply account",
    body=NewTopup,
    response=TopupResult,
    status=201,
    action=Action.TOPUP_CREATE,
    problems=(409, 502, 503),
)
async def create_topup(request: web.Request) -> web.Response:
    """Start a top-up payment. The ``Idempotency-Key`` header (1..128 printable ASCII
    characters) is required: repeating a request with the same key answers the same
    payment (200, header ``Idempotent-Replayed: true``) and never charges twice; the same
    key with another amount is 409. The amount must be in the tenant's currency and
    top-up range. The payment is usually ``PENDING``: the credit token is issued when the
    provider confirms it (its webhook), and the receipt and token history show it then."""
    account_id = int_id(request, "account_id", "supply account")
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        raise MalformedRequestError.one(IDEMPOTENCY_HEADER, "this header is required")
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise MalformedRequestError.one(IDEMPOTENCY_HEADER, f"must be 1..{MAX_KEY_LEN} characters")
    new = await body(request, NewTopup)
    result = await request.app[TOPUPS].request_topup(
        call_of(request),
        account_id,
        amount_minor=new.amount_minor,
        currency=new.currency,
        idempotency_key=key,
    )
    response = respond(result, status=200 if result.replayed else 201)
    if result.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


@routes.get(
    "/v1/accounts/{account_id}/balance",
    "Balance of a supply account",
    response=BalanceView,
    action=Action.SUPPLY_ACCOUNT_READ,
)
async def get_balance(request: web.Request) -> web.Response:
    """The ledger balance (authoritative, minor units), the meter's last reported credit
    (rating units, 1/1000 of a minor unit) and when it was reported, and the tokens issued
    but not yet applied or rejected."""
    account_id = int_id(request, "account_id", "supply account")
    return respond(await request.app[ACCOUNTS].balance(call_of(request), account_id))


@routes.get(
    "/v1/accounts/{account_id}/tokens",
    "Token history of a supply account",
    response=ListOf(TokenView),
    action=Action.TOPUP_READ,
)
async def list_tokens(request: web.Request) -> web.Response:
    """The signed messages (credit tokens, tariffs) of the account's meter, newest first;
    ``after`` is a message id and continues with older ones."""
    account_id = int_id(request, "account_id", "supply account")
    page = page_of(request)
    return respond(await request.app[ACCOUNTS].token_history(call_of(request), account_id, page))


@routes.get(
    "/v1/payments/{payment_id}/receipt",
    "Receipt of a top-up",
    response=ReceiptView,
    action=Action.TOPUP_READ,
    string_params=("payment_id",),
)
async def get_receipt(request: web.Request) -> web.Response:
    """The top-up as paid, credited and shared out (fees, taxes and every ledger line of
    its settlement), with its credit token's id and status."""
    raw = request.match_info["payment_id"]
    try:
        payment_id = uuid.UUID(raw)
    except ValueError:
        raise NotFoundError(f"payment {raw!r} not found") from None
    return respond(await request.app[ACCOUNTS].receipt(call_of(request), payment_id))


# ---------------------------------------------------------------- webhooks


@routes.post(
    "/v1/webhooks/{provider}",
    "Payment provider webhook",
    response=WebhookAck,
    public=True,
    string_params=("provider",),
    problems=(400, 409),
)
async def payment_webhook(request: web.Request) -> web.Response:
    """Events from a payment provider. No API key: the provider's signature header
    (HMAC over timestamp and body) is checked, and the timestamp must be within 5 minutes;
    a forged, tampered or late event is 400 and changes nothing. A redelivered event is
    200 and changes nothing. 409 for an event about a payment this backend has not
    recorded yet (the provider retries)."""
    provider = request.match_info["provider"]
    raw = await request.read()
    settlement = await request.app[TOPUPS].handle_webhook(
        provider, request.headers, raw, request_id=request[REQUEST_ID]
    )
    return respond(
        WebhookAck(
            outcome=settlement.outcome,
            payment_id=settlement.payment_id,
            status=settlement.status,
        )
    )


# ---------------------------------------------------------------- wiring


def settings_from_config(config: BackendConfig) -> TopupSettings:
    """The top-up settings of a backend configuration.

    ``sandbox_mode`` is read when the configuration has it, else it takes its default;
    the MQTT client id and shared subscriptions come from ``[mqtt]``.
    """
    mode = SandboxMode(getattr(config, "sandbox_mode", SandboxMode.WEBHOOK.value))
    host = config.http_host if config.http_host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104 - comparing, not binding
    webhook_url = None
    if mode is SandboxMode.WEBHOOK:
        if config.http_port == 0:
            # The port is not known before the server starts: settle inside the request.
            mode = SandboxMode.INSTANT
        else:
            webhook_url = f"http://{host}:{config.http_port}/v1/webhooks/sandbox"
    return TopupSettings(
        mqtt=mqtt_settings(
            config.mqtt_url,
            client_id=config.mqtt_client_id,
            shared=config.mqtt_shared_subscriptions,
        ),
        sandbox_mode=mode,
        sandbox_webhook_url=webhook_url,
        ingest_policy=IngestPolicy(max_clock_ahead_s=config.ingest_max_clock_ahead_s),
    )


def mqtt_settings(url: str, *, client_id: str, shared: bool) -> MqttSettings:
    """Broker settings from ``mqtt://[user:password@]host[:port]`` (``mqtts://`` for TLS)."""
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    return MqttSettings(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (8883 if tls else 1883),
        client_id=client_id,
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
        tls=tls,
        shared_subscriptions=shared,
    )


async def _runtime(app: web.Application) -> AsyncIterator[None]:
    settings = app.get(TOPUP_SETTINGS) or settings_from_config(app[CONFIG])
    hub = app.get(LIVE_HUB)
    async with topup_runtime(
        app[DATABASE],
        app[KEY_STORE],
        settings,
        clock=app[CLOCK],
        on_live=None if hub is None else hub.changed,
    ) as runtime:
        app[TOPUP_RUNTIME] = runtime
        app[TOPUPS] = runtime.topups
        app[ACCOUNTS] = runtime.accounts
        yield


def setup(app: web.Application) -> None:
    """Open the top-up runtime with the application (after the database)."""
    app.cleanup_ctx.append(_runtime)
