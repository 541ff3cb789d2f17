"""Routes of revenue split and settlement: rule sets per tariff code, partner balances, statements.

``setup(app)`` builds the two services on the application's database in ``cleanup_ctx``
(after the database is opened).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import date
from typing import Final

from aiohttp import web
from multidict import MultiDictProxy

from backend.api.context import DATABASE, body, call_of, int_id, respond
from backend.api.registry import RouteTable
from backend.domain.auth import Action
from backend.domain.split import SplitContext
from backend.service.errors import NotFoundError
from backend.service.provisioning import TARIFF_CODE
from backend.service.refusals import MalformedRequestError
from backend.service.settlement import (
    PartnerBalanceView,
    SettlementService,
    StatementView,
    statement_csv,
)
from backend.service.split_rules import NewSplitRuleSet, SplitRuleService, SplitRuleSetView

routes = RouteTable(
    "settlement",
    "Revenue split rule sets per tariff code, partner balances and settlement statements.",
)

SPLIT_RULES: Final = web.AppKey("split_rules", SplitRuleService)
SETTLEMENT: Final = web.AppKey("settlement", SettlementService)

CSV_MEDIA_TYPE: Final = "text/csv"
_DATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_STATEMENT_QUERY: Final = ("from", "to", "format")
_RULE_SET_PATH: Final = "/v1/tariffs/{tariff_code}/split-rules/{applies_to}"


def _rule_set_of(request: web.Request) -> tuple[str, SplitContext]:
    """The tariff code and context a rule-set path names; anything else names nothing."""
    code = request.match_info["tariff_code"]
    regex = TARIFF_CODE.regex
    if not TARIFF_CODE.min_len <= len(code) <= TARIFF_CODE.max_len or (
        regex is not None and regex.fullmatch(code) is None
    ):
        raise NotFoundError(f"tariff {code!r} not found")
    raw = request.match_info["applies_to"]
    try:
        return code, SplitContext(raw)
    except ValueError:
        raise NotFoundError(
            f"no rule sets {raw!r}: use {', '.join(c.value for c in SplitContext)}"
        ) from None


# ---------------------------------------------------------------- split rules


@routes.route(
    "PUT",
    _RULE_SET_PATH,
    "Replace a split rule set",
    body=NewSplitRuleSet,
    response=SplitRuleSetView,
    action=Action.TARIFF_PUBLISH,
    string_params=("tariff_code", "applies_to"),
)
async def put_split_rules(request: web.Request) -> web.Response:
    """Replace the whole rule set that shares the money of a tariff code per top-up
    (``applies_to`` = ``TOPUP``) or per rated consumption (``CONSUMPTION``). The rules
    apply in the order given. Exactly one REMAINDER rule (paying a partner of the utility,
    not of a reseller); basis points at most 10 000 in total; FIXED_PER_DAY and PER_KWH only
    for CONSUMPTION, FIXED_PER_TOPUP only for TOPUP; every partner one of the tenant's. The
    tariff code must be published. The set is written in one transaction with its audit
    row; the rules get new ids. A refused set changes nothing."""
    code, context = _rule_set_of(request)
    new = await body(request, NewSplitRuleSet)
    return respond(await request.app[SPLIT_RULES].replace(call_of(request), code, context, new))


@routes.get(
    _RULE_SET_PATH,
    "Show a split rule set",
    response=SplitRuleSetView,
    action=Action.PARTNER_READ,
    string_params=("tariff_code", "applies_to"),
)
async def get_split_rules(request: web.Request) -> web.Response:
    """The rule set of a published tariff code and context, in order (an empty list when
    none is set: nothing is split)."""
    code, context = _rule_set_of(request)
    return respond(await request.app[SPLIT_RULES].get(call_of(request), code, context))


# ---------------------------------------------------------------- partners


@routes.get(
    "/v1/partners/{partner_id}/balance",
    "Balance of a partner",
    response=PartnerBalanceView,
    action=Action.PARTNER_READ,
)
async def get_partner_balance(request: web.Request) -> web.Response:
    """The partner's ledger account now: credits, debits and balance in minor units."""
    partner_id = int_id(request, "partner_id", "partner")
    return respond(await request.app[SETTLEMENT].balance(call_of(request), partner_id))


def _date_of(query: MultiDictProxy[str], name: str) -> date:
    raw = query.get(name)
    if raw is None:
        raise MalformedRequestError.one(name, "required: a date YYYY-MM-DD")
    if _DATE.fullmatch(raw) is None:
        raise MalformedRequestError.one(name, f"not a date YYYY-MM-DD: {raw[:40]!r}")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise MalformedRequestError.one(name, f"not a calendar date: {raw!r}") from None


def wants_csv(accept: str) -> bool:
    """Whether an ``Accept`` header prefers ``text/csv`` to JSON (RFC 9110 §12.5.1 q-values)."""
    best: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        best[media] = max(best.get(media, 0.0), quality)
    csv_q = best.get(CSV_MEDIA_TYPE, 0.0)
    json_q = max(best.get("application/json", 0.0), best.get("application/*", 0.0))
    return csv_q > 0 and csv_q > json_q


@routes.get(
    "/v1/partners/{partner_id}/statement",
    "Settlement statement of a partner",
    response=StatementView,
    action=Action.PARTNER_READ,
    problems=(400, 422),
)
async def get_partner_statement(request: web.Request) -> web.Response:
    """The partner's statement of the local days ``[from, to)`` of the tenant's time zone
    (query ``from=YYYY-MM-DD&to=YYYY-MM-DD``, ``to`` exclusive, at most 366 days): opening
    and closing ledger balance, the period's transfers by code, direction and source
    (opening + Σ lines = closing), the energy and milli of each of the partner's
    consumption rules in the billed intervals ending in the period, and the milli not yet
    posted. ``?format=csv`` or ``Accept: text/csv`` answers the same figures as CSV
    (``?format=json`` forces JSON)."""
    partner_id = int_id(request, "partner_id", "partner")
    query = request.rel_url.query
    unknown = sorted(set(query) - set(_STATEMENT_QUERY))
    if unknown:
        raise MalformedRequestError.one(unknown[0], "unknown query parameter (from, to, format)")
    for name in query:
        if len(query.getall(name)) > 1:
            raise MalformedRequestError.one(name, "given more than once")
    first, end = _date_of(query, "from"), _date_of(query, "to")
    fmt = query.get("format")
    if fmt not in (None, "json", "csv"):
        raise MalformedRequestError.one("format", "must be json or csv")
    as_csv = fmt == "csv" or (fmt is None and wants_csv(request.headers.get("Accept", "")))
    view = await request.app[SETTLEMENT].statement(call_of(request), partner_id, first, end)
    if not as_csv:
        return respond(view)
    filename = f"statement-partner-{view.partner_id}-{view.period_from}-{view.period_to}.csv"
    return web.Response(
        text=statement_csv(view),
        content_type=CSV_MEDIA_TYPE,
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# ---------------------------------------------------------------- wiring


async def _services(app: web.Application) -> AsyncIterator[None]:
    db = app[DATABASE]
    app[SPLIT_RULES] = SplitRuleService(db)
    app[SETTLEMENT] = SettlementService(db)
    yield


def setup(app: web.Application) -> None:
    """Build the split-rule and settlement services with the application (after the database)."""
    app.cleanup_ctx.append(_services)
