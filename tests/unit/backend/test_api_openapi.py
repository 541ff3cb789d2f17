"""The OpenAPI document: valid OpenAPI 3.1, every route in it, every error documented; /docs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from backend.api.app import create_app
from backend.api.context import DOCS_HTML, OPENAPI
from backend.api.problems import all_problems
from backend.config import BackendConfig
from tests.support.api import KeyRing


@pytest.fixture
def app(tmp_path: Path) -> web.Application:
    config = BackendConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'docs.db'}")
    return create_app(config, key_store=KeyRing())


@pytest.fixture
def document(app: web.Application) -> dict[str, Any]:
    return app[OPENAPI]


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"


def test_every_route_is_documented_and_nothing_else(
    app: web.Application, document: dict[str, Any]
) -> None:
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routed == documented
    assert len(documented) >= 30


def test_every_operation_documents_its_errors(document: dict[str, Any]) -> None:
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            where = (method, path)
            codes = set(op["responses"])
            assert "500" in codes, where
            public = op["security"] == []
            if not public:
                assert {"401", "403"} <= codes, where
            if "{" in path:
                assert "404" in codes, where
                assert all(p["in"] == "path" for p in op["parameters"] if p["required"]), where
            if "requestBody" in op:
                assert {"400", "413", "415", "422"} <= codes, where
            for code, response in op["responses"].items():
                if int(code) >= 400:
                    schema = response["content"]["application/problem+json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Problem"}, where
            assert op["summary"], where
            assert op["operationId"], where
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_schemas_are_strict_and_describe_constraints(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    new_customer = schemas["NewCustomer"]
    assert new_customer["additionalProperties"] is False
    assert set(new_customer["required"]) == {"name", "email", "password"}
    assert new_customer["properties"]["password"]["minLength"] == 10
    assert new_customer["properties"]["reseller_id"]["anyOf"][1] == {"type": "null"}
    meter = schemas["NewMeter"]["properties"]
    assert (meter["serial"]["minimum"], meter["serial"]["maximum"]) == (1, 2**63 - 1)
    assert schemas["NewTariff"]["properties"]["activation_at"]["format"] == "date-time"
    assert schemas["NewApiKey"]["properties"]["role"]["enum"] == [
        "PLATFORM_ADMIN",
        "UTILITY_ADMIN",
        "RESELLER",
        "SUPPORT",
        "CUSTOMER",
    ]
    created = schemas["ApiKeyCreated"]["properties"]
    assert "key" in created
    assert "prefix" in created  # inherited fields are described too
    page = schemas["GatewayViewPage"]["properties"]["next_after"]
    assert page["anyOf"][0] == {"type": "string"}
    assert "Roles: UTILITY_ADMIN." in document["paths"]["/v1/gateways"]["post"]["description"]


def test_docs_page_is_self_contained_and_lists_everything(
    app: web.Application, document: dict[str, Any]
) -> None:
    page = app[DOCS_HTML]
    assert "<script" not in page
    assert "://" not in page  # no CDN, no external link: the API may run offline
    for ops in document["paths"].values():
        for op in ops.values():
            assert f"id=op-{op['operationId']}" in page
    for problem in all_problems():
        assert problem.type in page


async def test_document_and_docs_are_served(app: web.Application) -> None:
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.json")
        assert resp.status == 200
        assert (await resp.json())["paths"] == app[OPENAPI]["paths"]
        resp = await client.get("/docs")
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert "voltcredit backend API" in await resp.text()
