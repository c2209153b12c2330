"""Admin API routes for the model registry (see docs/models.md).

``GET /api/models``  (viewer)
    Every model's slots, figures and versions.
``GET /api/models/{name}``  (viewer)
    One model: slots, figures, versions and its last lifecycle events.
``PUT /api/models/{name}/versions/{version}``  (engineer)
    Upload: the body is the ONNX file, streamed to disk (never held in
    memory); headers ``X-Model-SHA256`` (hex, checked) and
    ``X-Model-Signature`` (base64 Ed25519, see :mod:`edgeway.ml.store`);
    ``?note=``. ``201 {"version": {...}}``.
``DELETE /api/models/{name}/versions/{version}``  (engineer)
    Remove a version no slot uses.
``POST /api/models/{name}/activate``  ``{"version": V}``  (engineer)
``POST /api/models/{name}/candidate``  ``{"version": V, "mode": "shadow"|"canary", "share": 0.1}``  (engineer)
``DELETE /api/models/{name}/candidate``  (engineer)
``POST /api/models/{name}/promote``  (engineer)
``POST /api/models/{name}/rollback``  ``{"reason": TEXT}``  (engineer)
    Each answers ``{"slots": {...}}`` once the change is on disk and loaded.

Errors: ``{"error": CODE, "message": TEXT}``; ``400 invalid``,
``404 not_found``, ``409 exists|in_use``, ``413 too_large``,
``422 load_failed|digest_mismatch|bad_signature|unsigned``, ``503 disabled|unavailable``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from edgeway.admin.access import PRINCIPAL, requires
from edgeway.admin.errors import answer as _json
from edgeway.admin.errors import error as _error
from edgeway.admin.errors import read_body
from edgeway.admin.tokens import Role

if TYPE_CHECKING:
    from edgeway.ml.manager import ModelManager

BODY_MAX = 64 * 1024
"""Largest JSON body of a lifecycle request."""
EVENTS_LISTED = 50
"""Lifecycle events ``GET /api/models`` lists (the HMI's rollback history)."""

_STATUS = {
    "invalid": 400,
    "not_found": 404,
    "exists": 409,
    "in_use": 409,
    "too_large": 413,
    "load_failed": 422,
    "digest_mismatch": 422,
    "bad_signature": 422,
    "unsigned": 422,
    "disabled": 503,
    "unavailable": 503,
}


def _who(request: web.Request) -> str:
    principal = request.get(PRINCIPAL)
    token = principal.token if principal is not None else None
    return f"api:{token.name}" if token is not None else "api"


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request, BODY_MAX)
    if len(raw) > BODY_MAX:
        raise _Bad("invalid", f"body over {BODY_MAX} bytes")
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as e:
        raise _Bad("invalid", f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _Bad("invalid", "body must be a JSON object")
    return body


class _Bad(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ModelRoutes:
    """The model registry endpoints; ``manager()`` is the running gateway's."""

    def __init__(self, manager: Callable[[], ModelManager | None]) -> None:
        self._manager = manager

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/models", self.list)
        r.add_get("/api/models/{name}", self.show)
        r.add_put("/api/models/{name}/versions/{version}", self.upload)
        r.add_delete("/api/models/{name}/versions/{version}", self.remove)
        r.add_post("/api/models/{name}/activate", self.activate)
        r.add_post("/api/models/{name}/candidate", self.candidate)
        r.add_delete("/api/models/{name}/candidate", self.clear_candidate)
        r.add_post("/api/models/{name}/promote", self.promote)
        r.add_post("/api/models/{name}/rollback", self.rollback)

    async def _call(self, fn: Callable[[ModelManager], Any]) -> web.Response:
        from edgeway.ml.store import ModelError

        mgr = self._manager()
        if mgr is None:
            return _error(
                503, "disabled", "models are not enabled on this gateway (models.enabled)"
            )
        try:
            return _json(await fn(mgr))
        except ModelError as e:
            return _error(_STATUS.get(e.code, 400), e.code, str(e))
        except _Bad as e:
            return _error(_STATUS.get(e.code, 400), e.code, str(e))

    @requires(Role.VIEWER)
    async def list(self, request: web.Request) -> web.Response:
        """Every model's slots, figures and versions, and the last 50 lifecycle
        events of all models (activations, promotions, rollbacks), newest first."""

        async def go(mgr: ModelManager) -> Any:
            versions = await mgr.store.versions()
            st = mgr.status()
            events = await mgr.store.events(None, EVENTS_LISTED)
            return {**st, "versions": [v.to_json() for v in versions], "events": events}

        return await self._call(go)

    @requires(Role.VIEWER)
    async def show(self, request: web.Request) -> web.Response:
        """One model: slots, figures, versions and its last lifecycle events."""
        name = request.match_info["name"]

        async def go(mgr: ModelManager) -> Any:
            from edgeway.ml.store import ModelError

            versions = await mgr.store.versions(name)
            entry = mgr.status()["models"].get(name)
            if not versions and entry is None:
                raise ModelError("not_found", f"no model {name!r}")
            return {
                "name": name,
                "slots": entry,
                "versions": [v.to_json() for v in versions],
                "events": await mgr.store.events(name, 50),
            }

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def upload(self, request: web.Request) -> web.Response:
        """Upload a version: the body is the ONNX file (``X-Model-SHA256``, ``X-Model-Signature``)."""
        name, version = request.match_info["name"], request.match_info["version"]
        sig_text = request.headers.get("X-Model-Signature")
        signature: bytes | None = None
        if sig_text:
            try:
                signature = base64.b64decode(sig_text, validate=True)
            except (binascii.Error, ValueError):
                return _error(400, "invalid", "X-Model-Signature is not base64")

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(256 * 1024):
                yield chunk

        async def go(mgr: ModelManager) -> Any:
            from edgeway.ml.store import ModelError

            length = request.content_length
            if length is not None and length > mgr.store.max_size:
                raise ModelError(
                    "too_large", f"model over models.max_size ({mgr.store.max_size} bytes)"
                )
            record = await mgr.store.add(
                name,
                version,
                chunks(),
                sha256=request.headers.get("X-Model-SHA256"),
                signature=signature,
                by=_who(request),
                note=request.query.get("note", "")[:500],
            )
            return {"version": record.to_json()}

        resp = await self._call(go)
        if resp.status == 200:
            resp.set_status(201)
        return resp

    @requires(Role.ENGINEER)
    async def remove(self, request: web.Request) -> web.Response:
        """Remove a version no slot uses."""
        name, version = request.match_info["name"], request.match_info["version"]

        async def go(mgr: ModelManager) -> Any:
            await mgr.store.remove(name, version, by=_who(request))
            return {"removed": {"name": name, "version": version}}

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def activate(self, request: web.Request) -> web.Response:
        """Make a version the active one (``{"version": V}``)."""
        name = request.match_info["name"]

        async def go(mgr: ModelManager) -> Any:
            body = await _body(request)
            version = body.get("version")
            if not isinstance(version, str):
                raise _Bad("invalid", "body needs a version")
            slots = await mgr.activate(name, version, by=_who(request))
            return {"slots": slots.to_json()}

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def candidate(self, request: web.Request) -> web.Response:
        """Run a version beside the active one (``{"version", "mode": shadow|canary, "share"}``)."""
        name = request.match_info["name"]

        async def go(mgr: ModelManager) -> Any:
            body = await _body(request)
            version, mode, share = body.get("version"), body.get("mode"), body.get("share", 0.0)
            if not isinstance(version, str) or mode not in ("shadow", "canary"):
                raise _Bad("invalid", "body needs a version and mode shadow or canary")
            if isinstance(share, bool) or not isinstance(share, int | float):
                raise _Bad("invalid", "share is a number between 0 and 1")
            slots = await mgr.set_candidate(
                name, version, mode, share=float(share), by=_who(request)
            )
            return {"slots": slots.to_json()}

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def clear_candidate(self, request: web.Request) -> web.Response:
        """Stop the candidate."""
        name = request.match_info["name"]

        async def go(mgr: ModelManager) -> Any:
            return {"slots": (await mgr.clear_candidate(name, by=_who(request))).to_json()}

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def promote(self, request: web.Request) -> web.Response:
        """Make the candidate the active version."""
        name = request.match_info["name"]

        async def go(mgr: ModelManager) -> Any:
            return {"slots": (await mgr.promote(name, by=_who(request))).to_json()}

        return await self._call(go)

    @requires(Role.ENGINEER)
    async def rollback(self, request: web.Request) -> web.Response:
        """Go back to the previous active version (``{"reason": TEXT}``)."""
        name = request.match_info["name"]

        async def go(mgr: ModelManager) -> Any:
            body = await _body(request)
            reason = str(body.get("reason", ""))[:500]
            return {"slots": (await mgr.rollback(name, by=_who(request), reason=reason)).to_json()}

        return await self._call(go)
