"""Roles and scopes (the permission table), the API-key format, customer bearer tokens."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from backend.adapters.db.engine import Database
from backend.domain.auth import (
    GRANTS,
    KEY_ROLES,
    PERMISSIONS,
    Action,
    Role,
    Scope,
    ScopeError,
    format_api_key,
    parse_api_key,
)
from backend.service.auth import AuthService
from backend.service.refusals import AuthenticationError
from tests.support.api import cheap_hasher

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def test_permission_table_is_least_privilege() -> None:
    reads = {a for a in Action if a.value.endswith(".read")}
    assert PERMISSIONS[Role.SUPPORT] <= reads  # support changes nothing
    assert Action.API_KEY_READ not in PERMISSIONS[Role.SUPPORT]
    assert PERMISSIONS[Role.UTILITY_ADMIN] == frozenset(Action) - {Action.TENANT_CREATE}
    assert Action.TENANT_CREATE in PERMISSIONS[Role.PLATFORM_ADMIN]
    assert Action.CUSTOMER_READ not in PERMISSIONS[Role.PLATFORM_ADMIN]
    for role in (Role.RESELLER, Role.CUSTOMER):
        assert not {a for a in PERMISSIONS[role] if a.value.startswith("api_key")}
        assert Action.GATEWAY_READ not in PERMISSIONS[role]
        assert Action.AUDIT_READ not in PERMISSIONS[role]
    assert Action.CUSTOMER_CREATE in PERMISSIONS[Role.RESELLER]
    assert Action.TOPUP_CREATE in PERMISSIONS[Role.CUSTOMER]
    assert all(role in PERMISSIONS and role in GRANTS for role in Role)


def test_no_role_grants_above_itself() -> None:
    assert GRANTS[Role.UTILITY_ADMIN] == {Role.UTILITY_ADMIN, Role.RESELLER, Role.SUPPORT}
    for role in (Role.RESELLER, Role.SUPPORT, Role.CUSTOMER):
        assert GRANTS[role] == frozenset()
    assert all(granted <= KEY_ROLES for granted in GRANTS.values())
    assert Role.CUSTOMER not in KEY_ROLES


@pytest.mark.parametrize(
    "fields",
    [
        {"role": Role.PLATFORM_ADMIN, "tenant_id": 1},
        {"role": Role.UTILITY_ADMIN},
        {"role": Role.UTILITY_ADMIN, "tenant_id": 1, "reseller_id": 2},
        {"role": Role.RESELLER, "tenant_id": 1},
        {"role": Role.SUPPORT, "tenant_id": 1, "customer_id": 3},
        {"role": Role.CUSTOMER, "tenant_id": 1},
        {"role": Role.CUSTOMER, "tenant_id": 1, "customer_id": 3, "actor": ""},
    ],
)
def test_a_scope_whose_ids_do_not_fit_its_role_is_a_bug(fields: dict[str, Any]) -> None:
    with pytest.raises(ScopeError):
        Scope(**{"actor": "test", **fields})


def test_scopes_that_fit() -> None:
    reseller = Scope(role=Role.RESELLER, actor="api_key:3", tenant_id=1, reseller_id=2)
    assert reseller.may(Action.CUSTOMER_CREATE)
    assert not reseller.may(Action.GATEWAY_CREATE)
    assert not reseller.may_grant(Role.SUPPORT)
    platform = Scope(role=Role.PLATFORM_ADMIN, actor="cli")
    assert platform.may_grant(Role.PLATFORM_ADMIN)


def test_api_key_format() -> None:
    secret = "a_b-" + "Z" * 39
    key = format_api_key("0123abcd", secret)
    assert key == f"vck_0123abcd_{secret}"
    assert parse_api_key(key) == ("0123abcd", secret)  # '_' inside the secret is fine
    for bad in (
        key + "x",
        key[:-1],
        key.replace("vck_", "vcx_"),
        "vck_0123ABCD_" + secret,
        "vck_0123abcd-" + secret,
        "vck_0123abcd_" + secret[:-1] + "=",
        "",
    ):
        assert parse_api_key(bad) is None, bad
    with pytest.raises(ValueError, match="8 lower-case hex"):
        format_api_key("xyz", secret)


def _service(secret: bytes | None = b"s" * 32) -> AuthService:
    # Customer tokens are checked without the database.
    return AuthService(
        cast("Database", None), token_secret=secret, customer_token_ttl_s=900, hasher=cheap_hasher()
    )


async def test_customer_tokens_verify_and_expire() -> None:
    auth = _service()
    issued = auth.issue_customer_token(7, 3, NOW)
    assert issued.expires_at == NOW + timedelta(minutes=15)
    scope = await auth.authenticate(f"Bearer {issued.token}", NOW + timedelta(seconds=899))
    assert scope == Scope(role=Role.CUSTOMER, actor="customer:7", tenant_id=3, customer_id=7)
    with pytest.raises(AuthenticationError, match="expired"):
        await auth.authenticate(f"Bearer {issued.token}", NOW + timedelta(seconds=900))


async def test_customer_tokens_of_another_secret_or_tampered_are_refused() -> None:
    token = _service().issue_customer_token(7, 3, NOW).token
    with pytest.raises(AuthenticationError, match="invalid customer token"):
        await _service(b"x" * 32).authenticate(f"Bearer {token}", NOW)
    payload, mac = token.removeprefix("vcc_").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = 8  # become another customer, keep the MAC
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for bad in (f"vcc_{forged}.{mac}", token + "A", token.replace(".", ""), "vcc_%%.%%"):
        with pytest.raises(AuthenticationError):
            await _service().authenticate(f"Bearer {bad}", NOW)


async def test_without_a_configured_secret_each_process_draws_its_own() -> None:
    first, second = _service(None), _service(None)
    token = first.issue_customer_token(1, 1, NOW).token
    assert (await first.authenticate(f"Bearer {token}", NOW)).customer_id == 1
    with pytest.raises(AuthenticationError):
        await second.authenticate(f"Bearer {token}", NOW)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Token abc", "Bearer vck_nope"])
async def test_malformed_authorization_headers(header: str | None) -> None:
    with pytest.raises(AuthenticationError):
        await _service().authenticate(header, NOW)
