"""One JSON shape for every admin API error.

Every answer with a status of 400 or more is ``{"error": CODE, "message":
TEXT}`` (some add fields, such as ``issues`` for a configuration that does
not validate): the routes build theirs with :func:`error`, and
:func:`json_errors` turns what aiohttp raises by itself (an unknown path, a
wrong method, a body too large) and any unexpected exception into the same
shape, so a client parses one thing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from edgeway.logs import printable
from edgeway.streams import read_capped

log = logging.getLogger("edgeway.admin")

CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    421: "misdirected_request",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}
"""The ``error`` code of a status when the route did not choose a finer one."""

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a stable code (not_found, invalid, ...)"},
        "message": {"type": "string", "description": "what went wrong, for a person"},
    },
}


def error(status: int, code: str, message: str, **headers: str) -> web.Response:
    """The error answer every route gives."""
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or its first ``limit + 1`` bytes when it is longer
    (the caller refuses that as too large); see :mod:`edgeway.streams`."""
    return await read_capped(request.content, limit)


def answer(body: Any, status: int = 200) -> web.Response:
    """A JSON answer (orjson: the routes' bodies hold floats and nested documents)."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost middleware: aiohttp's own errors and crashes as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
        return error(e.status, CODES.get(e.status, "error"), e.reason, **headers)
    except Exception:
        log.exception(
            "admin API: %s %s failed", printable(request.method), printable(request.path[:80])
        )
        return error(500, "internal", "the gateway failed to answer; see its log")
