"""Admin API routes for commands to devices (see docs/commands.md).

``POST /api/devices/{device_id}/commands``  (role operator)
    Body ``{"name": "stop", "params": {...}, "ttl": "5m", "timeout": "30s",
    "idempotency_key": "..."}`` (an ``Idempotency-Key`` header works too).
    ``202 {"command": {...}}`` once the command is on disk (QUEUED); ``200``
    with the same command when the idempotency key was seen before. With
    ``?wait=SECONDS`` (at most 300) the answer waits until the command
    finished or the time is up, and gives its state then.
``GET /api/commands?device_id=&state=&limit=&before=``  (role viewer)
    Commands, newest first; page with ``before`` = the last ``seq`` seen.
``GET /api/devices/{device_id}/commands``  (role viewer)
    The same for one device.
``GET /api/commands/{id}[?wait=SECONDS]``  (role viewer)
    One command; ``wait`` as above.
``POST /api/commands/{id}/cancel``  (role operator)
    Cancel an unfinished command; a finished one is returned unchanged.

Errors have the admin API's shape ``{"error": CODE, "message": TEXT}``:
``400 invalid`` (with what is wrong), ``404 not_found``, ``429 queue_full``
(the device's queue holds ``commands.max_per_device``), ``503 disabled``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from edgeway.admin.access import PRINCIPAL, requires
from edgeway.admin.errors import error as _error
from edgeway.admin.errors import read_body
from edgeway.admin.tokens import Role
from edgeway.config_types import _parse_duration

if TYPE_CHECKING:
    from edgeway.commands.model import Command
    from edgeway.commands.service import CommandService

WAIT_MAX = 300.0
"""Longest ``?wait`` an API caller may hold a request open (seconds)."""
BODY_MAX = 256 * 1024
"""Largest request body: params are capped at commands.max_params_bytes
(64 KiB by default); the rest is room for the envelope."""

_STATUS = {"invalid": 400, "not_found": 404, "queue_full": 429, "disabled": 503}


def _command(cmd: Command, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps({"command": cmd.to_json()}),
        status=status,
        content_type="application/json",
    )


def _seconds(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        return float(_parse_duration(value))
    except ValueError as e:
        raise _Refused(400, "invalid", f"{name}: {e}") from None


def _wait_arg(request: web.Request) -> float | None:
    raw = request.query.get("wait")
    if raw is None:
        return None
    seconds = _seconds(raw, "wait")
    return None if seconds is None else min(max(seconds, 0.0), WAIT_MAX)


class _Refused(Exception):
    """A request answered with an error before it reached the queue."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = _error(status, code, message)


def _answers_refusals(
    handler: Callable[[CommandRoutes, web.Request], Awaitable[web.Response]],
) -> Callable[[CommandRoutes, web.Request], Awaitable[web.Response]]:
    @functools.wraps(handler)
    async def wrapped(self: CommandRoutes, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except _Refused as e:
            return e.response

    return wrapped


class CommandRoutes:
    """The command endpoints; ``service()`` is the running gateway's queue."""

    def __init__(self, service: Callable[[], CommandService | None]) -> None:
        self._service = service

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/api/devices/{device_id}/commands", self.send)
        app.router.add_get("/api/devices/{device_id}/commands", self.device_list)
        app.router.add_get("/api/commands", self.list)
        app.router.add_get("/api/commands/{command_id}", self.show)
        app.router.add_post("/api/commands/{command_id}/cancel", self.cancel)

    def _svc(self) -> CommandService:
        svc = self._service()
        if svc is None:
            raise _Refused(503, "disabled", "commands are not enabled on this gateway")
        return svc

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def send(self, request: web.Request) -> web.Response:
        """Queue a command for a device (``?wait=S`` waits for its end)."""
        from edgeway.commands.service import CommandError

        svc = self._svc()
        if request.content_length is not None and request.content_length > BODY_MAX:
            return _error(413, "too_large", f"body over {BODY_MAX} bytes")
        raw = await read_body(request, BODY_MAX)
        if len(raw) > BODY_MAX:
            return _error(413, "too_large", f"body over {BODY_MAX} bytes")
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as e:
            return _error(400, "invalid", f"body is not JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "invalid", "body must be a JSON object")
        unknown = set(body) - {"name", "params", "ttl", "timeout", "idempotency_key"}
        if unknown:
            return _error(400, "invalid", f"unknown fields: {', '.join(sorted(unknown))}")
        principal = request.get(PRINCIPAL)
        source = principal.source if principal is not None else "api"
        key = body.get("idempotency_key") or request.headers.get("Idempotency-Key")
        try:
            cmd, new = await svc.submit(
                request.match_info["device_id"],
                body.get("name"),  # type: ignore[arg-type]
                body.get("params"),
                ttl=_seconds(body.get("ttl"), "ttl"),
                result_timeout=_seconds(body.get("timeout"), "timeout"),
                idempotency_key=key,
                source=source,
            )
        except CommandError as e:
            return _error(_STATUS.get(e.code, 400), e.code, str(e))
        wait = _wait_arg(request)
        if wait:
            cmd = await svc.wait(cmd.id, wait)
            return _command(cmd, 200)
        return _command(cmd, 202 if new else 200)

    async def _list(self, request: web.Request, device_id: str | None) -> web.Response:
        svc = self._svc()
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
            before = int(q["before"]) if "before" in q else None
        except ValueError:
            return _error(400, "invalid", "limit and before must be integers")
        state = q.get("state")
        cmds = await svc.list(
            device_id=device_id or q.get("device_id"), state=state, limit=limit, before_seq=before
        )
        body = {
            "commands": [{**c.to_json(), "seq": c.seq} for c in cmds],
            "next_before": cmds[-1].seq if len(cmds) == max(1, min(limit, 1000)) else None,
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    @requires(Role.VIEWER)
    @_answers_refusals
    async def list(self, request: web.Request) -> web.Response:
        """Commands, newest first (``device_id``, ``state``, ``limit``, ``before``)."""
        return await self._list(request, None)

    @requires(Role.VIEWER)
    @_answers_refusals
    async def device_list(self, request: web.Request) -> web.Response:
        """One device's commands, newest first."""
        return await self._list(request, request.match_info["device_id"])

    @requires(Role.VIEWER)
    @_answers_refusals
    async def show(self, request: web.Request) -> web.Response:
        """One command (``?wait=S`` waits for its end)."""
        from edgeway.commands.service import CommandError

        svc = self._svc()
        cid = request.match_info["command_id"]
        wait = _wait_arg(request)
        try:
            cmd = await svc.wait(cid, wait) if wait else await svc.get(cid)
        except CommandError as e:
            return _error(_STATUS.get(e.code, 400), e.code, str(e))
        if cmd is None:
            return _error(404, "not_found", f"no command {cid!r}")
        return _command(cmd)

    @requires(Role.OPERATOR)
    @_answers_refusals
    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel an unfinished command."""
        from edgeway.commands.service import CommandError

        svc = self._svc()
        try:
            cmd = await svc.cancel(request.match_info["command_id"])
        except CommandError as e:
            return _error(_STATUS.get(e.code, 400), e.code, str(e))
        return _command(cmd)
