"""Routes of who is who: tenants, resellers, partners, customers, supply accounts, audit log."""

from __future__ import annotations

from aiohttp import web

from backend.api.context import PROVISIONING, body, call_of, int_id, page_of, respond
from backend.api.registry import ListOf, RouteTable
from backend.domain.auth import Action
from backend.service.provisioning import (
    AuditView,
    CustomerView,
    NewCustomer,
    NewPartner,
    NewReseller,
    NewSupplyAccount,
    NewTenant,
    PartnerView,
    ResellerView,
    SupplyAccountView,
    TenantView,
)

routes = RouteTable(
    "tenancy",
    "Utilities (tenants), their resellers and partners, customers and their supply accounts.",
)


# ---------------------------------------------------------------- tenants


@routes.post(
    "/v1/tenants",
    "Create a tenant",
    body=NewTenant,
    response=TenantView,
    status=201,
    action=Action.TENANT_CREATE,
    problems=(409,),
)
async def create_tenant(request: web.Request) -> web.Response:
    """Create a utility and its CLEARING ledger account (platform admins)."""
    new = await body(request, NewTenant)
    view = await request.app[PROVISIONING].create_tenant(call_of(request), new)
    return respond(view, status=201)


@routes.get("/v1/tenants", "List tenants", response=ListOf(TenantView), action=Action.TENANT_READ)
async def list_tenants(request: web.Request) -> web.Response:
    """All tenants for a platform admin; the caller's own tenant for everyone else."""
    return respond(await request.app[PROVISIONING].list_tenants(call_of(request), page_of(request)))


@routes.get(
    "/v1/tenants/{tenant_id}", "Show a tenant", response=TenantView, action=Action.TENANT_READ
)
async def get_tenant(request: web.Request) -> web.Response:
    """One tenant the caller may see."""
    tenant_id = int_id(request, "tenant_id", "tenant")
    return respond(await request.app[PROVISIONING].get_tenant(call_of(request), tenant_id))


# ---------------------------------------------------------------- resellers


@routes.post(
    "/v1/resellers",
    "Create a reseller",
    body=NewReseller,
    response=ResellerView,
    status=201,
    action=Action.RESELLER_CREATE,
    problems=(409,),
)
async def create_reseller(request: web.Request) -> web.Response:
    """Create a reseller in the caller's tenant."""
    new = await body(request, NewReseller)
    view = await request.app[PROVISIONING].create_reseller(call_of(request), new)
    return respond(view, status=201)


@routes.get(
    "/v1/resellers",
    "List resellers",
    response=ListOf(ResellerView),
    action=Action.RESELLER_READ,
)
async def list_resellers(request: web.Request) -> web.Response:
    """The tenant's resellers (a reseller sees itself)."""
    return respond(
        await request.app[PROVISIONING].list_resellers(call_of(request), page_of(request))
    )


@routes.get(
    "/v1/resellers/{reseller_id}",
    "Show a reseller",
    response=ResellerView,
    action=Action.RESELLER_READ,
)
async def get_reseller(request: web.Request) -> web.Response:
    """One reseller the caller may see."""
    reseller_id = int_id(request, "reseller_id", "reseller")
    return respond(await request.app[PROVISIONING].get_reseller(call_of(request), reseller_id))


# ---------------------------------------------------------------- partners


@routes.post(
    "/v1/partners",
    "Create a partner",
    body=NewPartner,
    response=PartnerView,
    status=201,
    action=Action.PARTNER_CREATE,
    problems=(404, 409),
)
async def create_partner(request: web.Request) -> web.Response:
    """Create a partner (utility, grid operator, reseller, tax authority, fee) and its PARTNER
    ledger account."""
    new = await body(request, NewPartner)
    view = await request.app[PROVISIONING].create_partner(call_of(request), new)
    return respond(view, status=201)


@routes.get(
    "/v1/partners", "List partners", response=ListOf(PartnerView), action=Action.PARTNER_READ
)
async def list_partners(request: web.Request) -> web.Response:
    """The tenant's partners."""
    return respond(
        await request.app[PROVISIONING].list_partners(call_of(request), page_of(request))
    )


@routes.get(
    "/v1/partners/{partner_id}",
    "Show a partner",
    response=PartnerView,
    action=Action.PARTNER_READ,
)
async def get_partner(request: web.Request) -> web.Response:
    """One partner the caller may see."""
    partner_id = int_id(request, "partner_id", "partner")
    return respond(await request.app[PROVISIONING].get_partner(call_of(request), partner_id))


# ---------------------------------------------------------------- customers


@routes.post(
    "/v1/customers",
    "Create a customer",
    body=NewCustomer,
    response=CustomerView,
    status=201,
    action=Action.CUSTOMER_CREATE,
    problems=(404, 409),
)
async def create_customer(request: web.Request) -> web.Response:
    """Create a customer who can log in; a reseller's customers are always its own."""
    new = await body(request, NewCustomer)
    view = await request.app[PROVISIONING].create_customer(call_of(request), new)
    return respond(view, status=201)


@routes.get(
    "/v1/customers",
    "List customers",
    response=ListOf(CustomerView),
    action=Action.CUSTOMER_READ,
)
async def list_customers(request: web.Request) -> web.Response:
    """The customers the caller may see (a customer sees itself)."""
    return respond(
        await request.app[PROVISIONING].list_customers(call_of(request), page_of(request))
    )


@routes.get(
    "/v1/customers/{customer_id}",
    "Show a customer",
    response=CustomerView,
    action=Action.CUSTOMER_READ,
)
async def get_customer(request: web.Request) -> web.Response:
    """One customer the caller may see."""
    customer_id = int_id(request, "customer_id", "customer")
    return respond(await request.app[PROVISIONING].get_customer(call_of(request), customer_id))


# ---------------------------------------------------------------- supply accounts


@routes.post(
    "/v1/supply-accounts",
    "Create a supply account",
    body=NewSupplyAccount,
    response=SupplyAccountView,
    status=201,
    action=Action.SUPPLY_ACCOUNT_CREATE,
    problems=(404,),
)
async def create_supply_account(request: web.Request) -> web.Response:
    """Create a supply account for a customer, with a PREPAID ledger account that may go
    ``debt_limit_minor`` below zero."""
    new = await body(request, NewSupplyAccount)
    view = await request.app[PROVISIONING].create_supply_account(call_of(request), new)
    return respond(view, status=201)


@routes.get(
    "/v1/supply-accounts",
    "List supply accounts",
    response=ListOf(SupplyAccountView),
    action=Action.SUPPLY_ACCOUNT_READ,
)
async def list_supply_accounts(request: web.Request) -> web.Response:
    """The supply accounts the caller may see (a customer sees its own)."""
    return respond(
        await request.app[PROVISIONING].list_supply_accounts(call_of(request), page_of(request))
    )


@routes.get(
    "/v1/supply-accounts/{account_id}",
    "Show a supply account",
    response=SupplyAccountView,
    action=Action.SUPPLY_ACCOUNT_READ,
)
async def get_supply_account(request: web.Request) -> web.Response:
    """One supply account the caller may see."""
    account_id = int_id(request, "account_id", "supply account")
    view = await request.app[PROVISIONING].get_supply_account(call_of(request), account_id)
    return respond(view)


# ---------------------------------------------------------------- audit


@routes.get("/v1/audit", "Read the audit log", response=ListOf(AuditView), action=Action.AUDIT_READ)
async def list_audit(request: web.Request) -> web.Response:
    """Every state-changing call, oldest first: who, what, when, request id."""
    return respond(await request.app[PROVISIONING].list_audit(call_of(request), page_of(request)))
