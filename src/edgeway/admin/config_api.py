"""Admin API routes for the configuration in force: show, apply, reload,
history, rollback (see docs/reload.md).

``GET /api/config``  (role engineer: the text may hold credentials)
    ``{"sha256", "source", "text"}`` of the configuration in force.
``POST /api/config``  (role engineer)
    Body: the whole configuration as YAML (``Content-Type: application/yaml``
    or ``text/plain``, at most :data:`BODY_MAX`). Validated like ``edgeway
    check`` (the gateway's command-line flags apply on top, as at start), then
    applied live. ``200 {"applied": true, "changes": [...], "sha256"}``;
    ``400 {"error": "invalid", "issues": [...]}`` when it does not validate;
    ``409 {"error": "not_applied", "message"}`` when it needs a restart, or
    ``{"error": "rolled_back", ...}`` when it failed to start or stay healthy
    and the previous configuration is back.
``POST /api/config/reload``  (role engineer)
    Read the configuration file again and apply it (what SIGHUP does).
``GET /api/config/history``  (role viewer)
    The last applied configurations, newest first: number, time, source, sha256.
``POST /api/config/rollback``  (role engineer)
    Body ``{"number": N}`` (absent: the one before the current one).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from edgeway.admin.access import PRINCIPAL, requires
from edgeway.admin.errors import answer as _json
from edgeway.admin.errors import read_body
from edgeway.admin.tokens import Role
from edgeway.config import Config

BODY_MAX = 1024 * 1024
"""Largest configuration text taken (a site's configuration is tens of KB)."""


class ConfigControl(Protocol):
    """What the gateway offers the API (implemented by Gateway)."""

    config: Config
    config_text: str | None
    config_source: str
    config_overrides: Any

    async def apply_text(self, text: str, source: str, filename: str = "<api>") -> list[str]: ...

    async def reload_from_file(self, source: str) -> list[str]: ...

    async def rollback(self, number: int | None = None) -> list[str]: ...


def _applied(control: ConfigControl, changes: list[str]) -> web.Response:
    from edgeway.runtime.reload import text_hash

    text = control.config_text
    return _json(
        {
            "applied": True,
            "changes": changes,
            "sha256": text_hash(text) if text is not None else None,
        }
    )


async def _body_text(request: web.Request) -> str | web.Response:
    """The request's body as text, or the error to answer."""
    raw = await read_body(request, BODY_MAX)
    if len(raw) > BODY_MAX:
        return _json({"error": "too_large", "message": f"over {BODY_MAX} bytes"}, 413)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _json({"error": "invalid", "message": "the body is not UTF-8"}, 400)


def _issues(text: str, overrides: Any) -> list[str]:
    """What ``edgeway check`` would say of ``text`` (empty: valid)."""
    from edgeway.config import ConfigError, parse_config_lines
    from edgeway.validate import check_config

    try:
        cfg, lines = parse_config_lines(text, "<api>")
        if overrides is not None:
            cfg = overrides(cfg)
        return [str(i) for i in check_config(cfg, lines)]
    except ConfigError as e:
        return [str(i) for i in e.issues]
    except ValueError as e:
        return [str(e)]


def _source(request: web.Request, machine: str) -> str:
    """The history's ``source`` for a change: ``machine`` (``api``) for a
    token or no authentication, ``user:NAME`` for a person logged in to the
    HMI, so the history tells who changed the configuration."""
    principal = request.get(PRINCIPAL)
    if principal is not None and principal.user is not None:
        return f"user:{principal.user}"
    return machine


class ConfigRoutes:
    """The configuration endpoints; ``control()`` is the running gateway."""

    def __init__(self, control: Any) -> None:
        self._control = control

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/config", self.show)
        app.router.add_post("/api/config", self.apply)
        app.router.add_post("/api/config/validate", self.validate)
        app.router.add_post("/api/config/reload", self.reload)
        app.router.add_get("/api/config/history", self.history)
        app.router.add_post("/api/config/rollback", self.rollback)

    def _get(self) -> ConfigControl | None:
        control: ConfigControl | None = self._control()
        return control

    async def _run(self, action: Any) -> web.Response:
        from edgeway.runtime.reload import ReloadError

        control = self._get()
        if control is None:
            return _json({"error": "unavailable", "message": "the gateway is not running"}, 503)
        try:
            changes = await action(control)
        except ReloadError as e:
            if e.issues:
                return _json(
                    {
                        "error": "invalid",
                        "message": str(e),
                        "issues": [str(i) for i in e.issues],
                    },
                    400,
                )
            code = "rolled_back" if e.rolled_back else "not_applied"
            return _json({"error": code, "message": str(e)}, 409)
        return _applied(control, changes)

    @requires(Role.ENGINEER)
    async def show(self, request: web.Request) -> web.Response:
        """The configuration in force: its text, source and sha256."""
        from edgeway.runtime.reload import text_hash

        control = self._get()
        if control is None:
            return _json({"error": "unavailable", "message": "the gateway is not running"}, 503)
        text = control.config_text
        return _json(
            {
                "sha256": text_hash(text) if text is not None else None,
                "source": control.config_source,
                "text": text,
            }
        )

    @requires(Role.ENGINEER)
    async def apply(self, request: web.Request) -> web.Response:
        """Validate a whole configuration (YAML body) and apply it live, with rollback."""
        text = await _body_text(request)
        if isinstance(text, web.Response):
            return text
        source = _source(request, "api")
        return await self._run(lambda c: c.apply_text(text, source, "<api>"))

    @requires(Role.ENGINEER)
    async def validate(self, request: web.Request) -> web.Response:
        """Check a whole configuration (YAML body) as apply would, without applying it.

        ``200 {"valid": true}`` or ``400 {"error": "invalid", "issues": [...]}``.
        """
        text = await _body_text(request)
        if isinstance(text, web.Response):
            return text
        control = self._get()
        overrides = control.config_overrides if control is not None else None
        issues = await asyncio.to_thread(_issues, text, overrides)
        if issues:
            return _json(
                {"error": "invalid", "message": "the configuration does not validate",
                 "issues": issues},
                400,
            )  # fmt: skip
        return _json({"valid": True})

    @requires(Role.ENGINEER)
    async def reload(self, request: web.Request) -> web.Response:
        """Read the configuration file again and apply it (what SIGHUP does)."""
        source = _source(request, "api-reload")
        return await self._run(lambda c: c.reload_from_file(source))

    @requires(Role.VIEWER)
    async def history(self, request: web.Request) -> web.Response:
        """The last applied configurations, newest first."""
        from edgeway.runtime.reload import ConfigHistory

        control = self._get()
        if control is None:
            return _json({"error": "unavailable", "message": "the gateway is not running"}, 503)
        history = ConfigHistory(Path(control.config.gateway.data_dir))
        entries = await asyncio.to_thread(history.entries)
        return _json({"history": [e.to_json() for e in entries]})

    @requires(Role.ENGINEER)
    async def rollback(self, request: web.Request) -> web.Response:
        """Apply a configuration from the history (``{"number": N}``)."""
        raw = await read_body(request, 4095)
        number: int | None = None
        if raw.strip():
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return _json({"error": "invalid", "message": "body must be JSON"}, 400)
            n = doc.get("number") if isinstance(doc, dict) else None
            if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
                return _json({"error": "invalid", "message": "number must be an integer"}, 400)
            number = n
        return await self._run(lambda c: c.rollback(number))
