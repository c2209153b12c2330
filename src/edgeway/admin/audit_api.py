"""The admin API's audit trail: every change request recorded, and read back.

``GET /api/audit?limit=&before=&action=``  (role operator)
    ``200 {"entries": [{"id", "at", "who", "source", "action", "target",
    "status", "detail"}, ...]}``, newest first; page with ``before`` = the
    last ``id`` seen; ``action`` keeps entries whose action starts with it
    (``POST /api/commands``, ``credentials``).

Every request other than GET, HEAD and OPTIONS that passed the access checks
is recorded (:meth:`AuditRoutes.middleware`, which runs inside
:class:`~edgeway.admin.access.AccessControl`'s): who (the token's id and
name, the HMI user, or ``local`` under ``admin.auth: none``), the method and path, the
peer address, and the answer's status, committed before the answer leaves.
A request refused by the access checks changes nothing and is in the
refusal log lines instead. Request bodies are not recorded: they may hold
secrets (a configuration's passwords); the configuration history keeps
applied configurations.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from edgeway.admin.access import PRINCIPAL, requires
from edgeway.admin.tokens import Role

if TYPE_CHECKING:
    from edgeway.audit import AuditLog

log = logging.getLogger("edgeway.admin")

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_actor(request: web.Request) -> str:
    """Who made an admin API request, for the audit log (never the secret)."""
    principal = request.get(PRINCIPAL)
    if principal is None:
        return "unknown"
    token = principal.token
    if token is not None:
        return f"token:{token.id} ({token.name}, {token.role.label})"
    if principal.user is not None:
        return f"user:{principal.user} ({principal.role.label})"  # an HMI session
    return "local (admin.auth: none)"


class AuditRoutes:
    """``GET /api/audit`` and the recording middleware."""

    def __init__(self, audit: Callable[[], AuditLog | None]) -> None:
        self._audit = audit

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/audit", self.list)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        audit = self._audit()
        if audit is None or request.method in READ_METHODS or PRINCIPAL not in request:
            return await handler(request)
        status: int | None = None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            try:
                await audit.record(
                    request_actor(request),
                    f"{request.method} {request.path}",
                    target=request.match_info.get("device_id", "")
                    or request.match_info.get("command_id", ""),
                    source=request.remote or "",
                    status=status,
                )
            except Exception:
                log.exception("audit log: recording %s %s failed", request.method, request.path)

    @requires(Role.OPERATOR)
    async def list(self, request: web.Request) -> web.Response:
        """The audit log, newest first: who changed what, when, from where.

        Query: ``limit`` (at most 1000, default 100), ``before`` (an entry id:
        older entries, for paging), ``action`` (a prefix of the action, e.g.
        ``POST /api/config`` or ``credentials``). Answer ``{"entries": [{"id",
        "at", "who", "source", "action", "target", "status", "detail"}]}``."""
        audit = self._audit()
        if audit is None:
            return web.json_response({"error": "disabled", "message": "no audit log"}, status=503)
        try:
            limit = int(request.query.get("limit", "100"))
            before_text = request.query.get("before")
            before = int(before_text) if before_text else None
        except ValueError:
            return web.json_response(
                {"error": "invalid", "message": "limit and before must be integers"}, status=400
            )
        entries = await audit.entries(
            limit=limit, before=before, action=request.query.get("action") or None
        )
        return web.json_response({"entries": [e.to_json_obj() for e in entries]})
