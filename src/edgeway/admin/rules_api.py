"""Admin API route for the rules' state (see docs/rules.md and docs/hmi.md).

``GET /api/rules``  (viewer)
    ``{"rules": [{"name", "enabled", "state", "when", "clear", "for",
    "cooldown", "active_devices", "pending_devices", "cooling_down_devices",
    "last_fired": {"device_id", "at"} | null, "step"}]}``: each configured
    rule, from the running pipeline (a reload's new rules at once).
    ``state`` is ``active`` (set for at least one device), ``idle`` or
    ``disabled``; ``pending`` counts devices whose condition holds and waits
    for its ``for``; ``cooling_down`` those inside ``cooldown`` after a set.
    ``503 disabled`` when no rule is configured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from edgeway.admin.access import requires
from edgeway.admin.errors import answer, error
from edgeway.admin.tokens import Role

if TYPE_CHECKING:
    from edgeway.rules.stage import RuleStage


class RuleRoutes:
    """``GET /api/rules``; ``stage()`` is the running pipeline's rules."""

    def __init__(self, stage: Callable[[], RuleStage | None]) -> None:
        self._stage = stage

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/rules", self.list)

    @requires(Role.VIEWER)
    async def list(self, request: web.Request) -> web.Response:
        """Each rule: settings, devices active, pending and cooling down, last firing."""
        stage = self._stage()
        if stage is None:
            return error(503, "disabled", "no rules are configured on this gateway (rules)")
        return answer({"rules": await stage.rules()})
