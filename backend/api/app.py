"""The composition root of the HTTP API: configuration in, a ready aiohttp application out.

:func:`create_app` wires the middlewares (:mod:`backend.api.middleware`), opens the
long-lived resources in ``cleanup_ctx`` (the signing-key store, then the database and
the services built on it; closed in reverse order), mounts the route tables of
:data:`ROUTE_MODULES` and builds the OpenAPI document from them once. It does not
migrate the database: ``voltcredit backend run`` does that before it serves.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

from aiohttp import web
from alembic.script import ScriptDirectory
from argon2 import PasswordHasher

from backend.adapters.db.engine import Database
from backend.adapters.db.migrate import alembic_config
from backend.api import middleware
from backend.api.context import (
    AUTH,
    CLOCK,
    CONFIG,
    DATABASE,
    DOCS_HTML,
    KEY_STORE,
    OPENAPI,
    PROVISIONING,
    SCHEMA_HEAD,
)
from backend.api.openapi import build_document, render_docs
from backend.api.registry import RouteTable
from backend.config import BackendConfig
from backend.domain.auth import Role, Scope
from backend.keys.store import FileKeyStore
from backend.service.auth import AuthService, password_hasher
from backend.service.context import Call, Clock, utc_now
from backend.service.provisioning import Provisioning, SignerSource

#: The route modules, in the order of the OpenAPI document. Each defines a module-level
#: ``routes = RouteTable(...)`` and may define ``setup(app)`` to add its own resources
#: (``app.cleanup_ctx``) and app keys. Adding an API module is adding one line here.
ROUTE_MODULES: Final = (
    "backend.api.routes.system",
    "backend.api.routes.auth",
    "backend.api.routes.tenancy",
    "backend.api.routes.network",
    "backend.api.routes.topups",
    "backend.api.routes.alerts",
    "backend.api.routes.split_rules",
    "backend.api.routes.consumption",
)
ROUTE_TABLES: Final = web.AppKey("route_tables", list)


def api_version() -> str:
    """The installed voltcredit version (the OpenAPI ``info.version``)."""
    try:
        return importlib.metadata.version("voltcredit")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "0.0.0"


def head_revision() -> str:
    """The Alembic head revision of the code (reads the revision files: call once)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its revisions
        raise RuntimeError("no Alembic revisions found")
    return head


def load_routes(module_names: Sequence[str]) -> list[tuple[RouteTable, Callable[..., Any] | None]]:
    """Each module's ``routes`` table and optional ``setup`` hook."""
    loaded = []
    for name in module_names:
        module = importlib.import_module(name)
        table = getattr(module, "routes", None)
        if not isinstance(table, RouteTable):
            raise TypeError(f"{name} defines no `routes = RouteTable(...)`")
        loaded.append((table, getattr(module, "setup", None)))
    return loaded


def create_app(
    config: BackendConfig,
    *,
    engine_kwargs: Mapping[str, Any] | None = None,
    key_store: SignerSource | None = None,
    clock: Clock = utc_now,
    hasher: PasswordHasher | None = None,
    route_modules: Sequence[str] = ROUTE_MODULES,
) -> web.Application:
    """The API application for ``config``.

    ``engine_kwargs`` go to the database engine (a PostgreSQL ``search_path``, say);
    ``key_store`` replaces the file key store at ``config.key_dir``; ``clock`` and
    ``hasher`` (argon2 parameters) are for tests.
    """
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            middleware.request_id,
            middleware.problems,
            middleware.body_limit(config.max_body_bytes),
            middleware.authenticate,
        ],
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    if key_store is not None:
        app[KEY_STORE] = key_store
    else:
        app.cleanup_ctx.append(_file_key_store)
    app.cleanup_ctx.append(_services(dict(engine_kwargs or {}), hasher or password_hasher()))
    tables = []
    for table, setup in load_routes(route_modules):
        table.add_to(app.router)
        tables.append(table)
        if setup is not None:
            setup(app)
    app[ROUTE_TABLES] = tables
    document = build_document(tables, version=api_version())
    app[OPENAPI] = document
    app[DOCS_HTML] = render_docs(document)
    return app


async def _file_key_store(app: web.Application) -> AsyncIterator[None]:
    # Loading checks permissions and every key file: file I/O, once, off the loop.
    directory = app[CONFIG].key_dir
    app[KEY_STORE] = await asyncio.to_thread(FileKeyStore, directory, create=True)
    yield


def _services(
    engine_kwargs: dict[str, Any], hasher: PasswordHasher
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def services(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        async with Database(config.database_url, **engine_kwargs) as db:
            app[DATABASE] = db
            app[SCHEMA_HEAD] = await asyncio.to_thread(head_revision)
            auth = AuthService(
                db,
                token_secret=config.token_secret,
                customer_token_ttl_s=config.customer_token_ttl_s,
                hasher=hasher,
            )
            app[AUTH] = auth
            app[PROVISIONING] = Provisioning(
                db,
                auth=auth,
                signers=app[KEY_STORE],
                tariff_message_ttl_s=config.tariff_message_ttl_s,
            )
            if config.bootstrap_admin_key is not None:
                system = Call(
                    scope=Scope(role=Role.PLATFORM_ADMIN, actor="system"),
                    request_id="startup",
                    now=app[CLOCK](),
                )
                await auth.ensure_platform_key(system, config.bootstrap_admin_key, "bootstrap")
            yield

    return services
