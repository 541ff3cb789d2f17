"""Provisioning use cases: tenants, resellers, partners, tariffs, customers, accounts, meters.

Each method is one unit of work: it checks the caller's permission (403), reads what it
refers to through the scoped repositories (another tenant's id is 404, exactly like a
missing one), writes, and appends its audit row in the same transaction. Slow work that
needs no lock — argon2 hashing, Ed25519 signing — runs in a worker thread, and hashing
happens before the write transaction opens so SQLite's single writer is never held by it.

**Publishing a tariff** creates its next version (``version`` counts per tariff code,
``wire_id`` is the tenant-unique u32 ``tariff_id`` meters see, SPEC.md §2.3) and, in the
same transaction, one signed tariff message per meter whose supply account is on that
code: each takes the meter's next ``msg_id`` (row-locked increment) and goes into the
``tokens`` outbox as ``PENDING`` for the dispatcher to deliver (DESIGN §6: nothing is
published inside the transaction). Attaching a meter queues the current version of its
account's tariff the same way, so a new meter learns its prices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import secrets
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Generic, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.engine import Database
from backend.adapters.db.repos import Repositories, ScopedRepository, open_ledger_account
from backend.adapters.db.tables import (
    AuditRow,
    CustomerRow,
    GatewayRow,
    MeterRow,
    PartnerRow,
    ResellerRow,
    SupplyAccountRow,
    TariffRow,
    TenantRow,
    TokenRow,
)
from backend.domain.auth import Action, Scope
from backend.domain.fields import ID, MAX_INT64, NAME, Doc, Range, Text
from backend.domain.ledger import AccountCode
from backend.service.auth import EMAIL, PASSWORD, AuthService, normalise_email
from backend.service.context import Call, Page, PageRequest, audit, require
from backend.service.refusals import ConflictError, InvalidInputError, NotFoundError
from firmware_protocol import messages
from firmware_protocol.errors import ProtocolError
from firmware_protocol.tariff import Tariff, tariff_from_dict, tariff_to_dict
from firmware_protocol.units import CURRENCIES

U32_MAX: Final = 2**32 - 1
#: MQTT user names the broker's ACL reserves for the backend (systemd/voltcredit.acl).
RESERVED_GATEWAY_IDS: Final = frozenset({"backend"})
GATEWAY_ID: Final = Text(1, 64, r"[A-Za-z0-9_-]+")
TARIFF_CODE: Final = Text(1, 64, r"[A-Za-z0-9._-]+")
MONEY: Final = Range(0, MAX_INT64)

RowT = TypeVar("RowT")
ViewT = TypeVar("ViewT")


class SignerSource(Protocol):
    """Where signed messages get their key: :class:`backend.keys.store.KeyStore` fits."""

    def active_signer(self) -> messages.Signer: ...


class PartnerKind(enum.StrEnum):
    """Who a partner is; all hold a PARTNER ledger account (what they are owed)."""

    UTILITY = "UTILITY"
    GRID_OPERATOR = "GRID_OPERATOR"
    RESELLER = "RESELLER"
    TAX_AUTHORITY = "TAX_AUTHORITY"
    PAYMENT_FEE = "PAYMENT_FEE"
    OTHER = "OTHER"


# ============================================================================ commands


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTenant:
    """A utility."""

    name: Annotated[str, NAME, Doc("unique across the platform", "Kisumu Power")]
    currency: Annotated[str, Text(3, 3, "[A-Z]{3}"), Doc("ISO 4217 code", "KES")]
    timezone: Annotated[str, Text(1, 64), Doc("IANA time zone", "Africa/Nairobi")]
    min_topup_minor: Annotated[int, Range(1), Doc("smallest top-up, minor units")]
    max_topup_minor: Annotated[int, Range(1), Doc("largest top-up, minor units")]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewReseller:
    """A reseller in the caller's tenant."""

    name: Annotated[str, NAME, Doc("unique in the tenant")]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewPartner:
    """Someone who earns a share of the money."""

    name: Annotated[str, NAME, Doc("unique in the tenant")]
    kind: PartnerKind
    reseller_id: Annotated[int | None, ID, Doc("the reseller this partner is, if any")] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTariff:
    """The next version of a tariff code, in the firmware_protocol tariff form."""

    code: Annotated[str, TARIFF_CODE, Doc("tariff code; versions count per code", "domestic")]
    activation_at: Annotated[datetime, Doc("when meters switch to it (RFC 3339)")]
    tariff: Annotated[
        dict[str, Any],
        Doc(
            "firmware_protocol tariff dict without tariff_id (the server assigns it): "
            "currency, timezone, bands, weekday[, weekend, holiday, "
            "standing_charge_milli_per_day, holidays, blocks]"
        ),
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewCustomer:
    """A customer who logs in to the app."""

    name: Annotated[str, NAME]
    email: Annotated[str, EMAIL, Doc("login; unique in the tenant, case-insensitive")]
    password: Annotated[str, PASSWORD, Doc("10..1024 characters; stored as argon2id")]
    reseller_id: Annotated[
        int | None, ID, Doc("selling reseller (a RESELLER key always sells its own)")
    ] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewSupplyAccount:
    """A supply point's prepaid account for one of the caller's customers."""

    customer_id: Annotated[int, ID]
    tariff_code: Annotated[str, TARIFF_CODE, Doc("a published tariff code")]
    label: Annotated[str, NAME, Doc("e.g. the address of the supply point")]
    debt_limit_minor: Annotated[int, MONEY, Doc("how far credit may go below zero")] = 0
    low_credit_minor: Annotated[int, MONEY, Doc("low-credit alert threshold")] = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class NewGateway:
    """A gateway; its id is also its MQTT user name."""

    id: Annotated[str, GATEWAY_ID, Doc("[A-Za-z0-9_-]{1,64}, unique platform-wide", "site-7")]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewMeter:
    """Attach a meter to a gateway and a supply account."""

    serial: Annotated[int, Range(1, MAX_INT64), Doc("meter serial number (its meter id)")]
    gateway_id: Annotated[str, GATEWAY_ID]
    supply_account_id: Annotated[int, ID]
    modbus_unit: Annotated[int | None, Range(1, 247), Doc("Modbus unit id, if polled so")] = None


# ============================================================================ views


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantView:
    """A utility."""

    id: int
    name: str
    currency: str
    timezone: str
    min_topup_minor: int
    max_topup_minor: int
    clearing_account_id: Annotated[int, Doc("CLEARING ledger account of payments in flight")]
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ResellerView:
    """A reseller."""

    id: int
    tenant_id: int
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class PartnerView:
    """A partner and its ledger account."""

    id: int
    tenant_id: int
    reseller_id: int | None
    name: str
    kind: PartnerKind
    ledger_account_id: int
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class TariffView:
    """One version of a tariff."""

    id: int
    tenant_id: int
    code: str
    version: int
    tariff_id: Annotated[int, Doc("the u32 id meters see (tenant-unique)")]
    activation_at: datetime
    tariff: Annotated[dict[str, Any], Doc("firmware_protocol tariff dict")]
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class TariffPublished(TariffView):
    """A new tariff version and how many signed messages were queued for meters."""

    messages_queued: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerView:
    """A customer (never the password hash)."""

    id: int
    tenant_id: int
    reseller_id: int | None
    name: str
    email: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SupplyAccountView:
    """A supply account and its PREPAID ledger account."""

    id: int
    tenant_id: int
    reseller_id: int | None
    customer_id: int
    ledger_account_id: int
    tariff_code: str
    label: str
    debt_limit_minor: int
    low_credit_minor: int
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayView:
    """A gateway and what it last said about itself."""

    id: str
    tenant_id: int
    mqtt_username: str
    online: bool
    boot_seq: int
    state_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayCreated(GatewayView):
    """A new gateway with its MQTT password: shown this once, stored only as argon2id."""

    mqtt_password: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterView:
    """A meter, where it hangs and its message counter."""

    serial: int
    tenant_id: int
    gateway_id: str
    supply_account_id: int
    modbus_unit: int | None
    next_msg_id: int
    last_credit_milli: int | None
    last_reading_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterAttached(MeterView):
    """A new meter and how many signed messages (its tariff) were queued for it."""

    messages_queued: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditView:
    """One audit-log entry."""

    id: int
    at: datetime
    tenant_id: int | None
    actor: str
    action: str
    target: str
    request_id: str
    detail: dict[str, Any]


def _view(cls: type[ViewT], row: object, **extra: object) -> ViewT:
    """A view from the row's same-named columns (views never carry secrets they lack)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]  # type: ignore[arg-type]
    values: dict[str, object] = {name: getattr(row, name) for name in names}
    return cls(**values, **extra)


def tenant_view(row: TenantRow) -> TenantView:
    return _view(TenantView, row)


def reseller_view(row: ResellerRow) -> ResellerView:
    return _view(ResellerView, row)


def partner_view(row: PartnerRow) -> PartnerView:
    return _view(PartnerView, row, kind=PartnerKind(row.kind))


def tariff_view(row: TariffRow) -> TariffView:
    return _view(TariffView, row, tariff_id=row.wire_id, tariff=dict(row.body))


def customer_view(row: CustomerRow) -> CustomerView:
    return _view(CustomerView, row)


def supply_account_view(row: SupplyAccountRow) -> SupplyAccountView:
    return _view(SupplyAccountView, row)


def gateway_view(row: GatewayRow) -> GatewayView:
    return _view(GatewayView, row)


def meter_view(row: MeterRow) -> MeterView:
    return _view(MeterView, row, serial=row.id)


def audit_view(row: AuditRow) -> AuditView:
    return _view(AuditView, row, detail=dict(row.detail))


# ============================================================================ service


class Provisioning:
    """The provisioning use cases over one database."""

    def __init__(
        self,
        db: Database,
        *,
        auth: AuthService,
        signers: SignerSource,
        tariff_message_ttl_s: int,
    ) -> None:
        self._db = db
        self._auth = auth
        self._signers = signers
        self._ttl_s = tariff_message_ttl_s

    # ---------------------------------------------------------------- reads

    async def _get(self, call: Call, kind: _Kind[ViewT], key: object) -> ViewT:
        require(call, kind.action)
        async with self._db.read() as session:
            row = await kind.repo(Repositories(session)).get(call.scope, key)
        if row is None:
            raise NotFoundError(f"{kind.what} {key} not found")
        return kind.view(row)

    async def _list(self, call: Call, kind: _Kind[ViewT], page: PageRequest) -> Page[ViewT]:
        require(call, kind.action)
        async with self._db.read() as session:
            found = await kind.repo(Repositories(session)).list(
                call.scope, limit=page.limit, after=page.after
            )
        return Page(items=[kind.view(r) for r in found.rows], next_after=found.next_after)

    async def get_tenant(self, call: Call, tenant_id: int) -> TenantView:
        return await self._get(call, _TENANTS, tenant_id)

    async def list_tenants(self, call: Call, page: PageRequest) -> Page[TenantView]:
        return await self._list(call, _TENANTS, page)

    async def get_reseller(self, call: Call, reseller_id: int) -> ResellerView:
        return await self._get(call, _RESELLERS, reseller_id)

    async def list_resellers(self, call: Call, page: PageRequest) -> Page[ResellerView]:
        return await self._list(call, _RESELLERS, page)

    async def get_partner(self, call: Call, partner_id: int) -> PartnerView:
        return await self._get(call, _PARTNERS, partner_id)

    async def list_partners(self, call: Call, page: PageRequest) -> Page[PartnerView]:
        return await self._list(call, _PARTNERS, page)

    async def get_tariff(self, call: Call, tariff_row_id: int) -> TariffView:
        return await self._get(call, _TARIFFS, tariff_row_id)

    async def list_tariffs(self, call: Call, page: PageRequest) -> Page[TariffView]:
        return await self._list(call, _TARIFFS, page)

    async def get_customer(self, call: Call, customer_id: int) -> CustomerView:
        return await self._get(call, _CUSTOMERS, customer_id)

    async def list_customers(self, call: Call, page: PageRequest) -> Page[CustomerView]:
        return await self._list(call, _CUSTOMERS, page)

    async def get_supply_account(self, call: Call, account_id: int) -> SupplyAccountView:
        return await self._get(call, _ACCOUNTS, account_id)

    async def list_supply_accounts(self, call: Call, page: PageRequest) -> Page[SupplyAccountView]:
        return await self._list(call, _ACCOUNTS, page)

    async def get_gateway(self, call: Call, gateway_id: str) -> GatewayView:
        return await self._get(call, _GATEWAYS, gateway_id)

    async def list_gateways(self, call: Call, page: PageRequest) -> Page[GatewayView]:
        return await self._list(call, _GATEWAYS, page)

    async def get_meter(self, call: Call, serial: int) -> MeterView:
        return await self._get(call, _METERS, serial)

    async def list_meters(self, call: Call, page: PageRequest) -> Page[MeterView]:
        return await self._list(call, _METERS, page)

    async def list_audit(self, call: Call, page: PageRequest) -> Page[AuditView]:
        return await self._list(call, _AUDIT, page)

    # ---------------------------------------------------------------- tenants

    async def create_tenant(self, call: Call, new: NewTenant) -> TenantView:
        """A utility with its CLEARING ledger account (platform admins only)."""
        require(call, Action.TENANT_CREATE)
        if new.currency not in CURRENCIES:
            raise InvalidInputError.one(
                "currency", f"unknown currency (known: {', '.join(sorted(CURRENCIES))})"
            )
        _check_zone("timezone", new.timezone)
        if new.max_topup_minor < new.min_topup_minor:
            raise InvalidInputError.one("max_topup_minor", "must be >= min_topup_minor")
        async with self._db.write() as session:
            repos = Repositories(session)
            if await repos.tenants.exists(call.scope, TenantRow.name == new.name):
                raise ConflictError(f"a tenant named {new.name!r} already exists")
            clearing = await _open_account(session, new.currency, AccountCode.CLEARING, None)
            row = TenantRow(
                name=new.name,
                currency=new.currency,
                timezone=new.timezone,
                min_topup_minor=new.min_topup_minor,
                max_topup_minor=new.max_topup_minor,
                clearing_account_id=clearing,
                created_at=call.now,
            )
            await repos.tenants.add(call.scope, row)
            await audit(
                repos,
                call,
                action=Action.TENANT_CREATE,
                target=f"tenant:{row.id}",
                tenant_id=row.id,
                detail={"name": new.name, "currency": new.currency},
            )
        return tenant_view(row)

    # ---------------------------------------------------------------- resellers, partners

    async def create_reseller(self, call: Call, new: NewReseller) -> ResellerView:
        """A reseller in the caller's tenant."""
        require(call, Action.RESELLER_CREATE)
        tenant_id = _tenant_of(call.scope)
        async with self._db.write() as session:
            repos = Repositories(session)
            if await repos.resellers.exists(call.scope, ResellerRow.name == new.name):
                raise ConflictError(f"a reseller named {new.name!r} already exists")
            row = ResellerRow(tenant_id=tenant_id, name=new.name, created_at=call.now)
            await repos.resellers.add(call.scope, row)
            await audit(
                repos,
                call,
                action=Action.RESELLER_CREATE,
                target=f"reseller:{row.id}",
                tenant_id=tenant_id,
                detail={"name": new.name},
            )
        return reseller_view(row)

    async def create_partner(self, call: Call, new: NewPartner) -> PartnerView:
        """A partner with its PARTNER ledger account (only the utility's may run negative)."""
        require(call, Action.PARTNER_CREATE)
        tenant_id = _tenant_of(call.scope)
        async with self._db.write() as session:
            repos = Repositories(session)
            tenant = await _own_tenant(repos, call.scope)
            if new.reseller_id is not None and not await repos.resellers.get(
                call.scope, new.reseller_id
            ):
                raise NotFoundError(f"reseller {new.reseller_id} not found")
            if await repos.partners.exists(call.scope, PartnerRow.name == new.name):
                raise ConflictError(f"a partner named {new.name!r} already exists")
            # The utility pays per-top-up commissions before consumption revenue reaches
            # it, so its account may run negative; every other partner is only ever paid.
            limit = None if new.kind is PartnerKind.UTILITY else 0
            account = await _open_account(session, tenant.currency, AccountCode.PARTNER, limit)
            row = PartnerRow(
                tenant_id=tenant_id,
                reseller_id=new.reseller_id,
                name=new.name,
                kind=new.kind.value,
                ledger_account_id=account,
                created_at=call.now,
            )
            await repos.partners.add(call.scope, row)
            await audit(
                repos,
                call,
                action=Action.PARTNER_CREATE,
                target=f"partner:{row.id}",
                tenant_id=tenant_id,
                detail={"name": new.name, "kind": new.kind.value},
            )
        return partner_view(row)

    # ---------------------------------------------------------------- tariffs

    async def publish_tariff(self, call: Call, new: NewTariff) -> TariffPublished:
        """The next version of ``new.code``, and a signed message for each affected meter."""
        require(call, Action.TARIFF_PUBLISH)
        tenant_id = _tenant_of(call.scope)
        if "tariff_id" in new.tariff:
            raise InvalidInputError.one(
                "tariff.tariff_id", "is assigned by the server: leave it out"
            )
        draft = _parse_tariff({**new.tariff, "tariff_id": 1})
        activation = _u32_time("activation_at", new.activation_at)
        async with self._db.write() as session:
            repos = Repositories(session)
            # The tenant's row lock serialises publications: version and wire id are max+1.
            tenant = await _own_tenant(repos, call.scope, lock=True)
            if draft.currency.code != tenant.currency:
                raise InvalidInputError.one(
                    "tariff.currency", f"must be the tenant's currency {tenant.currency}"
                )
            version, wire_id = await repos.tariffs.next_numbers(call.scope, tenant_id, new.code)
            if wire_id > U32_MAX:  # pragma: no cover - four billion tariff versions
                raise ConflictError("this tenant has used every u32 tariff id")
            tariff = dataclasses.replace(draft, tariff_id=wire_id)
            row = TariffRow(
                tenant_id=tenant_id,
                code=new.code,
                version=version,
                wire_id=wire_id,
                body=tariff_to_dict(tariff),
                activation_at=new.activation_at,
                created_at=call.now,
            )
            await repos.tariffs.add(call.scope, row)
            serials = await repos.meters.on_tariff(call.scope, new.code)
            queued = await self._queue_tariff(
                repos,
                call,
                tenant_id=tenant_id,
                serials=serials,
                tariff=tariff,
                activation=activation,
            )
            await audit(
                repos,
                call,
                action=Action.TARIFF_PUBLISH,
                target=f"tariff:{row.id}",
                tenant_id=tenant_id,
                detail={
                    "code": new.code,
                    "version": version,
                    "tariff_id": wire_id,
                    "messages_queued": queued,
                },
            )
        return _view(TariffPublished, tariff_view(row), messages_queued=queued)

    async def _queue_tariff(
        self,
        repos: Repositories,
        call: Call,
        *,
        tenant_id: int,
        serials: Sequence[int],
        tariff: Tariff,
        activation: int,
    ) -> int:
        """Sign ``tariff`` for each meter under its next msg id and add it to the outbox."""
        if not serials:
            return 0
        signer = self._signers.active_signer()
        issued = _u32_time("now", call.now)
        expires = issued + self._ttl_s
        if expires > U32_MAX:  # pragma: no cover - after 2106
            raise ConflictError("tariff message expiry beyond the u32 clock of SPEC.md §2.1")
        msg_ids = await repos.meters.allocate_msg_ids(call.scope, serials)
        spent = sorted(serial for serial, msg_id in msg_ids.items() if msg_id > U32_MAX)
        if spent:
            raise ConflictError(f"meters {spent} have used every u32 message id")

        def sign_all() -> list[tuple[int, int, bytes]]:
            return [
                (
                    serial,
                    msg_id,
                    messages.encode(
                        messages.TariffMessage(
                            messages.Header(
                                key_id=signer.key_id,
                                meter_id=serial,
                                msg_id=msg_id,
                                issued_at=issued,
                                expires_at=expires,
                            ),
                            tariff,
                            activation,
                        ),
                        signer,
                    ),
                )
                for serial, msg_id in sorted(msg_ids.items())
            ]

        # Ed25519 signing is CPU work: one thread hop for the batch keeps the loop free.
        signed = await asyncio.to_thread(sign_all)
        await repos.tokens.add_all(
            call.scope,
            [
                TokenRow(
                    tenant_id=tenant_id,
                    meter_id=serial,
                    msg_id=msg_id,
                    kind="TARIFF",
                    payment_id=None,
                    amount_minor=None,
                    message=message,
                    status="PENDING",
                    attempts=0,
                    next_attempt_at=call.now,
                    created_at=call.now,
                )
                for serial, msg_id, message in signed
            ],
        )
        return len(signed)

    # ---------------------------------------------------------------- customers, accounts

    async def create_customer(self, call: Call, new: NewCustomer) -> CustomerView:
        """A customer; a RESELLER's customers are always its own."""
        require(call, Action.CUSTOMER_CREATE)
        tenant_id = _tenant_of(call.scope)
        reseller_id = new.reseller_id
        if call.scope.reseller_id is not None:
            if reseller_id not in (None, call.scope.reseller_id):
                raise NotFoundError(f"reseller {reseller_id} not found")
            reseller_id = call.scope.reseller_id
        email = normalise_email(new.email)
        # Before the write transaction: argon2 takes tens of milliseconds on purpose.
        password_hash = await self._auth.hash_password(new.password)
        async with self._db.write() as session:
            repos = Repositories(session)
            if new.reseller_id is not None and not await repos.resellers.get(
                call.scope, new.reseller_id
            ):
                raise NotFoundError(f"reseller {new.reseller_id} not found")
            # E-mail is the login, unique in the tenant: this check is tenant-wide on purpose.
            if await repos.auth.customer(tenant_id, email) is not None:
                raise ConflictError("a customer with this e-mail already exists in the tenant")
            row = CustomerRow(
                tenant_id=tenant_id,
                reseller_id=reseller_id,
                name=new.name,
                email=email,
                password_hash=password_hash,
                created_at=call.now,
            )
            await repos.customers.add(call.scope, row)
            await audit(
                repos,
                call,
                action=Action.CUSTOMER_CREATE,
                target=f"customer:{row.id}",
                tenant_id=tenant_id,
                detail={"reseller_id": reseller_id},
            )
        return customer_view(row)

    async def create_supply_account(self, call: Call, new: NewSupplyAccount) -> SupplyAccountView:
        """A supply account with a PREPAID ledger account limited at ``-debt_limit``."""
        require(call, Action.SUPPLY_ACCOUNT_CREATE)
        tenant_id = _tenant_of(call.scope)
        async with self._db.write() as session:
            repos = Repositories(session)
            tenant = await _own_tenant(repos, call.scope)
            customer = await repos.customers.get(call.scope, new.customer_id)
            if customer is None:
                raise NotFoundError(f"customer {new.customer_id} not found")
            if await repos.tariffs.latest(call.scope, new.tariff_code) is None:
                raise InvalidInputError.one("tariff_code", "no tariff is published under this code")
            account = await _open_account(
                session, tenant.currency, AccountCode.PREPAID, -new.debt_limit_minor
            )
            row = SupplyAccountRow(
                tenant_id=tenant_id,
                reseller_id=customer.reseller_id,
                customer_id=customer.id,
                ledger_account_id=account,
                tariff_code=new.tariff_code,
                label=new.label,
                debt_limit_minor=new.debt_limit_minor,
                low_credit_minor=new.low_credit_minor,
                created_at=call.now,
            )
            await repos.supply_accounts.add(call.scope, row)
            await audit(
                repos,
                call,
                action=Action.SUPPLY_ACCOUNT_CREATE,
                target=f"supply_account:{row.id}",
                tenant_id=tenant_id,
                detail={"customer_id": customer.id, "tariff_code": new.tariff_code},
            )
        return supply_account_view(row)

    # ---------------------------------------------------------------- gateways, meters

    async def create_gateway(self, call: Call, new: NewGateway) -> GatewayCreated:
        """A gateway and its MQTT credentials; the password is returned this once."""
        require(call, Action.GATEWAY_CREATE)
        tenant_id = _tenant_of(call.scope)
        if new.id.lower() in RESERVED_GATEWAY_IDS:
            raise InvalidInputError.one("id", f"{new.id!r} is reserved for the backend")
        password = secrets.token_urlsafe(24)
        password_hash = await self._auth.hash_password(password)
        async with self._db.write() as session:
            repos = Repositories(session)
            if await repos.unique.gateway_taken(new.id):
                raise ConflictError(f"gateway id {new.id!r} is taken")
            row = GatewayRow(
                id=new.id,
                tenant_id=tenant_id,
                mqtt_username=new.id,
                mqtt_password_hash=password_hash,
                online=False,
                boot_seq=0,
                state_at=None,
                created_at=call.now,
            )
            await repos.gateways.add(call.scope, row)
            await audit(
                repos,
                call,
                action=Action.GATEWAY_CREATE,
                target=f"gateway:{row.id}",
                tenant_id=tenant_id,
            )
        return _view(GatewayCreated, gateway_view(row), mqtt_password=password)

    async def attach_meter(self, call: Call, new: NewMeter) -> MeterAttached:
        """A meter on a gateway and a supply account; its current tariff is queued for it."""
        require(call, Action.METER_CREATE)
        tenant_id = _tenant_of(call.scope)
        async with self._db.write() as session:
            repos = Repositories(session)
            if await repos.gateways.get(call.scope, new.gateway_id) is None:
                raise NotFoundError(f"gateway {new.gateway_id} not found")
            account = await repos.supply_accounts.get(call.scope, new.supply_account_id)
            if account is None:
                raise NotFoundError(f"supply account {new.supply_account_id} not found")
            if await repos.meters.exists(
                call.scope, MeterRow.supply_account_id == new.supply_account_id
            ):
                raise ConflictError(f"supply account {account.id} already has a meter")
            if await repos.unique.meter_taken(new.serial):
                raise ConflictError(f"meter serial {new.serial} is taken")
            row = MeterRow(
                id=new.serial,
                tenant_id=tenant_id,
                gateway_id=new.gateway_id,
                supply_account_id=account.id,
                modbus_unit=new.modbus_unit,
                next_msg_id=1,
                last_credit_milli=None,
                last_reading_at=None,
                created_at=call.now,
            )
            await repos.meters.add(call.scope, row)
            queued = 0
            current = await repos.tariffs.latest(call.scope, account.tariff_code)
            if current is not None:
                tariff = tariff_from_dict(current.body)
                activation = _u32_time("activation_at", current.activation_at)
                queued = await self._queue_tariff(
                    repos,
                    call,
                    tenant_id=tenant_id,
                    serials=[row.id],
                    tariff=tariff,
                    activation=activation,
                )
                await session.refresh(row, ["next_msg_id"])
            await audit(
                repos,
                call,
                action=Action.METER_CREATE,
                target=f"meter:{row.id}",
                tenant_id=tenant_id,
                detail={
                    "gateway_id": new.gateway_id,
                    "supply_account_id": account.id,
                    "messages_queued": queued,
                },
            )
        return _view(MeterAttached, meter_view(row), messages_queued=queued)


# ============================================================================ helpers


@dataclass(frozen=True, slots=True)
class _Kind(Generic[ViewT]):
    """How to read one kind of resource: permission, repository, name, view."""

    action: Action
    repo: Callable[[Repositories], ScopedRepository[Any]]
    what: str
    view: Callable[[Any], ViewT]


_TENANTS: Final = _Kind(Action.TENANT_READ, lambda r: r.tenants, "tenant", tenant_view)
_RESELLERS: Final = _Kind(Action.RESELLER_READ, lambda r: r.resellers, "reseller", reseller_view)
_PARTNERS: Final = _Kind(Action.PARTNER_READ, lambda r: r.partners, "partner", partner_view)
_TARIFFS: Final = _Kind(Action.TARIFF_READ, lambda r: r.tariffs, "tariff", tariff_view)
_CUSTOMERS: Final = _Kind(Action.CUSTOMER_READ, lambda r: r.customers, "customer", customer_view)
_ACCOUNTS: Final = _Kind(
    Action.SUPPLY_ACCOUNT_READ, lambda r: r.supply_accounts, "supply account", supply_account_view
)
_GATEWAYS: Final = _Kind(Action.GATEWAY_READ, lambda r: r.gateways, "gateway", gateway_view)
_METERS: Final = _Kind(Action.METER_READ, lambda r: r.meters, "meter", meter_view)
_AUDIT: Final = _Kind(Action.AUDIT_READ, lambda r: r.audit, "audit entry", audit_view)


def _tenant_of(scope: Scope) -> int:
    # Every tenant-level action is denied to PLATFORM_ADMIN by the permission table, so
    # a scope reaching here has a tenant; fail loudly if that ever changes.
    if scope.tenant_id is None:  # pragma: no cover - guarded by PERMISSIONS
        raise NotFoundError("this action needs a tenant-scoped caller")
    return scope.tenant_id


async def _own_tenant(repos: Repositories, scope: Scope, *, lock: bool = False) -> TenantRow:
    tenant = await repos.tenants.get(scope, _tenant_of(scope), lock=lock)
    if tenant is None:  # pragma: no cover - a key's tenant cannot be deleted
        raise NotFoundError(f"tenant {scope.tenant_id} not found")
    return tenant


async def _open_account(
    session: AsyncSession, currency: str, code: AccountCode, min_balance: int | None
) -> int:
    return await open_ledger_account(session, currency=currency, code=code, min_balance=min_balance)


def _check_zone(field: str, name: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInputError.one(field, f"unknown IANA time zone {name!r}") from exc


def _parse_tariff(body: dict[str, Any]) -> Tariff:
    try:
        return tariff_from_dict(body)
    except ProtocolError as exc:
        raise InvalidInputError.one("tariff", str(exc)) from exc


def _u32_time(field: str, when: datetime) -> int:
    seconds = int(when.timestamp())
    if not 0 <= seconds <= U32_MAX:
        raise InvalidInputError.one(field, "must fall between 1970 and 2106 (u32 seconds)")
    return seconds


__all__ = [
    "AuditView",
    "CustomerView",
    "GatewayCreated",
    "GatewayView",
    "MeterAttached",
    "MeterView",
    "NewCustomer",
    "NewGateway",
    "NewMeter",
    "NewPartner",
    "NewReseller",
    "NewSupplyAccount",
    "NewTariff",
    "NewTenant",
    "PartnerKind",
    "PartnerView",
    "Provisioning",
    "ResellerView",
    "SignerSource",
    "SupplyAccountView",
    "TariffPublished",
    "TariffView",
    "TenantView",
]
