"""Twins over the HTTP ingest listener (the device's side; routes in
:mod:`edgeway.south.http`, which authenticates the device first).

``GET /devices/{id}/twin[?wait=S]``
    ``200`` the twin (``{"desired", "desired_version", "reported",
    "reported_version", "delta", ...}``) with ``ETag: "<desired>.<reported>"``
    (the two versions). With ``If-None-Match`` naming the current ETag and
    ``wait``, the answer waits until the twin changes (a long-poll, at most
    ``http_ingest.command_poll_max`` seconds) and is ``304`` if it did not.
``PATCH /devices/{id}/twin/reported``
    Body: a JSON merge patch (RFC 7396) of the reported document.
    ``If-Match: <reported version>`` makes it conditional. ``200
    {"version"}``; ``409 {"error": "conflict", "version"}``; ``413`` /
    ``400`` for a document over the limits or a body that is not a JSON object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from edgeway.twins.model import Twin, TwinError, if_match, parse_patch

if TYPE_CHECKING:
    from edgeway.twins.service import TwinService

_STATUS = {"invalid": 400, "too_deep": 400, "too_large": 413, "conflict": 409}


def etag(twin: Twin) -> str:
    return f'"{twin.desired_version}.{twin.reported_version}"'


def _twin(twin: Twin) -> web.Response:
    return web.Response(
        body=orjson.dumps(twin.to_json()),
        content_type="application/json",
        headers={"ETag": etag(twin)},
    )


async def get_twin(
    service: TwinService, device_id: str, request: web.Request, wait_max: float
) -> web.Response:
    twin = await service.get(device_id)
    seen = request.headers.get("If-None-Match")
    if seen is None or seen != etag(twin):
        return _twin(twin)
    try:
        wait = min(max(float(request.query.get("wait", "0")), 0.0), wait_max)
    except ValueError:
        return web.json_response(
            {"error": "bad_request", "detail": "wait must be seconds"}, status=400
        )
    if wait > 0:
        twin = await service.wait_change(
            device_id, (twin.desired_version, twin.reported_version), wait
        )
    if etag(twin) == seen:
        return web.Response(status=304, headers={"ETag": seen})
    return _twin(twin)


async def patch_reported(
    service: TwinService, device_id: str, request: web.Request, body: bytes
) -> web.Response:
    try:
        version = if_match(request.headers.get("If-Match"))
    except ValueError:
        return web.json_response(
            {"error": "bad_request", "detail": "If-Match is a reported version number"},
            status=400,
        )
    try:
        twin = await service.patch(
            device_id, "reported", parse_patch(body), if_match=version, by=f"http:{device_id}"
        )
    except TwinError as e:
        return web.json_response(
            {"error": e.code, "detail": str(e), **e.extra}, status=_STATUS.get(e.code, 400)
        )
    return web.json_response({"version": twin.reported_version})
