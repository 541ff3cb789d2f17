"""The OpenAPI 3.1 document of the API, built from the route tables, and its HTML rendering.

Nothing here is written by hand per endpoint: paths, parameters, request and response
schemas, the roles allowed and every problem response come from the
:class:`~backend.api.registry.Operation` records and the command/view dataclasses
(:mod:`backend.api.schemas`). Problem statuses are derived: 500 everywhere; 401 and 403
on authenticated operations; 404 where the path names a resource; 400, 413, 415 and
422 where there is a body; 400 and 422 on lists (their query); plus any the route
declares. The docs page (``/docs``) is rendered on the server from the same document:
no script, no CDN (the API may run where there is no internet).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any, Final

from backend.api.problems import MEDIA_TYPE, all_problems
from backend.api.registry import ListOf, Operation, RouteTable
from backend.api.schemas import Components
from backend.domain.auth import PERMISSIONS, Role
from backend.domain.fields import MAX_INT64

OPENAPI_VERSION: Final = "3.1.0"
_STATUS_TEXT: Final = {
    200: "OK",
    201: "Created",
    400: "Malformed request: the body is not JSON, or the query string does not parse",
    401: "No, unknown, revoked or expired credentials",
    403: "The caller's role may not do this",
    404: "No such resource visible to the caller (another tenant's looks the same)",
    405: "Method not allowed",
    409: "Conflict: name, id or serial taken; or a state that forbids this",
    413: "Request body too large",
    415: "Body is not application/json",
    422: "The request breaks a rule; errors[] names each field",
    500: "Server failure (quote the request id)",
    503: "Not ready",
}

PROBLEM_SCHEMA: Final = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail", "instance", "request_id"],
    "properties": {
        "type": {"type": "string", "description": "urn:voltcredit:problem:<slug>"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "urn:voltcredit:request:<request id>"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "problem"],
                "properties": {"field": {"type": "string"}, "problem": {"type": "string"}},
            },
        },
    },
}


def roles_for(op: Operation) -> list[str]:
    """Roles allowed to call ``op`` (from the permission table)."""
    if op.action is None:
        return []
    return [role.value for role in Role if op.action in PERMISSIONS[role]]


def _problem_statuses(op: Operation) -> list[int]:
    statuses = {500, *op.problems}
    if not op.public:
        statuses |= {401, 403} if op.action is not None else {401}
    if op.path_params:
        statuses.add(404)
    if op.body is not None:
        statuses |= {400, 413, 415, 422}
    if isinstance(op.response, ListOf):
        statuses |= {400, 422}
    return sorted(statuses)


def _page_schema(listing: ListOf, components: Components) -> dict[str, Any]:
    name = f"{listing.item.__name__}Page"
    if name not in components.schemas:
        components.schemas[name] = {
            "type": "object",
            "description": f"One page of {listing.item.__name__} items, ascending",
            "required": ["items", "next_after"],
            "additionalProperties": False,
            "properties": {
                "items": {"type": "array", "items": components.ref(listing.item)},
                "next_after": {
                    "anyOf": [{"type": listing.cursor}, {"type": "null"}],
                    "description": "pass as ?after= for the next page; null at the end",
                },
            },
        }
    return {"$ref": f"#/components/schemas/{name}"}


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
            if name in op.string_params
            else {"type": "integer", "minimum": 1, "maximum": MAX_INT64},
        }
        for name in op.path_params
    ]
    if isinstance(op.response, ListOf):
        cursor = (
            {"type": "string"}
            if op.response.cursor == "string"
            else {"type": "integer", "minimum": 0}
        )
        params += [
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
            },
            {
                "name": "after",
                "in": "query",
                "required": False,
                "description": "next_after of the previous page",
                "schema": cursor,
            },
        ]
    return params


def _operation(op: Operation, components: Components) -> dict[str, Any]:
    roles = roles_for(op)
    description = op.description
    if roles:
        description += f"\n\nRoles: {', '.join(roles)}."
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "description": description,
        "tags": [op.tag],
        "security": [] if op.public else [{"bearerAuth": []}],
    }
    params = _parameters(op)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": components.ref(op.body)}},
        }
    success: dict[str, Any] = {"description": _STATUS_TEXT.get(op.status, "OK")}
    if isinstance(op.response, ListOf):
        success["content"] = {"application/json": {"schema": _page_schema(op.response, components)}}
    elif op.response is not None:
        success["content"] = {"application/json": {"schema": components.ref(op.response)}}
    elif op.media_type != "application/json":
        success["content"] = {op.media_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(op.status): success}
    for status in _problem_statuses(op):
        responses[str(status)] = {
            "description": _STATUS_TEXT.get(status, "Error"),
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    out["responses"] = responses
    return out


def build_document(tables: Iterable[RouteTable], *, version: str) -> dict[str, Any]:
    """The OpenAPI document of every operation of ``tables``."""
    components = Components()
    components.schemas["Problem"] = PROBLEM_SCHEMA
    paths: dict[str, dict[str, Any]] = {}
    tags = []
    for table in tables:
        tags.append({"name": table.tag, "description": table.description})
        for op in table.operations:
            paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, components)
    problem_list = "\n".join(f"- `{p.type}` ({p.status}): {p.title}" for p in all_problems())
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "voltcredit backend API",
            "version": version,
            "description": (
                "Prepaid energy: tenants, resellers, customers, tariffs, meters, top-ups.\n\n"
                "Authenticate with `Authorization: Bearer <key>`: an API key `vck_…` (staff "
                "and systems) or a customer token `vcc_…` from `POST /v1/auth/login`. Errors "
                "are `application/problem+json` (RFC 9457); every response carries "
                "`X-Request-Id`.\n\nProblem types:\n" + problem_list
            ),
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": components.schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "API key vck_<prefix>_<secret> or customer token vcc_…",
                }
            },
        },
    }


# ------------------------------------------------------------------------------ docs page

_CSS: Final = """
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
h2{border-bottom:1px solid #ccc;margin-top:2.5rem}
.op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.6rem .9rem}
.m{font:bold 13px monospace;padding:.1rem .4rem;border-radius:4px;color:#fff;background:#555}
.GET{background:#2a7}.POST{background:#27c}.DELETE{background:#c33}
code,pre{font:13px monospace;background:#f5f5f5}pre{padding:.5rem;overflow:auto}
td,th{padding:.2rem .6rem;text-align:left;vertical-align:top}
"""


def _schema_text(schema: dict[str, Any], components: dict[str, Any]) -> str:
    ref = schema.get("$ref", "")
    name = ref.rsplit("/", 1)[-1]
    resolved = components.get(name, schema)
    return f"{name}\n{json.dumps(resolved, indent=2)}" if name else json.dumps(schema, indent=2)


def render_docs(document: dict[str, Any]) -> str:
    """A self-contained HTML page listing every operation, schema and problem type."""
    esc = html.escape
    components = document["components"]["schemas"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{esc(document['info']['title'])}</title><style>{_CSS}</style></head><body>",
        (
            f"<h1>{esc(document['info']['title'])} "
            f"<small>{esc(document['info']['version'])}</small></h1>"
            "<p>Machine-readable: <a href=/openapi.json>/openapi.json</a> (OpenAPI "
            f"{esc(document['openapi'])}).</p>"
        ),
        (
            "<p>Authenticate with <code>Authorization: Bearer &lt;API key or customer "
            "token&gt;</code>. Errors are <code>application/problem+json</code> (RFC 9457).</p>"
        ),
    ]
    for tag in document["tags"]:
        parts.append(f"<h2 id=tag-{esc(tag['name'])}>{esc(tag['name'])}</h2>")
        parts.append(f"<p>{esc(tag['description'])}</p>")
        for path, methods in document["paths"].items():
            for method, op in methods.items():
                if op["tags"] != [tag["name"]]:
                    continue
                m = method.upper()
                parts.append(
                    f"<div class=op id=op-{esc(op['operationId'])}><p><span class='m {m}'>{m}"
                    f"</span> <code>{esc(path)}</code> — <b>{esc(op['summary'])}</b></p>"
                    f"<p>{esc(op['description']).replace(chr(10) * 2, '<br><br>')}</p>"
                )
                if "requestBody" in op:
                    schema = op["requestBody"]["content"]["application/json"]["schema"]
                    parts.append(f"<p>Body:</p><pre>{esc(_schema_text(schema, components))}</pre>")
                statuses = ", ".join(
                    f"{code} {esc(r['description'])}" for code, r in op["responses"].items()
                )
                parts.append(f"<p>Responses: {statuses}</p></div>")
    parts.append("<h2 id=problems>Problem types</h2><table><tr><th>type<th>status<th>title")
    parts.extend(
        f"<tr id=problem-{esc(p.slug)}><td><code>{esc(p.type)}</code><td>{p.status}"
        f"<td>{esc(p.title)}"
        for p in all_problems()
    )
    parts.append("</table></body></html>")
    return "".join(parts)
