"""Admin API routes for firmware images and campaigns (see docs/firmware.md).

``GET /api/firmware/images``  (viewer)
``PUT /api/firmware/images?hardware=H&version=V[&note=]``  (engineer)
    The body is the image, streamed to disk; ``X-Image-SHA256`` (hex,
    checked) and ``X-Image-Signature`` (base64 Ed25519). ``201 {"image"}``.
``GET /api/firmware/campaigns``  (viewer)
``GET /api/firmware/campaigns/{id}``  (viewer): the campaign and its devices.
``POST /api/firmware/campaigns``  (engineer)
    ``{"image": ID, "groups": {"line-1": ["pump-1", ...], ...}`` (named devices) or
    ``"groups": ["line-1", "line-2"], "tags": ["beta"], "type": "pump"`` (the device
    registry's groups as waves, in order; resolved now), ``"canary_share": 0.1,
    "pace": 60, "max_in_flight": 50, "success_threshold": 0.9,
    "error_threshold": 0.2, "min_finished": 5, "ttl": 3600}``. ``201 {"campaign"}``.
``POST /api/firmware/campaigns/{id}/pause``, ``.../resume``, ``.../abort``  (engineer:
    the role that starts a campaign is the one that stops it)

Errors: ``{"error", "message"}``; ``400 invalid``, ``404 not_found``,
``409 exists``, ``413 too_large``, ``422 digest_mismatch|bad_signature|unsigned``,
``503 disabled``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from edgeway.admin.access import requires
from edgeway.admin.errors import answer as _json
from edgeway.admin.errors import error as _error
from edgeway.admin.errors import read_body
from edgeway.admin.tokens import Role

if TYPE_CHECKING:
    from edgeway.firmware.service import FirmwareService

BODY_MAX = 4 * 1024 * 1024
_STATUS = {
    "invalid": 400,
    "not_found": 404,
    "exists": 409,
    "too_large": 413,
    "digest_mismatch": 422,
    "bad_signature": 422,
    "unsigned": 422,
}


class FirmwareRoutes:
    def __init__(self, service: Callable[[], FirmwareService | None]) -> None:
        self._service = service

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/firmware/images", self.images)
        r.add_put("/api/firmware/images", self.upload)
        r.add_get("/api/firmware/campaigns", self.campaigns)
        r.add_post("/api/firmware/campaigns", self.create)
        r.add_get("/api/firmware/campaigns/{id}", self.show)
        r.add_post("/api/firmware/campaigns/{id}/pause", self.pause)
        r.add_post("/api/firmware/campaigns/{id}/resume", self.resume)
        r.add_post("/api/firmware/campaigns/{id}/abort", self.abort)

    async def _call(self, fn: Callable[[FirmwareService], Awaitable[web.Response]]) -> web.Response:
        from edgeway.firmware.service import FirmwareError

        svc = self._service()
        if svc is None:
            return _error(503, "disabled", "firmware updates are not enabled on this gateway")
        try:
            return await fn(svc)
        except FirmwareError as e:
            return _error(_STATUS.get(e.code, 400), e.code, str(e))

    @requires(Role.VIEWER)
    async def images(self, request: web.Request) -> web.Response:
        """Firmware images: version, hardware, size, SHA-256, who signed them."""

        async def go(svc: FirmwareService) -> web.Response:
            return _json({"images": [i.to_json() for i in await svc.images()]})

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def upload(self, request: web.Request) -> web.Response:
        """Upload an image (the body, streamed) for ``?hardware=&version=``.

        Headers ``X-Image-SHA256`` (hex) and ``X-Image-Signature`` (base64
        Ed25519 over the hardware type, the version and the SHA-256)."""
        from edgeway.firmware.service import FirmwareError

        q = request.query
        signature: bytes | None = None
        if sig := request.headers.get("X-Image-Signature"):
            try:
                signature = base64.b64decode(sig, validate=True)
            except (binascii.Error, ValueError):
                return _error(400, "invalid", "X-Image-Signature is not base64")

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(256 * 1024):
                yield chunk

        async def go(svc: FirmwareService) -> web.Response:
            if request.content_length is not None and request.content_length > svc.max_size:
                raise FirmwareError("too_large", f"image over {svc.max_size} bytes")
            image = await svc.add_image(
                q.get("hardware", ""),
                q.get("version", ""),
                chunks(),
                sha256=request.headers.get("X-Image-SHA256"),
                signature=signature,
                note=q.get("note", ""),
            )
            return _json({"image": image.to_json()}, 201)

        return await self._call(go)

    @requires(Role.VIEWER)
    async def campaigns(self, request: web.Request) -> web.Response:
        """Firmware campaigns with their state and counts per device state."""

        async def go(svc: FirmwareService) -> web.Response:
            return _json({"campaigns": [c.to_json() for c in await svc.campaigns()]})

        return await self._call(go)

    @requires(Role.VIEWER)
    async def show(self, request: web.Request) -> web.Response:
        """One campaign and each of its devices' state and LwM2M result."""
        from edgeway.firmware.service import FirmwareError

        cid = request.match_info["id"]

        async def go(svc: FirmwareService) -> web.Response:
            camp = await svc.campaign(cid)
            if camp is None:
                raise FirmwareError("not_found", f"no campaign {cid!r}")
            targets = [t.to_json() for t in await svc.targets(cid)]
            return _json({"campaign": camp.to_json(), "devices": targets})

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def create(self, request: web.Request) -> web.Response:
        """Start a campaign: ``{"image", "groups": {name: [device ids]}, ...}``, or
        ``"groups": [registry group, ...], "tags": [...], "type": ...`` (resolved
        from the device registry now, one wave per group), with its canary
        share, pace, thresholds and time to live."""
        from edgeway.firmware.service import FirmwareError

        async def go(svc: FirmwareService) -> web.Response:
            raw = await read_body(request, BODY_MAX)
            if len(raw) > BODY_MAX:
                raise FirmwareError("invalid", f"body over {BODY_MAX} bytes")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise FirmwareError("invalid", f"body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise FirmwareError("invalid", "body is a JSON object")
            image = body.pop("image", None)
            groups = body.pop("groups", None)
            tags = body.pop("tags", None)
            dtype = body.pop("type", None)
            if not isinstance(image, str):
                raise FirmwareError("invalid", "body needs 'image' (an image id)")
            if isinstance(groups, dict) and tags is None and dtype is None:
                if not all(isinstance(v, list) for v in groups.values()):
                    raise FirmwareError("invalid", "'groups': {name: [device ids]}")
                selection = None
            elif isinstance(groups, list | None) and isinstance(tags, list | None):
                selection = {"groups": groups or [], "tags": tags or [], "type": dtype}
                groups = await svc.select(groups or [], tags or [], dtype)
            else:
                raise FirmwareError(
                    "invalid",
                    "'groups' is {name: [device ids]}, or registry group names "
                    "(a list) with 'tags' (a list) and 'type'",
                )
            try:
                camp = await svc.create(image, groups, selection=selection, **body)
            except TypeError as e:
                raise FirmwareError("invalid", str(e)) from None
            return _json({"campaign": camp.to_json()}, 201)

        return await self._call(go)

    async def _act(self, request: web.Request, action: str) -> web.Response:
        cid = request.match_info["id"]

        async def go(svc: FirmwareService) -> web.Response:
            camp = await svc.set_state(cid, action)  # type: ignore[arg-type]
            return _json({"campaign": camp.to_json()})

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def pause(self, request: web.Request) -> web.Response:
        """Pause a campaign: no device is started; those in flight finish."""
        return await self._act(request, "pause")

    @requires(Role.ENGINEER)
    async def resume(self, request: web.Request) -> web.Response:
        """Resume a paused or halted campaign."""
        return await self._act(request, "resume")

    @requires(Role.ENGINEER)
    async def abort(self, request: web.Request) -> web.Response:
        """Abort a campaign: its queued update commands are cancelled."""
        return await self._act(request, "abort")
