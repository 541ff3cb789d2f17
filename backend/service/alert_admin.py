"""Use cases of alerts and webhook endpoints for the API: list and resolve alerts, manage endpoints.

Each method is one unit of work: it checks the caller's permission (403), reads through
the scoped repositories (another tenant's alert or endpoint is 404, exactly like a missing
one), writes, and appends its audit row in the same transaction.

A webhook endpoint's secret is made here (``whsec_`` and 32 random bytes, base64url) and
returned once, by :meth:`AlertAdmin.create_endpoint`; the deliveries are signed with its
UTF-8 bytes as the HMAC key (:mod:`backend.service.notify`).
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from backend.adapters.db.alert_tables import AlertKind, AlertRow
from backend.adapters.db.alerting_repo import AlertRepository, WebhookEndpointRepository
from backend.adapters.db.engine import Database
from backend.adapters.db.notify_tables import WebhookEndpointRow
from backend.adapters.db.repos import Repositories
from backend.domain.auth import Action
from backend.domain.fields import ID, Doc, Items, Text
from backend.service.context import Call, Page, PageRequest, audit, require
from backend.service.refusals import ConflictError, InvalidInputError, NotFoundError

#: Endpoints a tenant may have at once (each alert is POSTed to each subscriber).
MAX_ENDPOINTS: Final = 16
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a prefix, not a secret
MAX_URL_LEN: Final = 2048


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a webhook endpoint, or ``None`` if it can."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("https", "http"):
        return "must be an https:// (or http://) URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs; the signature authenticates us instead.
        return "must not contain a user name or password"
    if parts.fragment:
        return "must not contain a #fragment"
    if port == 0:
        return "must not use port 0"
    if any(c.isspace() for c in url):
        return "must not contain white space"
    return None


# ============================================================================ commands, views


@dataclass(frozen=True, slots=True, kw_only=True)
class NewWebhookEndpoint:
    """Register a receiver of alert notifications."""

    url: Annotated[
        str,
        Text(1, MAX_URL_LEN),
        Doc("an https (or http) URL; notifications are POSTed to it"),
    ]
    kinds: Annotated[
        list[AlertKind],
        Items(1, len(AlertKind)),
        Doc("alert kinds to receive", ["LOW_CREDIT", "GATEWAY_OFFLINE"]),
    ]
    description: Annotated[str, Text(0, 200), Doc("what it is, for people")] = ""
    tenant_id: Annotated[int | None, ID, Doc("the tenant; platform admins only, required")] = None

    def __post_init__(self) -> None:
        problem = check_url(self.url)
        if problem is not None:
            raise InvalidInputError.one("url", problem)
        if len(set(self.kinds)) != len(self.kinds):
            raise InvalidInputError.one("kinds", "must not repeat a kind")


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookEndpointView:
    """A webhook endpoint without its secret."""

    id: int
    tenant_id: int
    url: str
    kinds: list[AlertKind]
    description: str
    created_at: datetime
    deleted_at: datetime | None

    @classmethod
    def of(cls, row: WebhookEndpointRow) -> WebhookEndpointView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            url=row.url,
            kinds=[AlertKind(k) for k in row.kinds],
            description=row.description,
            created_at=row.created_at,
            deleted_at=row.deleted_at,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookEndpointCreated(WebhookEndpointView):
    """A new endpoint with its signing secret: shown this once and never again."""

    secret: Annotated[
        str,
        Doc(
            "HMAC-SHA256 key (its UTF-8 bytes) of the Voltcredit-Signature header:"
            " t=<unix s>,v1=<hex HMAC of '<t>.<body>'>"
        ),
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertView:
    """An alert: what happened, to what, and whether someone has resolved it."""

    id: int
    tenant_id: int
    kind: AlertKind
    meter_id: int | None
    token_id: int | None
    payment_id: uuid.UUID | None
    detail: dict[str, Any]
    created_at: datetime
    resolved_at: datetime | None

    @classmethod
    def of(cls, row: AlertRow) -> AlertView:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            kind=AlertKind(row.kind),
            meter_id=row.meter_id,
            token_id=row.token_id,
            payment_id=row.payment_id,
            detail=dict(row.detail),
            created_at=row.created_at,
            resolved_at=row.resolved_at,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertFilter:
    """Which alerts a list shows: of one kind, open (unresolved) or resolved ones."""

    kind: AlertKind | None = None
    #: ``True``: unresolved only; ``False``: resolved only; ``None``: both.
    open: bool | None = None


# ============================================================================ service


class AlertAdmin:
    """Alerts and webhook endpoints over one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ---------------------------------------------------------------- alerts

    async def list_alerts(
        self, call: Call, page: PageRequest, where: AlertFilter | None = None
    ) -> Page[AlertView]:
        """The caller's tenant's alerts, oldest first, filtered."""
        require(call, Action.ALERT_READ)
        where = where or AlertFilter()
        after = page.after if isinstance(page.after, int) else None
        async with self._db.read() as session:
            found = await AlertRepository(session).list(
                call.scope, limit=page.limit, after=after, kind=where.kind, open_only=where.open
            )
        return Page(items=[AlertView.of(r) for r in found.rows], next_after=found.next_after)

    async def resolve_alert(self, call: Call, alert_id: int) -> AlertView:
        """Mark an alert resolved (the first time stays; resolving again is harmless)."""
        require(call, Action.ALERT_RESOLVE)
        async with self._db.write() as session:
            row = await AlertRepository(session).get(call.scope, alert_id, lock=True)
            if row is None:
                raise NotFoundError(f"alert {alert_id} not found")
            if row.resolved_at is None:
                row.resolved_at = call.now
                await audit(
                    Repositories(session),
                    call,
                    action=Action.ALERT_RESOLVE,
                    target=f"alert:{row.id}",
                    tenant_id=row.tenant_id,
                    detail={"kind": row.kind},
                )
        return AlertView.of(row)

    # ---------------------------------------------------------------- endpoints

    async def create_endpoint(self, call: Call, new: NewWebhookEndpoint) -> WebhookEndpointCreated:
        """Register an endpoint in the caller's tenant (a platform admin names the tenant)."""
        require(call, Action.WEBHOOK_ENDPOINT_CREATE)
        scope = call.scope
        tenant_id = new.tenant_id if scope.tenant_id is None else scope.tenant_id
        if tenant_id is None:
            raise InvalidInputError.one("tenant_id", "is required for a platform admin")
        if new.tenant_id is not None and new.tenant_id != tenant_id:
            raise NotFoundError(f"tenant {new.tenant_id} not found")
        async with self._db.write() as session:
            repos = Repositories(session)
            if await repos.tenants.get(scope, tenant_id, lock=True) is None:
                raise NotFoundError(f"tenant {tenant_id} not found")
            endpoints = WebhookEndpointRepository(session)
            if await endpoints.count_active(tenant_id) >= MAX_ENDPOINTS:
                raise ConflictError(
                    f"tenant {tenant_id} has {MAX_ENDPOINTS} webhook endpoints; delete one first"
                )
            secret = SECRET_PREFIX + secrets.token_urlsafe(32)
            row = await endpoints.add(
                scope,
                WebhookEndpointRow(
                    tenant_id=tenant_id,
                    url=new.url,
                    secret=secret,
                    kinds=[k.value for k in new.kinds],
                    description=new.description,
                    created_at=call.now,
                ),
            )
            await audit(
                repos,
                call,
                action=Action.WEBHOOK_ENDPOINT_CREATE,
                target=f"webhook_endpoint:{row.id}",
                tenant_id=tenant_id,
                detail={"url": new.url, "kinds": row.kinds},
            )
        view = WebhookEndpointView.of(row)
        return WebhookEndpointCreated(
            id=view.id,
            tenant_id=view.tenant_id,
            url=view.url,
            kinds=view.kinds,
            description=view.description,
            created_at=view.created_at,
            deleted_at=view.deleted_at,
            secret=secret,
        )

    async def list_endpoints(self, call: Call, page: PageRequest) -> Page[WebhookEndpointView]:
        """The endpoints (not deleted) the caller may see, by id."""
        require(call, Action.WEBHOOK_ENDPOINT_READ)
        after = page.after if isinstance(page.after, int) else None
        async with self._db.read() as session:
            found = await WebhookEndpointRepository(session).list(
                call.scope, limit=page.limit, after=after
            )
        return Page(
            items=[WebhookEndpointView.of(r) for r in found.rows], next_after=found.next_after
        )

    async def get_endpoint(self, call: Call, endpoint_id: int) -> WebhookEndpointView:
        """One endpoint (a deleted one shows its ``deleted_at``)."""
        require(call, Action.WEBHOOK_ENDPOINT_READ)
        async with self._db.read() as session:
            row = await WebhookEndpointRepository(session).get(call.scope, endpoint_id)
        if row is None:
            raise NotFoundError(f"webhook endpoint {endpoint_id} not found")
        return WebhookEndpointView.of(row)

    async def delete_endpoint(self, call: Call, endpoint_id: int) -> WebhookEndpointView:
        """Stop notifying an endpoint: its undelivered notifications are cancelled.

        Deleting twice is harmless (the first time stays).
        """
        require(call, Action.WEBHOOK_ENDPOINT_DELETE)
        async with self._db.write() as session:
            endpoints = WebhookEndpointRepository(session)
            row = await endpoints.get(call.scope, endpoint_id, lock=True)
            if row is None:
                raise NotFoundError(f"webhook endpoint {endpoint_id} not found")
            if row.deleted_at is None:
                row.deleted_at = call.now
                cancelled = await endpoints.cancel_pending(row.id)
                await audit(
                    Repositories(session),
                    call,
                    action=Action.WEBHOOK_ENDPOINT_DELETE,
                    target=f"webhook_endpoint:{row.id}",
                    tenant_id=row.tenant_id,
                    detail={"url": row.url, "cancelled": cancelled},
                )
        return WebhookEndpointView.of(row)
