"""Who may do what (pure): roles, actions, the permission table, scopes and the API-key format.

Tenants are utilities; resellers sit under a utility; customers under either (DESIGN §7).
A caller's :class:`Scope` says which of them it acts as; every repository query adds the
scope's WHERE clauses itself, so a handler cannot forget them. The permission table
below is the whole policy: which :class:`Action` each :class:`Role` may take at all.
*Which rows* it may take them on is the scope's business, not the table's.

Roles:

- ``PLATFORM_ADMIN`` (API key, no tenant): creates tenants and their first keys; reads
  the audit log of all tenants. It does not provision inside tenants — that is the
  utility's job, done with the utility's own key.
- ``UTILITY_ADMIN`` (API key, one tenant): everything inside its tenant.
- ``RESELLER`` (API key, one tenant and one reseller): creates and reads its own
  customers and their supply accounts, tops them up; reads its tenant's tariffs.
- ``SUPPORT`` (API key, one tenant): reads everything in its tenant except API keys.
- ``CUSTOMER`` (login, short-lived bearer token): reads its own record, supply accounts,
  meters and its tenant's tariffs; tops up its own accounts.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


class Role(enum.StrEnum):
    """What kind of caller; stored by name in ``api_keys.role``."""

    PLATFORM_ADMIN = "PLATFORM_ADMIN"
    UTILITY_ADMIN = "UTILITY_ADMIN"
    RESELLER = "RESELLER"
    SUPPORT = "SUPPORT"
    CUSTOMER = "CUSTOMER"


class Action(enum.StrEnum):
    """Everything a caller can ask for; a use case checks its action before anything else."""

    TENANT_CREATE = "tenant.create"
    TENANT_READ = "tenant.read"
    API_KEY_CREATE = "api_key.create"
    API_KEY_READ = "api_key.read"
    API_KEY_REVOKE = "api_key.revoke"
    RESELLER_CREATE = "reseller.create"
    RESELLER_READ = "reseller.read"
    PARTNER_CREATE = "partner.create"
    PARTNER_READ = "partner.read"
    TARIFF_PUBLISH = "tariff.publish"
    TARIFF_READ = "tariff.read"
    CUSTOMER_CREATE = "customer.create"
    CUSTOMER_READ = "customer.read"
    SUPPLY_ACCOUNT_CREATE = "supply_account.create"
    SUPPLY_ACCOUNT_READ = "supply_account.read"
    GATEWAY_CREATE = "gateway.create"
    GATEWAY_READ = "gateway.read"
    METER_CREATE = "meter.create"
    METER_READ = "meter.read"
    TOPUP_CREATE = "topup.create"
    TOPUP_READ = "topup.read"
    AUDIT_READ = "audit.read"
    ALERT_READ = "alert.read"
    ALERT_RESOLVE = "alert.resolve"
    WEBHOOK_ENDPOINT_CREATE = "webhook_endpoint.create"
    WEBHOOK_ENDPOINT_READ = "webhook_endpoint.read"
    WEBHOOK_ENDPOINT_DELETE = "webhook_endpoint.delete"


_A = Action
#: The policy, as one table (house style rule 2). Rows a role may touch: see :class:`Scope`.
PERMISSIONS: Final[Mapping[Role, frozenset[Action]]] = {
    Role.PLATFORM_ADMIN: frozenset(
        {
            _A.TENANT_CREATE,
            _A.TENANT_READ,
            _A.API_KEY_CREATE,
            _A.API_KEY_READ,
            _A.API_KEY_REVOKE,
            _A.AUDIT_READ,
            _A.WEBHOOK_ENDPOINT_CREATE,
            _A.WEBHOOK_ENDPOINT_READ,
            _A.WEBHOOK_ENDPOINT_DELETE,
        }
    ),
    Role.UTILITY_ADMIN: frozenset(Action) - {_A.TENANT_CREATE},
    Role.RESELLER: frozenset(
        {
            _A.TENANT_READ,
            _A.RESELLER_READ,
            _A.TARIFF_READ,
            _A.CUSTOMER_CREATE,
            _A.CUSTOMER_READ,
            _A.SUPPLY_ACCOUNT_CREATE,
            _A.SUPPLY_ACCOUNT_READ,
            _A.METER_READ,
            _A.TOPUP_CREATE,
            _A.TOPUP_READ,
        }
    ),
    Role.SUPPORT: frozenset(
        {
            _A.TENANT_READ,
            _A.RESELLER_READ,
            _A.PARTNER_READ,
            _A.TARIFF_READ,
            _A.CUSTOMER_READ,
            _A.SUPPLY_ACCOUNT_READ,
            _A.GATEWAY_READ,
            _A.METER_READ,
            _A.TOPUP_READ,
            _A.AUDIT_READ,
            _A.ALERT_READ,
        }
    ),
    Role.CUSTOMER: frozenset(
        {
            _A.TENANT_READ,
            _A.TARIFF_READ,
            _A.CUSTOMER_READ,
            _A.SUPPLY_ACCOUNT_READ,
            _A.METER_READ,
            _A.TOPUP_CREATE,
            _A.TOPUP_READ,
        }
    ),
}

#: Which key roles a caller may create (no one escalates: a utility admin cannot mint a
#: platform admin, and CUSTOMER is a login, never an API key).
GRANTS: Final[Mapping[Role, frozenset[Role]]] = {
    Role.PLATFORM_ADMIN: frozenset(
        {Role.PLATFORM_ADMIN, Role.UTILITY_ADMIN, Role.RESELLER, Role.SUPPORT}
    ),
    Role.UTILITY_ADMIN: frozenset({Role.UTILITY_ADMIN, Role.RESELLER, Role.SUPPORT}),
    Role.RESELLER: frozenset(),
    Role.SUPPORT: frozenset(),
    Role.CUSTOMER: frozenset(),
}

#: Roles an API key can carry.
KEY_ROLES: Final = frozenset({Role.PLATFORM_ADMIN, Role.UTILITY_ADMIN, Role.RESELLER, Role.SUPPORT})


class ScopeError(ValueError):
    """A scope whose ids do not fit its role (a programming error, never a caller's)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Scope:
    """Who is calling and which rows it may see: the argument of every repository method.

    ``tenant_id`` is ``None`` only for ``PLATFORM_ADMIN``; ``reseller_id`` is set exactly
    for ``RESELLER``; ``customer_id`` exactly for ``CUSTOMER``. ``actor`` names the caller
    in the audit log (``api_key:12``, ``customer:7``, ``cli``, ``system``).
    """

    role: Role
    actor: str
    tenant_id: int | None = None
    reseller_id: int | None = None
    customer_id: int | None = None

    def __post_init__(self) -> None:
        platform = self.role is Role.PLATFORM_ADMIN
        if (self.tenant_id is None) != platform:
            raise ScopeError(f"{self.role}: tenant_id must be {'None' if platform else 'set'}")
        if (self.reseller_id is not None) != (self.role is Role.RESELLER):
            raise ScopeError(f"{self.role}: reseller_id is set exactly for RESELLER")
        if (self.customer_id is not None) != (self.role is Role.CUSTOMER):
            raise ScopeError(f"{self.role}: customer_id is set exactly for CUSTOMER")
        if not self.actor:
            raise ScopeError("a scope names its actor")

    def may(self, action: Action) -> bool:
        """Whether this caller's role may take ``action`` at all."""
        return action in PERMISSIONS[self.role]

    def may_grant(self, role: Role) -> bool:
        """Whether this caller may create an API key carrying ``role``."""
        return role in GRANTS[self.role]


# ---------------------------------------------------------------- API keys

#: Every API key starts with this, so a leaked key is recognisable (secret scanners).
API_KEY_MARK: Final = "vck_"
API_KEY_PREFIX_LEN: Final = 8
#: 32 random bytes in unpadded base64url (RFC 4648 §5).
API_KEY_SECRET_LEN: Final = 43
API_KEY_LEN: Final = len(API_KEY_MARK) + API_KEY_PREFIX_LEN + 1 + API_KEY_SECRET_LEN
_API_KEY: Final = re.compile(r"vck_(?P<prefix>[0-9a-f]{8})_(?P<secret>[A-Za-z0-9_-]{43})")


def format_api_key(prefix: str, secret: str) -> str:
    """``vck_<prefix>_<secret>``: the one string handed to the key's owner, once."""
    key = f"{API_KEY_MARK}{prefix}_{secret}"
    if parse_api_key(key) is None:
        raise ValueError("prefix must be 8 lower-case hex digits, secret 43 base64url characters")
    return key


def parse_api_key(text: str) -> tuple[str, str] | None:
    """``(prefix, secret)`` of a well-formed key, else ``None``.

    The secret's base64url alphabet contains ``_``, so the parts are found by position
    (fixed lengths), not by splitting on ``_``.
    """
    match = _API_KEY.fullmatch(text)
    return None if match is None else (match["prefix"], match["secret"])
