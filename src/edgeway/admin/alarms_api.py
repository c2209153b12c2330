"""Admin API routes for alarms (see docs/alarms.md).

``GET /api/alarms?state=&source=&limit=``  (role viewer)
    Alarms, most severe first. ``state``: ``shown`` (default: what an
    operator sees, not shelved, suppressed or out of service), ``all``,
    ``active``, ``unacked``, ``shelved``, ``suppressed``, ``out_of_service``.
``GET /api/alarms/{source}/{type}``  (role viewer)
    One alarm; ``404`` when it is normal (nothing kept).
``GET /api/alarms/{source}/{type}/history?limit=``  (role viewer)
    Its journaled transitions, newest first, each with who, when and comment.
``POST /api/alarms/{source}/{type}/raise``  (role operator)
    A manual alarm (an operator's, or a system without rules of its own):
    ``{"severity": 800 or "high", "message": "...", "values": {...}}``.
``POST /api/alarms/{source}/{type}/{action}``  (role operator)
    ``action``: ``ack``, ``confirm``, ``reset``, ``clear``, ``shelve``,
    ``unshelve``, ``suppress``, ``unsuppress``, ``out-of-service``,
    ``in-service``, ``comment`` (a note, journaled; needs ``comment``). Body ``{"comment": "...", "user": "..."}``; ``shelve``
    also takes ``"duration": "1h"`` or ``"one_shot": true``. Who acted is the
    token's name; under ``admin.auth: none`` (loopback only, no identity) the
    body's ``user``. ``200 {"alarm": {...}}`` once the transition is on disk.

Errors have the admin API's shape ``{"error": CODE, "message": TEXT}``:
``400 invalid``, ``404 not_found``, ``409 illegal`` (the alarm's state does
not allow it, e.g. acknowledging an acknowledged alarm), ``503 disabled``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from edgeway.admin.access import PRINCIPAL, requires
from edgeway.admin.errors import error as _error
from edgeway.admin.tokens import Role
from edgeway.alarms.model import BY_MAX, Action, Alarm, AlarmError, parse_severity
from edgeway.config_types import _parse_duration
from edgeway.streams import BodyError, read_json_object

if TYPE_CHECKING:
    from edgeway.alarms.service import AlarmService

BODY_MAX = 8 * 1024
"""Largest request body: a comment (1,024 characters) and a few fields."""
LIST_MAX = 10_000
"""Most alarms one listing returns (alarms.max_alarms defaults to 10,000)."""

_STATUS = {"invalid": 400, "not_found": 404, "illegal": 409, "full": 429, "disabled": 503}
_ACTIONS = {
    "raise": Action.RAISE,
    "ack": Action.ACK,
    "confirm": Action.CONFIRM,
    "reset": Action.RESET,
    "clear": Action.CLEAR,
    "shelve": Action.SHELVE,
    "unshelve": Action.UNSHELVE,
    "suppress": Action.SUPPRESS,
    "unsuppress": Action.UNSUPPRESS,
    "out-of-service": Action.OUT_OF_SERVICE,
    "in-service": Action.IN_SERVICE,
    "comment": Action.COMMENT,
}
_FIELDS = frozenset({"comment", "user", "duration", "one_shot", "severity", "message", "values"})


def _refused(e: AlarmError) -> web.Response:
    return _error(_STATUS.get(e.code, 400), e.code, str(e))


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (empty body: {}); AlarmError("invalid") otherwise."""
    try:
        body = await read_json_object(request.content, BODY_MAX, request.content_length)
    except BodyError as e:
        raise AlarmError("invalid", str(e)) from None
    unknown = set(body) - _FIELDS
    if unknown:
        raise AlarmError("invalid", f"unknown fields: {', '.join(sorted(unknown))}")
    return body


def _who(request: web.Request, body: dict[str, Any]) -> str:
    """The token's name or the logged-in user's; without tokens (loopback,
    auth none) the body's user."""
    principal = request.get(PRINCIPAL)
    token = principal.token if principal is not None else None
    if token is not None:
        return str(token.name)
    if principal is not None and principal.user is not None:
        return str(principal.user)  # an HMI session: never what the body claims
    user = body.get("user") or "anonymous"
    if not isinstance(user, str) or len(user) > BY_MAX:
        raise AlarmError("invalid", f"user must be a string of at most {BY_MAX} characters")
    return user


class AlarmRoutes:
    """The alarm endpoints; ``service()`` is the running gateway's alarms."""

    def __init__(self, service: Callable[[], AlarmService | None]) -> None:
        self._service = service

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/alarms", self.list)
        app.router.add_get("/api/alarms/{source}/{type}", self.show)
        app.router.add_get("/api/alarms/{source}/{type}/history", self.history)
        app.router.add_post("/api/alarms/{source}/{type}/{action}", self.act)

    def _svc(self) -> AlarmService:
        svc = self._service()
        if svc is None:
            raise AlarmError("disabled", "alarms are not enabled on this gateway (alarms.enabled)")
        return svc

    @requires(Role.VIEWER)
    async def list(self, request: web.Request) -> web.Response:
        """Alarms, filtered by ``?state=`` (default: those shown), ``?source=``, ``?limit=``."""
        q = request.query
        try:
            limit = min(int(q.get("limit", "1000")), LIST_MAX)
        except ValueError:
            return _error(400, "invalid", "limit must be an integer")
        try:
            alarms = self._svc().list(
                state=q.get("state", "shown"), source=q.get("source"), limit=limit
            )
        except AlarmError as e:
            return _refused(e)
        return _json({"alarms": [a.to_json() for a in alarms]})

    @requires(Role.VIEWER)
    async def show(self, request: web.Request) -> web.Response:
        """One alarm (source, type): its state, severity, occurrence and timestamps."""
        source, type_ = request.match_info["source"], request.match_info["type"]
        try:
            alarm = self._svc().get(source, type_)
        except AlarmError as e:
            return _refused(e)
        if alarm is None:
            return _error(404, "not_found", f"no alarm {source}/{type_} (it is normal)")
        return _alarm(alarm)

    @requires(Role.VIEWER)
    async def history(self, request: web.Request) -> web.Response:
        """An alarm's transitions, newest first (at most 1,000), each with who and the comment."""
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _error(400, "invalid", "limit must be an integer")
        try:
            records = await self._svc().history(
                request.match_info["source"], request.match_info["type"], limit
            )
        except AlarmError as e:
            return _refused(e)
        return _json({"transitions": [r.to_json() for r in records]})

    @requires(Role.OPERATOR)
    async def act(self, request: web.Request) -> web.Response:
        """An operator action on an alarm: ack, confirm, reset, clear, shelve, unshelve,
        suppress, unsuppress, out-of-service, in-service, comment or raise, with ``{"comment"}``."""
        source, type_ = request.match_info["source"], request.match_info["type"]
        name = request.match_info["action"]
        action = _ACTIONS.get(name)
        if action is None:
            return _error(404, "not_found", f"no alarm action {name!r} ({', '.join(_ACTIONS)})")
        try:
            svc = self._svc()
            body = await _body(request)
            by = _who(request, body)
            comment = body.get("comment") or ""
            if not isinstance(comment, str):
                raise AlarmError("invalid", "comment must be a string")
            alarm: Alarm | None
            if action is Action.RAISE:
                alarm = await svc.raise_alarm(
                    source,
                    type_,
                    severity=_severity(body.get("severity")),
                    message=body.get("message") or comment,
                    by=by,
                    values=body.get("values"),
                )
            elif action is Action.SHELVE:
                alarm = await svc.shelve(
                    source,
                    type_,
                    by=by,
                    comment=comment,
                    duration=_duration(body.get("duration")),
                    one_shot=body.get("one_shot") is True,
                )
            else:
                alarm = await svc.act(action, source, type_, by=by, comment=comment)
        except AlarmError as e:
            return _refused(e)
        if alarm is None:
            return _error(404, "not_found", f"no alarm {source}/{type_} (it is normal)")
        return _alarm(alarm)


def _severity(value: Any) -> int:
    try:
        return parse_severity(value)
    except ValueError as e:
        raise AlarmError("invalid", str(e)) from None


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(_parse_duration(value))
    except (TypeError, ValueError) as e:
        raise AlarmError("invalid", f"duration: {e}") from None


def _alarm(alarm: Alarm) -> web.Response:
    return _json({"alarm": alarm.to_json()})


_ALARM_FIGURES: tuple[tuple[str | None, str, str, bool, str], ...] = (
    # (part of the status (None: top level), key, metric, counter?, help)
    (None, "alarms", "edgeway_alarms_kept", False, "Alarms kept now (any state but normal)"),
    (None, "active", "edgeway_alarms_active", False, "Alarms active now"),
    (None, "unacked", "edgeway_alarms_unacknowledged", False, "Alarms not acknowledged"),
    (None, "shelved", "edgeway_alarms_shelved", False, "Alarms shelved"),
    (None, "suppressed", "edgeway_alarms_suppressed", False, "Alarms suppressed by design"),
    (None, "out_of_service", "edgeway_alarms_out_of_service", False, "Alarms out of service"),
    (None, "transitions", "edgeway_alarms_transitions", True, "Alarm transitions journaled"),
    (
        None,
        "annunciated",
        "edgeway_alarms_annunciated",
        True,
        "Alarms gone active while not shelved or suppressed",
    ),
    (
        "health",
        "rate_10m",
        "edgeway_alarms_rate_10m",
        False,
        "Alarms annunciated in the last 10 minutes",
    ),
    (
        "health",
        "in_flood",
        "edgeway_alarms_in_flood",
        False,
        "1 while alarms.flood_threshold is exceeded",
    ),
    (
        "health",
        "flood_seconds",
        "edgeway_alarms_flood_seconds",
        True,
        "Seconds spent in alarm flood",
    ),
    ("health", "floods", "edgeway_alarms_floods", True, "Alarm floods begun"),
    (
        "health",
        "standing",
        "edgeway_alarms_standing",
        False,
        "Alarms active longer than alarms.standing_after",
    ),
)


def alarm_metrics(alarms: dict[str, Any] | None) -> Iterator[Any]:
    """The alarm service's counters and the alarm-system health figures
    (ISA-18.2: rate per 10 minutes, time in flood, most frequent, standing)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if alarms is None:
        return
    health = alarms.get("health") or {}
    for part, key, name, counter, help_text in _ALARM_FIGURES:
        figures = alarms if part is None else health
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, help_text)
        family.add_metric([], float(figures.get(key) or 0))
        yield family
    r = CounterMetricFamily(
        "edgeway_alarms_refused", "Alarm requests refused, by reason", labels=["reason"]
    )
    for reason in ("full", "illegal", "invalid"):
        r.add_metric([reason], float(alarms.get(f"refused_{reason}", 0)))
    yield r
    top = GaugeMetricFamily(
        "edgeway_alarms_most_frequent",
        "The 10 most frequent alarms: annunciations in the last 24 hours",
        labels=["source", "type"],
    )
    for source, type_, n in health.get("top") or []:
        top.add_metric([str(source), str(type_)], float(n))
    yield top
