"""Admin API routes for device twins (see docs/twins.md).

``GET /api/devices/{device_id}/twin``  (viewer)
    The twin: desired, reported, delta, versions, per-key timestamps.
``PATCH /api/devices/{device_id}/twin/desired``  (operator)
    Body: a JSON merge patch of the desired document (``null`` deletes a key).
    ``If-Match: <desired version>`` makes it conditional. ``200 {"twin"}``;
    ``409 conflict`` (with the current ``version``); ``413 too_large``;
    ``400 invalid | too_deep``; ``503 disabled``.
``GET /api/twins?after=&limit=``  (viewer)
    Twins by device id, paged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from edgeway.admin.access import PRINCIPAL, requires
from edgeway.admin.errors import answer, error, read_body
from edgeway.admin.tokens import Role

if TYPE_CHECKING:
    from edgeway.twins.service import TwinService

BODY_MAX = 16 * 1024 * 1024
_STATUS = {"invalid": 400, "too_deep": 400, "too_large": 413, "conflict": 409}


class TwinRoutes:
    def __init__(self, service: Callable[[], TwinService | None]) -> None:
        self._service = service

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/devices/{device_id}/twin", self.show)
        app.router.add_patch("/api/devices/{device_id}/twin/desired", self.patch_desired)
        app.router.add_get("/api/twins", self.list)

    def _svc(self) -> TwinService | web.Response:
        svc = self._service()
        if svc is None:
            return error(503, "disabled", "twins are not enabled on this gateway")
        return svc

    @requires(Role.VIEWER)
    async def show(self, request: web.Request) -> web.Response:
        """A device's twin: desired, reported, delta, versions and per-key timestamps."""
        svc = self._svc()
        if isinstance(svc, web.Response):
            return svc
        twin = await svc.get(request.match_info["device_id"])
        return answer(twin.to_json())

    @requires(Role.VIEWER)
    async def list(self, request: web.Request) -> web.Response:
        """Twins by device id, paged (``?after=&limit=``)."""
        svc = self._svc()
        if isinstance(svc, web.Response):
            return svc
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return error(400, "invalid", "limit must be an integer")
        twins = await svc.list(limit, request.query.get("after", ""))
        return answer({"twins": [t.to_json() for t in twins]})

    @requires(Role.OPERATOR)
    async def patch_desired(self, request: web.Request) -> web.Response:
        """Change the desired document with a JSON merge patch (``If-Match``: its version)."""
        from edgeway.twins.model import TwinError, if_match, parse_patch

        svc = self._svc()
        if isinstance(svc, web.Response):
            return svc
        try:
            version = if_match(request.headers.get("If-Match"))
        except ValueError:
            return error(400, "invalid", "If-Match is a desired version number")
        raw = await read_body(request, min(svc.limits.max_bytes * 2 + 1024, BODY_MAX))
        if len(raw) > min(svc.limits.max_bytes * 2 + 1024, BODY_MAX):
            return error(413, "too_large", "body too large")
        principal = request.get(PRINCIPAL)
        by = principal.source if principal is not None else "api"
        try:
            patch = parse_patch(raw)
            twin = await svc.patch(
                request.match_info["device_id"], "desired", patch, if_match=version, by=by
            )
        except TwinError as e:
            return answer({"error": e.code, "message": str(e), **e.extra}, _STATUS.get(e.code, 400))
        return answer({"twin": twin.to_json()})
