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
refusal log lines instead.

**Reasons.** Any changing request may say why in the ``X-Edgeway-Reason``
header: UTF-8, percent-encoded (``encodeURIComponent`` in a browser; plain
ASCII passes as it is), at most :data:`REASON_MAX` characters. It is kept in
the entry's ``detail.reason`` (and shown as ``reason``). A header rather than
a body field because bodies differ by route (JSON, YAML, CSV, a firmware
image) and a header reaches the audit without reading them. A reason that is
too long or not UTF-8 is refused with ``400 invalid`` before the route runs. Request bodies are not recorded: they may hold
secrets (a configuration's passwords); the configuration history keeps
applied configurations.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from edgeway.admin.access import PRINCIPAL, requires
from edgeway.admin.errors import error
from edgeway.admin.tokens import Role
from edgeway.logs import printable

if TYPE_CHECKING:
    from edgeway.audit import AuditLog

log = logging.getLogger("edgeway.admin")

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REASON_HEADER = "X-Edgeway-Reason"
REASON_MAX = 500
"""Characters of a reason kept (a sentence or two: why, a ticket number)."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_reason(request: web.Request) -> str | None:
    """The request's ``X-Edgeway-Reason``, decoded (None: none given);
    ValueError when it is not percent-encoded UTF-8 or is too long."""
    raw = request.headers.get(REASON_HEADER)
    if raw is None or not raw.strip():
        return None
    try:
        text = urllib.parse.unquote(raw.strip(), errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{REASON_HEADER} is not percent-encoded UTF-8") from None
    if len(text) > REASON_MAX:
        raise ValueError(f"{REASON_HEADER} is over {REASON_MAX} characters")
    return printable(text)


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
        try:
            reason = request_reason(request)
        except ValueError as e:
            return error(400, "invalid", str(e))
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
                    target="/".join(v for k, v in request.match_info.items() if k != "action"),
                    source=request.remote or "",
                    status=status,
                    detail={"reason": reason} if reason else None,
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
