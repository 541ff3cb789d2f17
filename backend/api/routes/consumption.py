"""Routes of the customer view: consumption history, live credit (server-sent events), statements.

``setup(app)`` puts the :class:`~backend.service.live.LiveHub` on the application at once
(``app[LIVE_HUB]``, key in :mod:`backend.api.context`, so resources other modules open
later — ingest, the dispatcher — can feed it) and opens the services and the live poller
in ``cleanup_ctx``, after the top-up runtime, whose dispatcher it hooks up (token results
poke the hub; ingest's ``on_live`` can be ``app[LIVE_HUB].changed``). The hub is
closed in ``on_shutdown``, which ends every open event stream before aiohttp waits for
its handlers. ``app[LIVE_SETTINGS]`` tunes the streams when a caller set it (tests).

Access: the same rules as the balance and token history (``supply_account.read``, scoped
in SQL): customers see their own accounts, resellers their customers', staff their
tenant's; another's account is 404 like a missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime
from typing import Final

from aiohttp import web

from backend.api.context import DATABASE, LIVE_HUB, REQUEST_ID, call_of, int_id, respond
from backend.api.middleware import REQUEST_ID_HEADER
from backend.api.registry import RouteTable
from backend.api.routes.topups import TOPUP_RUNTIME
from backend.api.schemas import to_json
from backend.domain.auth import Action
from backend.service.errors import NotFoundError
from backend.service.history import ConsumptionHistory, HistoryService, Resolution
from backend.service.live import (
    LiveHub,
    LiveService,
    LiveSettings,
    LiveSnapshot,
    is_older,
    poll_forever,
)
from backend.service.refusals import MalformedRequestError
from backend.service.statements import Statement, StatementService, parse_month, statement_csv

routes = RouteTable(
    "consumption",
    "What a customer sees of a supply account: consumption history in local time, live "
    "credit as server-sent events, monthly statements.",
)

HISTORY: Final = web.AppKey("history", HistoryService)
STATEMENTS: Final = web.AppKey("statements", StatementService)
LIVE: Final = web.AppKey("live", LiveService)
LIVE_SETTINGS: Final = web.AppKey("live_settings", LiveSettings)

EVENT_STREAM: Final = "text/event-stream"
CSV_TYPE: Final = "text/csv"
#: The SSE event carrying a snapshot.
CREDIT_EVENT: Final = "credit"
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_BOUND_HELP: Final = (
    "must be an RFC 3339 date-time with offset (2026-03-01T00:00:00Z) or a local date (2026-03-01)"
)


# ---------------------------------------------------------------- query strings


def query_of(request: web.Request, allowed: Sequence[str]) -> dict[str, str]:
    """The query parameters, each at most once and all in ``allowed`` (else 400)."""
    query = request.rel_url.query
    for name in query:
        if name not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise MalformedRequestError.one(name, f"unknown query parameter (known: {known})")
        if len(query.getall(name)) > 1:
            raise MalformedRequestError.one(name, "given more than once")
    return {name: query[name] for name in query}


def parse_bound(name: str, raw: str) -> datetime | date:
    """``from``/``to``: an aware RFC 3339 instant or a local date (400 otherwise)."""
    if _DATE.fullmatch(raw):
        try:
            return date.fromisoformat(raw)
        except ValueError:
            raise MalformedRequestError.one(name, f"{raw!r} is not a date") from None
    if " " in raw:
        # A '+' in a query string is a space (HTML forms): the offset got lost on the way.
        raise MalformedRequestError.one(name, f"{_BOUND_HELP}; write a + offset as %2B (or use Z)")
    if "T" not in raw.upper():
        raise MalformedRequestError.one(name, _BOUND_HELP)
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise MalformedRequestError.one(name, _BOUND_HELP) from None
    if value.utcoffset() is None:
        raise MalformedRequestError.one(name, f"{_BOUND_HELP}; the offset is required")
    return value


# ---------------------------------------------------------------- history


@routes.get(
    "/v1/accounts/{account_id}/consumption",
    "Consumption history of a supply account",
    response=ConsumptionHistory,
    action=Action.SUPPLY_ACCOUNT_READ,
    problems=(400,),
)
async def get_consumption(request: web.Request) -> web.Response:
    """Billed consumption in buckets of the tenant's local time. Query: ``resolution``
    (``hour``, ``day`` — the default — or ``month``), ``from`` and ``to`` (RFC 3339
    instants, or local dates such as ``2026-03-01``; ``to`` is exclusive; defaults: to
    now, from the start of the local day, month or year). The range is widened to whole
    buckets and may cover at most 31 days of hours, 366 days or 120 months (400
    otherwise). Days are 23 or 25 hours long across DST changes. Each billed interval
    counts in the bucket holding its end (readings are cumulative: the energy of an
    interval is never split across buckets). ``*_milli`` are exact (1/1000 of a minor
    unit), ``*_minor`` rounded half up; ``debited_minor`` is what the ledger took."""
    account_id = int_id(request, "account_id", "supply account")
    query = query_of(request, ("resolution", "from", "to"))
    raw = query.get("resolution", Resolution.DAY.value)
    try:
        resolution = Resolution(raw)
    except ValueError:
        allowed = ", ".join(r.value for r in Resolution)
        raise MalformedRequestError.one("resolution", f"must be one of {allowed}") from None
    start = parse_bound("from", query["from"]) if "from" in query else None
    end = parse_bound("to", query["to"]) if "to" in query else None
    history = await request.app[HISTORY].consumption(
        call_of(request), account_id, resolution=resolution, start=start, end=end
    )
    return respond(history)


# ---------------------------------------------------------------- statements


@routes.get(
    "/v1/accounts/{account_id}/statements/{month}",
    "Monthly statement of a supply account",
    response=Statement,
    action=Action.SUPPLY_ACCOUNT_READ,
    string_params=("month",),
    problems=(400,),
)
async def get_statement(request: web.Request) -> web.Response:
    """The statement of local month ``month`` (``YYYY-MM``, tenant time zone): opening
    balance, top-ups (payment and ledger transfer ids), consumption by tariff band (Wh,
    exact milli, minor units), block adders, standing charges, the taxes within them, every
    consumption transfer (reference ``consumption:{meter}:{ts}``), other transfers, the
    payer's milli carry at both ends and the closing balance, with ``checks`` proving
    ``opening + top-ups - consumption = closing`` and the milli/minor reconciliation.
    ``?format=csv`` answers the same as ``text/csv``. A month that has not begun is 404;
    the current month runs to now (``complete`` false)."""
    account_id = int_id(request, "account_id", "supply account")
    raw = request.match_info["month"]
    month = parse_month(raw)
    if month is None:
        raise NotFoundError(f"month {raw!r} not found (use YYYY-MM)")
    query = query_of(request, ("format",))
    fmt = query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise MalformedRequestError.one("format", "must be json or csv")
    statement = await request.app[STATEMENTS].statement(call_of(request), account_id, month)
    if fmt == "json":
        return respond(statement)
    response = web.Response(text=statement_csv(statement), content_type=CSV_TYPE, charset="utf-8")
    name = f"statement-{statement.supply_account_id}-{statement.month}.csv"
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


# ---------------------------------------------------------------- live events


def sse_event(snapshot: LiveSnapshot) -> bytes:
    """One server-sent event carrying ``snapshot`` (WHATWG HTML §9.2: one ``data`` line)."""
    data = json.dumps(to_json(snapshot), separators=(",", ":"))
    return f"event: {CREDIT_EVENT}\ndata: {data}\n\n".encode()


@routes.get(
    "/v1/accounts/{account_id}/events",
    "Live credit of a supply account (server-sent events)",
    action=Action.SUPPLY_ACCOUNT_READ,
    media_type=EVENT_STREAM,
)
async def account_events(request: web.Request) -> web.StreamResponse:
    """A ``text/event-stream``: at once a ``credit`` event with the account's ledger
    balance, the meter's last reported credit and its time, relay, power and the newest
    reading's time, then another whenever one of them changes (within a second of a token
    being applied or a reading ingested on this instance, within the poll period when
    another instance made the change). Comment lines keep an idle stream open every 15 s.
    The data is JSON; ``ledger_version`` orders snapshots."""
    account_id = int_id(request, "account_id", "supply account")
    query_of(request, ())
    settings = request.app.get(LIVE_SETTINGS) or LiveSettings()
    with request.app[LIVE_HUB].subscribe(account_id) as sub:
        # Subscribed before the first read: a change committed after it is queued.
        last = await request.app[LIVE].snapshot(call_of(request), account_id)
        response = web.StreamResponse(
            headers={
                "Content-Type": EVENT_STREAM,
                "Cache-Control": "no-cache",
                # nginx buffers proxied responses unless told not to.
                "X-Accel-Buffering": "no",
                REQUEST_ID_HEADER: request[REQUEST_ID],
            }
        )
        await response.prepare(request)
        # A client gone away shows as a failed write (at the latest at the next heartbeat).
        with contextlib.suppress(ConnectionResetError):
            await response.write(f"retry: {settings.retry_ms}\n\n".encode() + sse_event(last))
            while True:
                try:
                    async with asyncio.timeout(settings.heartbeat_s):
                        item = await sub.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if item is None:
                    break  # the server is shutting down; the client reconnects elsewhere
                if item == last or is_older(item, last):
                    continue
                await response.write(sse_event(item))
                last = item
    return response


# ---------------------------------------------------------------- wiring


async def _services(app: web.Application) -> AsyncIterator[None]:
    db = app[DATABASE]
    live = LiveService(db)
    app[HISTORY] = HistoryService(db)
    app[STATEMENTS] = StatementService(db)
    app[LIVE] = live
    hub = app[LIVE_HUB]
    runtime = app.get(TOPUP_RUNTIME)
    if runtime is not None and runtime.dispatcher is not None:
        runtime.dispatcher.credit_listeners.append(hub.poke)
    settings = app.get(LIVE_SETTINGS) or LiveSettings()
    task = asyncio.get_running_loop().create_task(
        poll_forever(hub, live.snapshots, poll_s=settings.poll_s), name="live-poll"
    )
    try:
        yield
    finally:
        hub.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _close_hub(app: web.Application) -> None:
    app[LIVE_HUB].close()


def setup(app: web.Application) -> None:
    """Put the live hub on the app; open the services and the live poller with it."""
    app[LIVE_HUB] = LiveHub()
    app.cleanup_ctx.append(_services)
    app.on_shutdown.append(_close_hub)
