"""The OpenAPI 3.1 document of the admin API, built from the routes themselves.

Nothing is written twice: each path and method comes from the aiohttp router,
the summary and description from the handler's docstring (first line, then
the rest), the least role from what the handler declared with
:func:`~edgeway.admin.access.requires`, path parameters from ``{name}`` in the
path. A route added without a docstring shows with an empty summary, and a
test fails on it, so the reference cannot fall behind the code.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from aiohttp import web

from edgeway import __version__
from edgeway.admin.access import PUBLIC, declared_access
from edgeway.admin.errors import ERROR_SCHEMA
from edgeway.admin.tokens import Role

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
DESCRIBED_PREFIXES = ("/api/", "/metrics", "/livez", "/readyz", "/healthz")
"""Paths that are the API (``/`` and ``/hmi/...`` are the HMI's pages and assets)."""


def _doc(handler: Any) -> tuple[str, str]:
    text = inspect.getdoc(handler) or ""
    first, _, rest = text.partition("\n")
    return first.strip(), rest.strip()


def _operation(method: str, path: str, handler: Any) -> dict[str, Any]:
    summary, description = _doc(handler)
    access = declared_access(handler)
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": f"{method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}",
        "tags": [path.split("/")[2] if path.startswith("/api/") else "probes"],
        "responses": {
            "200": {"description": "done"},
            "default": {
                "description": "an error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if description:
        op["description"] = description
    if access == PUBLIC:
        op["security"] = []
        op["x-role"] = "public"
    elif isinstance(access, Role):
        op["x-role"] = access.label
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(path)
    ]
    if params:
        op["parameters"] = params
    return op


def build_openapi(app: web.Application) -> dict[str, Any]:
    """The document for every described route of ``app``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "*"):
            continue
        path = resource.canonical
        if not path.startswith(DESCRIBED_PREFIXES):
            continue
        doc_path = _PARAM.sub(r"{\1}", path)
        paths.setdefault(doc_path, {})[route.method.lower()] = _operation(
            route.method, doc_path, route.handler
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgeway admin API",
            "version": __version__,
            "description": "Status, metrics, commands, configuration and the HMI's data. "
            "Each operation's x-role is the least role it needs (viewer < operator < "
            "engineer < admin). Errors are always {error, message}.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "edgeway tokens"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "edgeway_session",
                    "description": "POST /api/login; writes also need X-CSRF-Token",
                },
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }
