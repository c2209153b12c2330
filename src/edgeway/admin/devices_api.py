"""Admin API routes for the device registry (see docs/devices.md).

``GET /api/devices?status=&type=&tag=&group=&protocol=&prefix=&limit=&after=``  (viewer)
    ``{"devices": [...], "next_after": ID|null, "total": N}``: one page in id
    order (at most 1,000); the next page with ``after`` = ``next_after``
    (``total`` is counted on the first page only, null on the others).
``GET /api/devices?format=csv``  (viewer)
    Every device matching the filters as CSV (the import's columns plus status).
``GET /api/devices/{id}``  (viewer)
    ``{"device": {...}}``.
``POST /api/devices``  (operator)
    Body ``{"id": ..., "name", "type", "tags", "groups", "credentials",
    "firmware", "metadata"}``: ``201 {"device": ...}``; ``409 exists``.
``PATCH /api/devices/{id}``  (operator)
    The fields to change: ``200 {"device": ...}``.
``POST /api/devices/{id}/disable`` and ``/enable``  (operator)
    A disabled device is refused and its connections end (reason revoked).
``DELETE /api/devices/{id}``  (operator)
    ``200 {"removed": ID}``.
``POST /api/devices/import``  (operator)
    A CSV body (header row; columns id, name, type, tags, groups,
    credentials, firmware, metadata; lists separated by ``;`` or ``,`` inside
    a quoted cell): ``200 {"created": N, "refused": M, "created_ids": [...],
    "refused_rows": [{"row", "id", "reason"}]}``.

Errors have the admin API's shape ``{"error": CODE, "message": TEXT}``:
``400 invalid``, ``404 not_found``, ``409 exists``, ``413 too_large``,
``503 disabled`` (no registry: ``devices.enabled: false``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from edgeway.admin.access import requires
from edgeway.admin.errors import answer as _json
from edgeway.admin.errors import error as _error
from edgeway.admin.errors import read_body
from edgeway.admin.tokens import Role
from edgeway.devices.csvio import CsvError, export_rows, parse_csv
from edgeway.devices.registry import DeviceError, DeviceFilter, DeviceRegistry

if TYPE_CHECKING:
    from edgeway.devices.service import DeviceService

BODY_MAX = 64 * 1024
"""Largest JSON body: a device's fields are bounded well below (metadata 4 KiB)."""
IMPORT_MAX = 16 * 1024 * 1024
"""Largest CSV import: ~100,000 rows of a typical 150 bytes. The parse runs
in a thread; the rows go in one transaction."""
EXPORT_PAGE = 1000

_STATUS = {"invalid": 400, "not_found": 404, "exists": 409, "disabled": 503}
_FILTERS = ("status", "type", "tag", "group", "protocol", "prefix")


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = _error(status, code, message)


Handler = Callable[["DeviceRoutes", web.Request], Awaitable[web.StreamResponse]]


def _answers_refusals(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(self: DeviceRoutes, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except _Refused as e:
            return e.response
        except DeviceError as e:
            return _error(_STATUS.get(e.code, 400), e.code, str(e))

    return wrapped


async def _body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _Refused(413, "too_large", f"body over {limit} bytes")
    raw = await read_body(request, limit)
    if len(raw) > limit:
        raise _Refused(413, "too_large", f"body over {limit} bytes")
    return raw


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await _body(request, BODY_MAX)
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as e:
        raise _Refused(400, "invalid", f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _Refused(400, "invalid", "body must be a JSON object")
    return body


def _filters(request: web.Request) -> DeviceFilter:
    q = request.query
    unknown = set(q) - {*_FILTERS, "limit", "after", "format"}
    if unknown:
        raise _Refused(400, "invalid", f"unknown parameters: {', '.join(sorted(unknown))}")
    return DeviceFilter(**{k: q[k] for k in _FILTERS if q.get(k)})


class DeviceRoutes:
    """The registry endpoints; ``service()`` is the running gateway's."""

    def __init__(self, service: Callable[[], DeviceService | None]) -> None:
        self._service = service

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/devices", self.list)
        app.router.add_post("/api/devices", self.add)
        app.router.add_post("/api/devices/import", self.import_csv)
        app.router.add_get("/api/devices/{device_id}", self.show)
        app.router.add_patch("/api/devices/{device_id}", self.update)
        app.router.add_delete("/api/devices/{device_id}", self.remove)
        app.router.add_post("/api/devices/{device_id}/disable", self.disable)
        app.router.add_post("/api/devices/{device_id}/enable", self.enable)

    def _registry(self) -> DeviceRegistry:
        svc = self._service()
        if svc is None:
            raise _Refused(503, "disabled", "the device registry is off (devices.enabled)")
        return svc.registry

    @requires(Role.VIEWER)
    @_answers_refusals
    async def list(self, request: web.Request) -> web.StreamResponse:
        """List devices, one page in id order.

        Filters ``status`` (online, offline, disabled, unregistered), ``type``,
        ``tag``, ``group``, ``protocol``, ``prefix``; ``limit`` (at most 1,000)
        and ``after`` (the last id of the previous page). ``{"devices": [...],
        "next_after": ID|null, "total": N}`` (total on the first page only).
        With ``format=csv``: every matching device as CSV."""
        registry = self._registry()
        filters = _filters(request)
        if request.query.get("format") == "csv":
            return await self._export(request, registry, filters)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise _Refused(400, "invalid", "limit must be an integer") from None
        page = await registry.list(filters, limit=limit, after=request.query.get("after"))
        return _json(
            {
                "devices": [d.to_json() for d in page.devices],
                "next_after": page.next_after,
                "total": page.total,
            }
        )

    async def _export(
        self, request: web.Request, registry: DeviceRegistry, filters: DeviceFilter
    ) -> web.StreamResponse:
        """Page by page, so 100,000 devices never sit in memory at once."""
        response = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8"})
        await response.prepare(request)
        after: str | None = None
        first = True
        while True:
            page = await registry.list(filters, limit=EXPORT_PAGE, after=after)
            await response.write(export_rows(page.devices, header=first).encode())
            first = False
            if page.next_after is None:
                break
            after = page.next_after
        await response.write_eof()
        return response

    @requires(Role.VIEWER)
    @_answers_refusals
    async def show(self, request: web.Request) -> web.StreamResponse:
        """One device's record: ``{"device": {...}}``, 404 when unknown."""
        device_id = request.match_info["device_id"]
        device = await self._registry().get(device_id)
        if device is None:
            return _error(404, "not_found", f"no device {device_id!r}")
        return _json({"device": device.to_json()})

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def add(self, request: web.Request) -> web.StreamResponse:
        """Register a device.

        Body ``{"id", "name", "type", "tags", "groups", "credentials",
        "firmware", "metadata"}`` (only ``id`` required): 201 with the record,
        409 when it is registered already, 400 naming the field at fault."""
        registry = self._registry()
        device = await registry.add(await _json_body(request))
        return _json({"device": device.to_json()}, 201)

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def update(self, request: web.Request) -> web.StreamResponse:
        """Change a registered device's fields (those given in the body)."""
        registry = self._registry()
        body = await _json_body(request)
        device = await registry.update(request.match_info["device_id"], body)
        return _json({"device": device.to_json()})

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def disable(self, request: web.Request) -> web.StreamResponse:
        """Disable a device: refused from now on, its connections end (revoked)."""
        device = await self._registry().disable(request.match_info["device_id"])
        return _json({"device": device.to_json()})

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def enable(self, request: web.Request) -> web.StreamResponse:
        """Enable a disabled device again."""
        device = await self._registry().enable(request.match_info["device_id"])
        return _json({"device": device.to_json()})

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def remove(self, request: web.Request) -> web.StreamResponse:
        """Delete a device's record (registered or not): ``{"removed": ID}``."""
        device_id = request.match_info["device_id"]
        await self._registry().remove(device_id)
        return _json({"removed": device_id})

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def import_csv(self, request: web.Request) -> web.StreamResponse:
        """Register the devices of a CSV file (the request body).

        A header row names the columns (id, name, type, tags, groups,
        credentials, firmware, metadata). Answers how many were created and
        each refused row with its number and reason."""
        import asyncio

        registry = self._registry()
        raw = await _body(request, IMPORT_MAX)
        try:
            rows = await asyncio.to_thread(parse_csv, raw)
        except CsvError as e:
            return _error(400, "invalid", str(e))
        report = await registry.add_many(rows)
        return _json(report.to_json())
