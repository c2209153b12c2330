"""Admin API routes for provisioning keys (see docs/devices.md#auto-provisioning).

``GET /api/provisioning/keys``  (engineer)
    ``{"keys": [{"id", "state", "groups", "template", "id_pattern",
    "rate_per_minute", "expires", "max_uses", "uses", "reprovision", ...}]}``
    (never a secret).
``POST /api/provisioning/keys``  (engineer)
    Body ``{"id", "groups", "template": {"type", "tags", "metadata", "kinds"},
    "id_pattern", "rate_per_minute", "expires_in" (seconds), "max_uses",
    "reprovision"}``: ``201 {"key": {...}, "secret": "ID:SECRET"}``, the only
    time the secret is shown; ``409 exists``.
``POST /api/provisioning/keys/{id}/rotate``  (engineer)
    Body ``{"grace": SECONDS}`` (default one day): ``200 {"key", "secret"}``;
    the previous secret works until the grace ends.
``POST /api/provisioning/keys/{id}/revoke``  (engineer)
    ``200 {"key": {...}}``: refused from now on.

Engineer, not operator: a key lets anyone holding it add devices to the
site's groups, which is a configuration change, not an operation. Every
change is in the audit log (the middleware: who, route, status; never the
secret). The store is the gateway's ``provisioning.db``, opened per request
on a worker thread (a few milliseconds; these are rare administrative calls),
which the running gateway re-reads when it changed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from edgeway.admin.access import requires
from edgeway.admin.errors import answer, error
from edgeway.admin.tokens import Role
from edgeway.devices.credentials import CredentialError
from edgeway.devices.provisioning import DEFAULT_GRACE, ProvisioningError, ProvisioningKeys
from edgeway.devices.provisioning_cli import key_fields
from edgeway.streams import BodyError, read_json_object

T = TypeVar("T")
BODY_MAX = 16 * 1024
"""Largest JSON body: a key's template holds at most 4 KiB of metadata."""

Handler = Callable[["ProvisioningRoutes", web.Request], Awaitable[web.StreamResponse]]


def _answers_refusals(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(self: ProvisioningRoutes, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except ProvisioningError as e:
            return error(e.status, e.code, str(e))
        except CredentialError as e:
            return error(503, "unavailable", str(e))

    return wrapped


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        return await read_json_object(request.content, BODY_MAX)
    except BodyError as e:
        raise ProvisioningError("invalid", str(e)) from None


class ProvisioningRoutes:
    """The provisioning key endpoints of a gateway whose data directory is ``data_dir``."""

    def __init__(self, data_dir: Path | None) -> None:
        self._data_dir = data_dir

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/provisioning/keys", self.list)
        app.router.add_post("/api/provisioning/keys", self.add)
        app.router.add_post("/api/provisioning/keys/{key_id}/rotate", self.rotate)
        app.router.add_post("/api/provisioning/keys/{key_id}/revoke", self.revoke)

    async def _with_keys(self, fn: Callable[[ProvisioningKeys], T]) -> T:
        data_dir = self._data_dir
        if data_dir is None:
            raise ProvisioningError("not_found", "this admin server has no data directory")

        def run() -> T:
            keys = ProvisioningKeys.open(data_dir)
            try:
                return fn(keys)
            finally:
                keys.close()

        return await asyncio.to_thread(run)

    async def _with_secret(
        self, key_id: str, make: Callable[[ProvisioningKeys], str], status: int
    ) -> web.Response:
        """Run ``make`` (which returns a new secret) and answer the key with
        its ``ID:SECRET``, the only time it is shown (not cached)."""

        def run(k: ProvisioningKeys) -> tuple[dict[str, Any], str]:
            secret = make(k)
            key = k.get(key_id)
            assert key is not None
            return key.to_json(), secret

        key, secret = await self._with_keys(run)
        response = answer({"key": key, "secret": f"{key_id}:{secret}"}, status)
        response.headers["Cache-Control"] = "no-store"
        return response

    @requires(Role.ENGINEER)
    @_answers_refusals
    async def list(self, request: web.Request) -> web.StreamResponse:
        """The provisioning keys, without secrets: ``{"keys": [...]}``."""
        keys = await self._with_keys(lambda k: [key.to_json() for key in k.list()])
        return answer({"keys": keys})

    @requires(Role.ENGINEER)
    @_answers_refusals
    async def add(self, request: web.Request) -> web.StreamResponse:
        """Make a provisioning key; the answer shows its secret, this once.

        Body ``{"id", "groups", "template", "id_pattern", "rate_per_minute",
        "expires_in", "max_uses", "reprovision"}`` (only ``id`` required):
        ``201 {"key": {...}, "secret": "ID:SECRET"}``; 409 when it exists."""
        body = await _json_body(request)
        key_id = body.get("id")
        if not isinstance(key_id, str):
            raise ProvisioningError("invalid", "id: a string")
        fields = key_fields(body)
        return await self._with_secret(key_id, lambda k: k.add(key_id, **fields), 201)

    @requires(Role.ENGINEER)
    @_answers_refusals
    async def rotate(self, request: web.Request) -> web.StreamResponse:
        """A new secret for a key; the previous one keeps working for
        ``grace`` seconds (body ``{"grace": S}``, default one day; 0: at once)."""
        key_id = request.match_info["key_id"]
        body = await _json_body(request)
        grace = body.get("grace", DEFAULT_GRACE)
        if not isinstance(grace, int | float) or isinstance(grace, bool):
            raise ProvisioningError("invalid", "grace: seconds")
        return await self._with_secret(key_id, lambda k: k.rotate(key_id, float(grace)), 200)

    @requires(Role.ENGINEER)
    @_answers_refusals
    async def revoke(self, request: web.Request) -> web.StreamResponse:
        """Refuse a key from now on (devices it enrolled keep their credentials)."""
        key_id = request.match_info["key_id"]

        def revoke(k: ProvisioningKeys) -> dict[str, Any]:
            k.revoke(key_id)
            key = k.get(key_id)
            assert key is not None
            return key.to_json()

        return answer({"key": await self._with_keys(revoke)})
