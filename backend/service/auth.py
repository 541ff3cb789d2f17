"""Authentication and API keys: issue and revoke keys, check keys and customer tokens, log in.

**API keys** (staff and systems) are ``vck_<prefix>_<secret>``: 8 hex digits of public
prefix to find the row, and 32 random bytes of secret (43 base64url characters), of
which only the SHA-256 is stored. A slow password hash (argon2, bcrypt) exists to make
guessing a *low-entropy* password expensive; a 256-bit random secret cannot be guessed
at any speed, so a fast hash loses nothing and keeps every request's check cheap. The
comparison is constant-time (``hmac.compare_digest``). The key is shown once, at
creation; a lost key is revoked and replaced.

**Customers** log in with tenant, e-mail and password (argon2id, ``argon2-cffi``; the
hash runs in a worker thread so it never blocks the event loop) and receive a
short-lived bearer token ``vcc_<payload>.<mac>``: base64url JSON ``{sub, ten, exp}``
and its HMAC-SHA256 under the server's token secret (RFC 2104). Nothing is stored per
token; a token dies at ``exp`` (15 minutes by default). Without a configured secret
each process draws a random one, so tokens do not survive a restart and one instance
does not accept another's (set ``auth.token_secret`` when running several).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from backend.adapters.db.engine import Database
from backend.adapters.db.repos import Repositories
from backend.adapters.db.tables import ApiKeyRow
from backend.domain.auth import (
    KEY_ROLES,
    Action,
    Role,
    Scope,
    format_api_key,
    parse_api_key,
)
from backend.domain.fields import ID, NAME, Doc, Text
from backend.service.context import Call, Page, PageRequest, audit, require
from backend.service.refusals import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)

CUSTOMER_TOKEN_MARK: Final = "vcc_"  # noqa: S105 - a public marker, not a secret
#: An e-mail address as stored: trimmed and lower-cased (RFC 5321 allows at most 254).
EMAIL: Final = Text(3, 254, r"[^@\s]+@[^@\s]+")
PASSWORD: Final = Text(10, 1024)


def password_hasher() -> PasswordHasher:
    """argon2id with argon2-cffi's defaults (RFC 9106 §4, the low-memory profile)."""
    return PasswordHasher()


def normalise_email(email: str) -> str:
    """The stored form of an e-mail address (login is case-insensitive)."""
    return email.strip().lower()


def _sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ------------------------------------------------------------------------- views


@dataclass(frozen=True, slots=True, kw_only=True)
class NewApiKey:
    """Create an API key (``tenant_id`` defaults to the caller's tenant)."""

    name: Annotated[str, NAME, Doc("who or what uses the key", "crm-sync")]
    role: Annotated[Role, Doc("PLATFORM_ADMIN, UTILITY_ADMIN, RESELLER or SUPPORT")]
    tenant_id: Annotated[int | None, ID, Doc("tenant of the key; none for PLATFORM_ADMIN")] = None
    reseller_id: Annotated[int | None, ID, Doc("the reseller, for a RESELLER key only")] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyView:
    """An API key without its secret."""

    id: int
    name: str
    role: Role
    tenant_id: int | None
    reseller_id: int | None
    prefix: Annotated[str, Doc("public part of the key: vck_<prefix>_…")]
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKeyRow) -> ApiKeyView:
        return cls(
            id=row.id,
            name=row.name,
            role=Role(row.role),
            tenant_id=row.tenant_id,
            reseller_id=row.reseller_id,
            prefix=row.prefix,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyCreated(ApiKeyView):
    """A new API key with its secret: ``key`` is shown this once and never again."""

    key: Annotated[str, Doc("the whole key; send as Authorization: Bearer <key>")]


@dataclass(frozen=True, slots=True, kw_only=True)
class Login:
    """A customer's credentials."""

    tenant_id: Annotated[int, ID, Doc("the utility the customer belongs to")]
    email: Annotated[str, EMAIL]
    password: Annotated[str, Text(1, 1024)]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResult:
    """A customer bearer token."""

    token: Annotated[str, Doc("send as Authorization: Bearer <token>")]
    token_type: Annotated[str, Doc("always Bearer")]
    expires_at: datetime
    customer_id: int


# ------------------------------------------------------------------------- service


class AuthService:
    """API keys and customer tokens (one unit of work per method)."""

    def __init__(
        self,
        db: Database,
        *,
        token_secret: bytes | None,
        customer_token_ttl_s: int,
        hasher: PasswordHasher,
    ) -> None:
        self._db = db
        # Random per process when unset (see the module docstring).
        self._secret = token_secret or secrets.token_bytes(32)
        self._ttl = timedelta(seconds=customer_token_ttl_s)
        self._hasher = hasher
        # Verified against when the e-mail is unknown, so a miss costs what a hit costs
        # and response times do not tell which addresses have accounts.
        self._dummy_hash: str | None = None

    # ---------------------------------------------------------------- authentication

    async def authenticate(self, authorization: str | None, now: datetime) -> Scope:
        """The scope of an ``Authorization: Bearer …`` header, or AuthenticationError."""
        if not authorization:
            raise AuthenticationError("missing Authorization: Bearer <API key or token>")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationError("Authorization must be 'Bearer <API key or token>'")
        if credential.startswith(CUSTOMER_TOKEN_MARK):
            return self._customer_scope(credential, now)
        return await self._api_key_scope(credential)

    async def _api_key_scope(self, presented: str) -> Scope:
        parts = parse_api_key(presented)
        if parts is None:
            raise AuthenticationError("malformed API key or token")
        prefix, secret = parts
        async with self._db.read() as session:
            row = await Repositories(session).auth.api_key(prefix)
        stored = row.secret_hash if row is not None else "0" * 64
        matches = hmac.compare_digest(_sha256_hex(secret), stored)
        if row is None or not matches:
            raise AuthenticationError("unknown API key")
        if row.revoked_at is not None:
            raise AuthenticationError("this API key was revoked")
        return Scope(
            role=Role(row.role),
            actor=f"api_key:{row.id}",
            tenant_id=row.tenant_id,
            reseller_id=row.reseller_id,
        )

    def issue_customer_token(self, customer_id: int, tenant_id: int, now: datetime) -> LoginResult:
        """A signed bearer token for a customer, valid for the configured lifetime."""
        expires = now + self._ttl
        claims = {"sub": customer_id, "ten": tenant_id, "exp": int(expires.timestamp())}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self._secret, (CUSTOMER_TOKEN_MARK + payload).encode(), "sha256")
        return LoginResult(
            token=f"{CUSTOMER_TOKEN_MARK}{payload}.{_b64(mac.digest())}",
            token_type="Bearer",  # noqa: S106 - the RFC 6750 scheme name
            expires_at=expires.replace(microsecond=0),
            customer_id=customer_id,
        )

    def _customer_scope(self, token: str, now: datetime) -> Scope:
        signed, _, mac_text = token.rpartition(".")
        try:
            mac = _unb64(mac_text)
            expected = hmac.new(self._secret, signed.encode(), "sha256").digest()
            # Verify the MAC before trusting any field it covers (house style rule 10).
            if not signed or not hmac.compare_digest(mac, expected):
                raise AuthenticationError("invalid customer token")
            claims = json.loads(_unb64(signed[len(CUSTOMER_TOKEN_MARK) :]))
        except (binascii.Error, ValueError, UnicodeError) as exc:
            raise AuthenticationError("invalid customer token") from exc
        sub, ten, exp = claims.get("sub"), claims.get("ten"), claims.get("exp")
        if not all(type(v) is int for v in (sub, ten, exp)):  # pragma: no cover - we signed it
            raise AuthenticationError("invalid customer token")
        if now.timestamp() >= exp:
            raise AuthenticationError("customer token expired: log in again")
        return Scope(role=Role.CUSTOMER, actor=f"customer:{sub}", tenant_id=ten, customer_id=sub)

    async def login(self, credentials: Login, now: datetime) -> LoginResult:
        """Check a customer's password; a token on success, AuthenticationError otherwise."""
        email = normalise_email(credentials.email)
        async with self._db.read() as session:
            row = await Repositories(session).auth.customer(credentials.tenant_id, email)
        if row is None:
            if self._dummy_hash is None:
                self._dummy_hash = await asyncio.to_thread(self._hasher.hash, secrets.token_hex())
            await self._verify(self._dummy_hash, credentials.password)
            raise AuthenticationError("wrong tenant, e-mail or password")
        if not await self._verify(row.password_hash, credentials.password):
            raise AuthenticationError("wrong tenant, e-mail or password")
        return self.issue_customer_token(row.id, row.tenant_id, now)

    async def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return await asyncio.to_thread(self._hasher.verify, password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def hash_password(self, password: str) -> str:
        """argon2id hash of a password (in a worker thread)."""
        return await asyncio.to_thread(self._hasher.hash, password)

    # ---------------------------------------------------------------- API keys

    async def create_api_key(self, call: Call, new: NewApiKey) -> ApiKeyCreated:
        """Issue a key of ``new.role``; the caller may only grant roles below its own."""
        require(call, Action.API_KEY_CREATE)
        scope = call.scope
        if new.role not in KEY_ROLES:
            raise InvalidInputError.one("role", f"{new.role} is a login, not an API key role")
        if not scope.may_grant(new.role):
            raise PermissionDeniedError(f"role {scope.role} may not create {new.role} keys")
        tenant_id = new.tenant_id if scope.tenant_id is None else scope.tenant_id
        if new.tenant_id is not None and new.tenant_id != tenant_id:
            raise NotFoundError(f"tenant {new.tenant_id} not found")
        if (new.role is Role.PLATFORM_ADMIN) != (tenant_id is None):
            raise InvalidInputError.one(
                "tenant_id",
                "must be absent for PLATFORM_ADMIN keys"
                if tenant_id is not None
                else f"is required for {new.role} keys",
            )
        if (new.role is Role.RESELLER) != (new.reseller_id is not None):
            raise InvalidInputError.one(
                "reseller_id",
                "is required for RESELLER keys"
                if new.reseller_id is None
                else f"is only for RESELLER keys, not {new.role}",
            )
        async with self._db.write() as session:
            repos = Repositories(session)
            if tenant_id is not None and await repos.tenants.get(scope, tenant_id) is None:
                raise NotFoundError(f"tenant {tenant_id} not found")
            if new.reseller_id is not None:
                reseller = await repos.resellers.get(scope, new.reseller_id)
                if reseller is None or reseller.tenant_id != tenant_id:
                    raise NotFoundError(f"reseller {new.reseller_id} not found")
            row, key = await _insert_key(
                repos,
                scope,
                name=new.name,
                role=new.role,
                tenant_id=tenant_id,
                reseller_id=new.reseller_id,
                now=call.now,
            )
            await audit(
                repos,
                call,
                action=Action.API_KEY_CREATE,
                target=f"api_key:{row.id}",
                tenant_id=tenant_id,
                detail={"role": new.role.value, "name": new.name, "prefix": row.prefix},
            )
        return ApiKeyCreated(
            id=row.id,
            name=row.name,
            role=new.role,
            tenant_id=row.tenant_id,
            reseller_id=row.reseller_id,
            prefix=row.prefix,
            created_at=row.created_at,
            revoked_at=None,
            key=key,
        )

    async def list_api_keys(self, call: Call, page: PageRequest) -> Page[ApiKeyView]:
        """The keys the caller may see (its tenant's; all for a platform admin)."""
        require(call, Action.API_KEY_READ)
        async with self._db.read() as session:
            found = await Repositories(session).api_keys.list(
                call.scope, limit=page.limit, after=page.after
            )
        return Page(items=[ApiKeyView.of(r) for r in found.rows], next_after=found.next_after)

    async def get_api_key(self, call: Call, key_id: int) -> ApiKeyView:
        """One visible key."""
        require(call, Action.API_KEY_READ)
        async with self._db.read() as session:
            row = await Repositories(session).api_keys.get(call.scope, key_id)
        if row is None:
            raise NotFoundError(f"api key {key_id} not found")
        return ApiKeyView.of(row)

    async def revoke_api_key(self, call: Call, key_id: int) -> ApiKeyView:
        """Revoke a visible key at once (idempotent); its next request gets 401."""
        require(call, Action.API_KEY_REVOKE)
        async with self._db.write() as session:
            repos = Repositories(session)
            row = await repos.api_keys.get(call.scope, key_id, lock=True)
            if row is None:
                raise NotFoundError(f"api key {key_id} not found")
            if row.revoked_at is None:
                await repos.api_keys.revoke(call.scope, key_id, call.now)
                await audit(
                    repos,
                    call,
                    action=Action.API_KEY_REVOKE,
                    target=f"api_key:{key_id}",
                    tenant_id=row.tenant_id,
                    detail={"prefix": row.prefix},
                )
        return ApiKeyView.of(row)

    async def ensure_platform_key(self, call: Call, key: str, name: str) -> bool:
        """Store ``key`` as a PLATFORM_ADMIN key unless its prefix exists (bootstrap).

        Returns whether it was stored. A stored key with the same prefix and another
        secret is a :class:`ConflictError`: the configuration names a key it does not own.
        """
        parts = parse_api_key(key)
        if parts is None:
            raise InvalidInputError.one("bootstrap_admin_key", "not a vck_ key")
        prefix, secret = parts
        async with self._db.write() as session:
            repos = Repositories(session)
            row = await repos.auth.api_key(prefix)
            if row is not None:
                if not hmac.compare_digest(row.secret_hash, _sha256_hex(secret)):
                    raise ConflictError(f"another API key already has the prefix {prefix}")
                return False
            row = ApiKeyRow(
                prefix=prefix,
                secret_hash=_sha256_hex(secret),
                role=Role.PLATFORM_ADMIN.value,
                tenant_id=None,
                reseller_id=None,
                name=name,
                created_at=call.now,
                revoked_at=None,
            )
            await repos.api_keys.add(call.scope, row)
            await audit(
                repos,
                call,
                action=Action.API_KEY_CREATE,
                target=f"api_key:{row.id}",
                tenant_id=None,
                detail={"role": Role.PLATFORM_ADMIN.value, "name": name, "prefix": prefix},
            )
        return True

    async def create_platform_key(self, call: Call, name: str) -> ApiKeyCreated:
        """A new PLATFORM_ADMIN key (``voltcredit backend create-admin-key``)."""
        return await self.create_api_key(call, NewApiKey(name=name, role=Role.PLATFORM_ADMIN))


async def _insert_key(
    repos: Repositories,
    scope: Scope,
    *,
    name: str,
    role: Role,
    tenant_id: int | None,
    reseller_id: int | None,
    now: datetime,
) -> tuple[ApiKeyRow, str]:
    # 32 bits of prefix: a clash is rare but possible, so draw again rather than fail.
    for _ in range(8):
        prefix = secrets.token_hex(4)
        if await repos.auth.api_key(prefix) is None:
            break
    else:  # pragma: no cover - eight clashes in a row: the table holds billions of keys
        raise ConflictError("could not draw a free API key prefix; retry")
    secret = secrets.token_urlsafe(32)
    row = ApiKeyRow(
        prefix=prefix,
        secret_hash=_sha256_hex(secret),
        role=role.value,
        tenant_id=tenant_id,
        reseller_id=reseller_id,
        name=name,
        created_at=now,
        revoked_at=None,
    )
    await repos.api_keys.add(scope, row)
    return row, format_api_key(prefix, secret)
