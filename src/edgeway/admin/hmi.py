"""The HMI's routes: its pages and assets, log-in, live device data, the
live channel (SSE) and recent logs (see docs/hmi.md).

Pages and assets (``/``, ``/hmi/NAME``, ``/api/docs``) are public: they are
the same files for everyone and hold no data; every figure they show comes
from an ``/api/`` route that checks the caller's role.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from edgeway.admin.access import PRINCIPAL, AccessControl, public, requires
from edgeway.admin.build import process_figures
from edgeway.admin.errors import error, read_body
from edgeway.admin.recent import (
    TREND_POINTS_MAX,
    DeviceEntry,
    RecentValues,
    min_max_downsample,
)
from edgeway.admin.sessions import COOKIE, LOGIN_CONCURRENT, LoginLimiter
from edgeway.admin.tokens import Role
from edgeway.admin.users import PASSWORD_MAX, UserStoreError
from edgeway.logs import printable

if TYPE_CHECKING:
    from pathlib import Path

    from edgeway.outbox.store import Outbox

log = logging.getLogger("edgeway.admin")

ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "charts.js": "text/javascript",
    "pages.js": "text/javascript",
    "models.js": "text/javascript",
    "registry.js": "text/javascript",
    "alarms.js": "text/javascript",
    "firmware.js": "text/javascript",
    "style.css": "text/css",
    "docs.html": "text/html",
    "docs.js": "text/javascript",
}
"""Every file the HMI serves (a fixed list: no path from a request reaches the disk)."""
SSE_CLIENTS_MAX = 32
"""Live channels open at once: a site has a few screens; each costs one
snapshot a second."""
SSE_INTERVAL = 1.0
"""Seconds between live events: a technician reads a value, not a waveform."""
SSE_WRITE_TIMEOUT = 5.0
"""A client that has not taken an event in this long is dropped: what waits
for it is one event, never a growing queue."""
SNAPSHOT_TTL = 0.5
"""Seconds a status snapshot is shared between live channels (5 browsers cost
one status() a second, not five)."""
PAGE_MAX = 500
"""Devices per page at most (the HMI asks for 100)."""
LOG_LINES = 500
"""Recent log lines kept for the logs page (each cut to LOG_LINE_MAX)."""
LOG_LINE_MAX = 1000
LOGIN_BODY_MAX = 4096
REPLAY_IDS_MAX = 1000
"""Dead letters one replay names at most (the HMI selects from its page of 100)."""
REPLAY_BODY_MAX = 32 * 1024
ONLINE_AFTER = 120.0
"""A device counts as online when it sent something in the last 2 minutes."""

StatusSource = Callable[[], dict[str, Any]]


class RecentLogs(logging.Handler):
    """The last :data:`LOG_LINES` log lines, escaped (no line can forge another)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[dict[str, object]] = collections.deque(maxlen=LOG_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not break logging
            msg = str(record.msg)
        self.lines.append(
            {
                "ts": record.created,
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": printable(msg[:LOG_LINE_MAX]),
            }
        )


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
    )


def overview(status: dict[str, Any], recent: RecentValues, now: float) -> dict[str, Any]:
    """The figures of the overview page, from the gateway status."""
    pipeline = status.get("pipeline") or {}
    outbox = status.get("outbox") or {}
    sinks = status.get("sinks") or {}
    broker = status.get("broker") or {}
    proc = process_figures()
    online = sum(1 for d in recent.devices.values() if now - d.last_seen <= ONLINE_AFTER)
    return {
        "t": now,
        "gateway_id": status.get("gateway_id"),
        "uptime_s": status.get("uptime_s"),
        "readings_in": (pipeline.get("received") or {}).get("readings", 0),
        "readings_out": sum(int(c.get("delivered", 0)) for c in outbox.values()),
        "dropped": sum(int(c.get("dropped", 0)) for c in outbox.values()),
        "rejected": sum(int(c.get("rejected_full", 0)) for c in outbox.values()),
        "sinks": {
            name: {**outbox.get(name, {}), **sinks.get(name, {})}
            for name in sorted(set(outbox) | set(sinks))
        },
        "devices_connected": broker.get("clients_connected", 0),
        "devices_seen": len(recent.devices),
        "devices_online": online,
        "cpu_seconds": proc.cpu_seconds,
        "memory_bytes": proc.resident_memory_bytes,
        "commands": status.get("commands"),
        # The alarms page reloads its list when ``transitions`` moves.
        "alarms": {k: alarms.get(k, 0) for k in ("active", "unacked", "shelved", "transitions")}
        if (alarms := status.get("alarms"))
        else None,
    }


class HmiRoutes:
    """The routes the module docstring lists."""

    def __init__(
        self,
        access: AccessControl,
        status: StatusSource,
        recent: RecentValues,
        logs: RecentLogs,
        data_dir: Callable[[], Path | None],
        *,
        secure_cookie: bool = False,
        outbox: Callable[[], Outbox | None] = lambda: None,
    ) -> None:
        self.access = access
        self.status = status
        self.recent = recent
        self.logs = logs
        self.data_dir = data_dir
        self.outbox = outbox
        self.secure_cookie = secure_cookie
        self.closing = asyncio.Event()
        self.live_clients = 0
        self.limiter = LoginLimiter()
        self._argon = asyncio.Semaphore(LOGIN_CONCURRENT)
        self._snapshot: tuple[float, dict[str, Any]] | None = None
        self._assets: dict[str, bytes] = {}

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/hmi/{name}", self.asset)
        app.router.add_get("/api/docs", self.docs)
        app.router.add_post("/api/login", self.login)
        app.router.add_post("/api/logout", self.logout)
        app.router.add_get("/api/session", self.session)
        app.router.add_get("/api/overview", self.overview)
        app.router.add_get("/api/live/devices", self.devices)
        app.router.add_get("/api/live/devices/{device_id}", self.device)
        app.router.add_get("/api/live/devices/{device_id}/trend", self.trend)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/api/logs", self.recent_logs)
        app.router.add_get("/api/deadletters", self.deadletters)
        app.router.add_post("/api/deadletters/replay", self.replay)

    # -- pages ------------------------------------------------------------

    def _file(self, name: str) -> web.Response:
        body = self._assets.get(name)
        if body is None:
            body = resources.files("edgeway.admin").joinpath("hmi_assets", name).read_bytes()
            self._assets[name] = body
        return web.Response(
            body=body,
            content_type=ASSETS[name],
            headers={
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": "default-src 'self'; style-src 'self'; "
                "img-src 'self' data:; frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer",
            },
        )

    @public
    async def index(self, request: web.Request) -> web.Response:
        """The HMI (one page; its views load their data from /api/)."""
        return self._file("index.html")

    @public
    async def asset(self, request: web.Request) -> web.Response:
        """A script or style sheet of the HMI (a fixed list of names)."""
        name = request.match_info["name"]
        if name not in ASSETS:
            return error(404, "not_found", "no such HMI file")
        return self._file(name)

    @public
    async def docs(self, request: web.Request) -> web.Response:
        """A readable reference of this API, drawn from /api/openapi.json."""
        return self._file("docs.html")

    # -- log-in -----------------------------------------------------------

    @public
    async def login(self, request: web.Request) -> web.Response:
        """Log in with ``{"user", "password"}``: sets the session cookie.

        Answers ``{"user", "role", "csrf"}``; ``429`` with Retry-After after
        5 failed attempts a minute from one address; ``401`` for a wrong name or
        password (the same answer for both).
        """
        users = self.access.users
        if users is None:
            return error(400, "no_login", "this gateway needs no log-in (admin.auth: none)")
        wait = self.limiter.take(request.remote or "?")
        if wait:
            self.access.refusals.refused(request, 429, "log-in rate limit")
            return error(
                429,
                "too_many_requests",
                "too many log-in attempts from this address; wait and try again",
                **{"Retry-After": str(int(wait) + 1)},
            )
        raw = await read_body(request, LOGIN_BODY_MAX)
        try:
            body = orjson.loads(raw) if len(raw) <= LOGIN_BODY_MAX else None
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not all(
            isinstance(body.get(k), str) for k in ("user", "password")
        ):
            return error(400, "invalid", 'the body is {"user": NAME, "password": PASSWORD}')
        name, password = body["user"][:64], body["password"][:PASSWORD_MAX]
        async with self._argon:
            try:
                user = await asyncio.to_thread(users.verify, name, password)
            except UserStoreError:
                return error(503, "unavailable", "the user store cannot be read")
        if user is None:
            self.access.refusals.refused(request, 401, f"log-in failed for {printable(name)!r}")
            return error(401, "login_failed", "wrong user name or password")
        self.limiter.succeeded(request.remote or "?")
        sid, session = self.access.sessions.create(user.name)
        log.info("admin API: user %s (%s) logged in from %s", user.name, user.role.label,
                 printable(request.remote or "?"))  # fmt: skip
        resp = _json({"user": user.name, "role": user.role.label, "csrf": session.csrf})
        resp.set_cookie(
            COOKIE, sid, httponly=True, samesite="Strict", secure=self.secure_cookie, path="/"
        )
        return resp

    @requires(Role.VIEWER)
    async def logout(self, request: web.Request) -> web.Response:
        """End this browser's session (the cookie is cleared)."""
        sid = request.cookies.get(COOKIE)
        if sid:
            self.access.sessions.end(sid)
        resp = _json({"logged_out": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    @public
    async def session(self, request: web.Request) -> web.Response:
        """Who this browser is: ``{"user", "role", "csrf", "login"}``.

        ``login`` is false when the gateway needs none (``admin.auth: none``);
        ``user`` is null when nobody is logged in.
        """
        who = self.access.identify(request, log_refusal=False)
        needs_login = self.access.users is not None
        if isinstance(who, web.Response):
            users_exist = True
            if self.access.users is not None:
                try:
                    users_exist = bool(self.access.users.list())
                except UserStoreError:
                    pass
            return _json({"user": None, "role": None, "login": needs_login,
                          "users_exist": users_exist})  # fmt: skip
        return _json(
            {
                "user": who.user or (who.token.name if who.token else None),
                "role": who.role.label,
                "csrf": who.session.csrf if who.session is not None else None,
                "login": needs_login,
            }
        )

    # -- data -------------------------------------------------------------

    def _overview(self) -> dict[str, Any]:
        now = time.time()
        snap = self._snapshot
        if snap is None or now - snap[0] > SNAPSHOT_TTL:
            snap = (now, overview(self.status(), self.recent, now))
            self._snapshot = snap
        return snap[1]

    @requires(Role.VIEWER)
    async def overview(self, request: web.Request) -> web.Response:
        """The overview page's figures: flows, sinks, devices, CPU and memory."""
        return _json(self._overview())

    @requires(Role.VIEWER)
    async def devices(self, request: web.Request) -> web.Response:
        """Devices seen, one page: ``?q=&adapter=&status=online|stale&sort=&offset=&limit=``.

        Paging, search and filters run on the server, so a browser gets at
        most ``limit`` (at most 500) rows however many devices there are.
        """
        q = request.query
        try:
            offset = max(0, int(q.get("offset", "0")))
            limit = min(PAGE_MAX, max(1, int(q.get("limit", "100"))))
        except ValueError:
            return error(400, "invalid", "offset and limit must be integers")
        text = q.get("q", "").lower()[:128]
        adapter = q.get("adapter", "")
        state = q.get("status", "")
        sort = q.get("sort", "device_id")
        if sort not in ("device_id", "last_seen", "-last_seen", "adapter"):
            return error(400, "invalid", "sort is device_id, last_seen, -last_seen or adapter")
        # The list is copied here (a C-speed copy of references); filtering and
        # sorting 10,000 devices run in a thread, off the event loop.
        everyone = list(self.recent.devices.values())
        page = await asyncio.to_thread(
            _select, everyone, text, adapter, state, sort, offset, limit, time.time()
        )
        return _json(page)

    @requires(Role.VIEWER)
    async def device(self, request: web.Request) -> web.Response:
        """One device: its latest values and which metrics have a trend."""
        device_id = request.match_info["device_id"]
        dev = self.recent.devices.get(device_id)
        if dev is None:
            return error(404, "not_found", f"no readings from device {device_id!r} yet")
        return _json(
            {
                **dev.to_json(),
                "online": time.time() - dev.last_seen <= ONLINE_AFTER,
                "latest": dev.latest,
                "trended": self.recent.trended(device_id),
            }
        )

    @requires(Role.VIEWER)
    async def trend(self, request: web.Request) -> web.Response:
        """A metric's trend: ``?metric=NAME&since=&until=&points=``, min/max downsampled.

        Returns ``{"t": [...], "v": [...], "total": N}`` with at most
        ``points`` (default 2,000, at most 4,000) points: each of
        ``points / 2`` buckets keeps its minimum and maximum.
        """
        q = request.query
        device_id = request.match_info["device_id"]
        ring = self.recent.ring(device_id, q.get("metric", ""))
        if ring is None:
            return error(404, "not_found", "no trend for that device and metric")
        try:
            since = float(q.get("since", "0"))
            until = float(q.get("until", "inf"))
            points = min(TREND_POINTS_MAX, max(2, int(q.get("points", "2000"))))
        except ValueError:
            return error(400, "invalid", "since, until and points must be numbers")
        snap = ring.snapshot()  # O(1) here; the copy and the work run in a thread

        def work() -> tuple[list[float], list[float], int]:
            ts, values = snap.copy()
            t, v = min_max_downsample(ts, values, since, until, points // 2)
            return t, v, len(ts)

        t, v, total = await asyncio.to_thread(work)
        return _json({"t": t, "v": v, "total": total})

    @requires(Role.OPERATOR)
    async def recent_logs(self, request: web.Request) -> web.Response:
        """The gateway's last 500 log lines at info level or above, newest last."""
        level = request.query.get("level", "")
        lines = [x for x in self.logs.lines if not level or x["level"] == level]
        return _json({"lines": lines})

    @requires(Role.VIEWER)
    async def deadletters(self, request: web.Request) -> web.Response:
        """Dead letters (records a sink refused for good), oldest first, at most 100."""
        from edgeway.outbox.deadletter import list_dead_letters

        data_dir = self.data_dir()
        if data_dir is None:
            return error(503, "unavailable", "the gateway is not running")
        sink = request.query.get("sink") or None
        try:
            letters = await asyncio.to_thread(
                list_dead_letters, data_dir / "outbox.db", sink=sink, limit=100
            )
        except Exception as e:  # no outbox yet, or locked: say so
            return error(503, "unavailable", f"dead letters cannot be read: {printable(e)}")
        return _json({"deadletters": [x.to_json_obj() for x in letters]})

    @requires(Role.OPERATOR)
    async def replay(self, request: web.Request) -> web.Response:
        """Queue dead letters again while the gateway runs: ``{"ids": [...]}``
        or ``{"all": true, "sink": NAME}`` (``sink`` optional).

        They go to the end of their sink's queue with their record ids and
        count as accepted again; at most 10,000 per call, oldest first.
        Answers ``{"replayed": N, "left": M}`` (M: dead letters still kept)."""
        from edgeway.outbox.deadletter import list_dead_letters

        outbox = self.outbox()
        if outbox is None:
            return error(503, "unavailable", "the gateway is not running")
        raw = await read_body(request, REPLAY_BODY_MAX)
        try:
            body = orjson.loads(raw) if len(raw) <= REPLAY_BODY_MAX else None
        except orjson.JSONDecodeError:
            body = None
        ids = body.get("ids") if isinstance(body, dict) else None
        sink = body.get("sink") if isinstance(body, dict) else None
        every = isinstance(body, dict) and body.get("all") is True
        ids_ok = (
            isinstance(ids, list)
            and 0 < len(ids) <= REPLAY_IDS_MAX
            and all(type(i) is int for i in ids)
        )
        if not (ids_ok or every) or (sink is not None and not isinstance(sink, str)):
            return error(
                400,
                "invalid",
                f'the body is {{"ids": [ID, ...]}} (at most {REPLAY_IDS_MAX}) '
                'or {"all": true, "sink": NAME}',
            )
        try:
            n = await outbox.replay_dead_letters(sink=sink, ids=ids if ids_ok else None)
            left = await asyncio.to_thread(
                list_dead_letters, outbox.path, sink=sink, limit=REPLAY_IDS_MAX + 1
            )
        except RuntimeError as e:
            return error(503, "unavailable", f"dead letters cannot be replayed: {printable(e)}")
        log.info("admin API: %d dead letter(s) replayed", n)
        return _json({"replayed": n, "left": len(left)})

    # -- live channel -----------------------------------------------------

    @requires(Role.VIEWER)
    async def events(self, request: web.Request) -> web.StreamResponse:
        """Live updates (Server-Sent Events): ``overview`` every second, and
        ``device`` (latest values) with ``?device=ID``.

        The caller's token or session is checked again before every event: a
        revoked token, a removed user or an ended session ends the stream
        with an ``ended`` event. At most 32 streams at once (503 beyond).
        """
        if self.live_clients >= SSE_CLIENTS_MAX:
            return error(503, "unavailable", "too many live channels open; try again later")
        device_id = request.query.get("device")
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        self.live_clients += 1
        try:
            await resp.prepare(request)
            while not self.closing.is_set():
                who = self.access.identify(request, log_refusal=False)
                if isinstance(who, web.Response):
                    await resp.write(b'event: ended\ndata: {"reason": "session ended"}\n\n')
                    break
                request[PRINCIPAL] = who
                chunk = b"event: overview\ndata: " + orjson.dumps(self._overview()) + b"\n\n"
                if device_id:
                    dev = self.recent.devices.get(device_id)
                    if dev is not None:
                        doc = {"device_id": device_id, "last_seen": dev.last_seen,
                               "latest": dev.latest}  # fmt: skip
                        chunk += b"event: device\ndata: " + orjson.dumps(doc) + b"\n\n"
                await asyncio.wait_for(resp.write(chunk), SSE_WRITE_TIMEOUT)
                try:
                    await asyncio.wait_for(self.closing.wait(), SSE_INTERVAL)
                except TimeoutError:
                    pass
        except (ConnectionResetError, TimeoutError):
            pass
        finally:
            self.live_clients -= 1
        return resp


def _select(
    devices: list[DeviceEntry],
    text: str,
    adapter: str,
    state: str,
    sort: str,
    offset: int,
    limit: int,
    now: float,
) -> dict[str, Any]:
    """One page of the devices list (the work of ``GET /api/live/devices``)."""
    rows = [
        d
        for d in devices
        if (not text or text in d.device_id.lower())
        and (not adapter or d.adapter == adapter)
        and (not state or (now - d.last_seen <= ONLINE_AFTER) == (state == "online"))
    ]
    key = sort.lstrip("-")
    rows.sort(key=lambda d: getattr(d, key), reverse=sort.startswith("-"))
    page = rows[offset : offset + limit]
    return {
        "total": len(rows),
        "offset": offset,
        "devices": [{**d.to_json(), "online": now - d.last_seen <= ONLINE_AFTER} for d in page],
        "adapters": sorted({d.adapter for d in devices}),
    }
