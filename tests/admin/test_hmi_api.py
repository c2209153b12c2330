"""The HMI's API: users and sessions, CSRF, the log-in rate limit, the
OpenAPI document, one error shape, every endpoint x role over real HTTP, the
live channel, and the recent-values store behind the device pages."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import ssl
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_harness import create_token, edgeway_cli, running_gateway

from edgeway.admin.access import PUBLIC, declared_access
from edgeway.admin.openapi import build_openapi
from edgeway.admin.recent import RING_IDLE, RecentValues, Ring, min_max_downsample
from edgeway.admin.sessions import LOGIN_BURST, LoginLimiter
from edgeway.admin.tokens import Role, TokenStore
from edgeway.admin.users import UserStore
from edgeway.reading import Origin, Reading

TOKENS = '{listen: "127.0.0.1:0", auth: tokens}'
PASSWORD = "correct horse battery"


async def add_user(data_dir: Path, name: str, role: str, password: str = PASSWORD) -> None:
    """A user added in this process (what ``edgeway users add`` does; the CLI
    itself is tested in test_users_cli_*): a subprocess costs seconds."""
    store = UserStore(data_dir / "users.db")
    try:
        await asyncio.to_thread(store.add, name, Role.parse(role), password)
    finally:
        store.close()


async def add_user_cli(data_dir: Path, name: str, role: str, password: str = PASSWORD) -> None:
    proc = await asyncio.create_subprocess_exec(
        *_cli(
            "users", "add", name, "--role", role, "--password-stdin", "--data-dir", str(data_dir)
        ),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    _, err = await asyncio.wait_for(proc.communicate(password.encode() + b"\n"), 30)
    assert proc.returncode == 0, err.decode()


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "edgeway", *args]


def _env() -> dict[str, str]:
    import os

    from admin_harness import SRC

    return {**os.environ, "PYTHONPATH": SRC}


async def login(http: httpx.AsyncClient, user: str, password: str = PASSWORD) -> str:
    r = await http.post("/api/login", json={"user": user, "password": password})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf"])


def assert_error_shape(r: httpx.Response) -> None:
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], r.text
    assert isinstance(body.get("message"), str) and body["message"], r.text


# ---------------------------------------------------------------- users, sessions


async def test_users_cli_and_browser_session(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        await add_user_cli(rg.data_dir, "olga", "operator")
        r = await edgeway_cli("users", "list", "--json", "--data-dir", str(rg.data_dir))
        assert r.code == 0 and '"name":"olga"' in r.stdout and '"role":"operator"' in r.stdout
        assert "argon2" not in r.stdout
        with sqlite3.connect(rg.data_dir / "users.db") as db:
            ((stored,),) = db.execute("SELECT password_hash FROM users").fetchall()
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert (rg.data_dir / "users.db").stat().st_mode & 0o077 == 0

        async with httpx.AsyncClient(base_url=rg.base) as http:
            r = await http.post("/api/login", json={"user": "olga", "password": "wrong one!"})
            assert r.status_code == 401 and r.json()["error"] == "login_failed"
            r = await http.post("/api/login", json={"user": "nobody", "password": "wrong one!"})
            assert r.status_code == 401 and r.json()["error"] == "login_failed"
            r = await http.post("/api/login", json={"user": "olga", "password": PASSWORD})
            assert r.status_code == 200 and r.json()["role"] == "operator"
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
            csrf = r.json()["csrf"]
            # The cookie alone reads...
            assert (await http.get("/api/status")).status_code == 200
            who = (await http.get("/api/session")).json()
            assert who["user"] == "olga" and who["csrf"] == csrf
            # ...but a write without the CSRF header is refused before the handler.
            r = await http.post("/api/devices/d1/commands", json={"name": "stop"})
            assert r.status_code == 403 and r.json()["error"] == "csrf"
            r = await http.post(
                "/api/devices/d1/commands", json={"name": "stop"}, headers={"X-CSRF-Token": "x"}
            )
            assert r.status_code == 403 and r.json()["error"] == "csrf"
            r = await http.post(
                "/api/devices/d1/commands", json={"name": "stop"}, headers={"X-CSRF-Token": csrf}
            )
            assert r.status_code == 202, r.text
            assert r.json()["command"]["source"] == "user:olga"
            # An operator is below engineer.
            r = await http.get("/api/config")
            assert r.status_code == 403 and r.json()["error"] == "insufficient_role"

            # A new password ends the sessions opened with the old one.
            proc = await asyncio.create_subprocess_exec(
                *_cli("users", "passwd", "olga", "--password-stdin", "--data-dir", str(rg.data_dir)),
                stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
            )  # fmt: skip
            await asyncio.wait_for(proc.communicate(b"another long one\n"), 30)
            assert proc.returncode == 0
            r = await http.get("/api/status")
            assert r.status_code == 401 and r.json()["error"] == "session_ended"
            await login(http, "olga", "another long one")
            assert (await http.get("/api/status")).status_code == 200
            # A removed user is out at the next request.
            r = await edgeway_cli("users", "remove", "olga", "--data-dir", str(rg.data_dir))
            assert r.code == 0
            assert (await http.get("/api/status")).status_code == 401
            # Log-out clears the cookie and ends the session.
            await add_user(rg.data_dir, "vic", "viewer")
            csrf = await login(http, "vic")
            r = await http.post("/api/logout", headers={"X-CSRF-Token": csrf})
            assert r.status_code == 200
            assert (await http.get("/api/status")).status_code == 401


async def test_users_cli_refuses_bad_input(tmp_path: Path) -> None:
    d = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *_cli("users", "add", "ann", "--role", "admin", "--password-stdin", "--data-dir", d),
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(b"short\n"), 30)
    assert proc.returncode == 1 and b"8-1024 characters" in err
    r = await edgeway_cli("users", "add", "bad name\n", "--role", "admin", "--data-dir", d)
    assert r.code == 1 and "user name" in r.stderr
    r = await edgeway_cli("users", "remove", "nobody", "--data-dir", d)
    assert r.code == 1 and "no user" in r.stderr


async def test_login_is_rate_limited_per_address(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        async with httpx.AsyncClient(base_url=rg.base) as http:
            # First run: the log-in page says how to create the first admin.
            doc = (await http.get("/api/session")).json()
            assert doc["user"] is None and doc["login"] is True and doc["users_exist"] is False
        await add_user(rg.data_dir, "ann", "admin")
        async with httpx.AsyncClient(base_url=rg.base) as http:
            assert (await http.get("/api/session")).json()["users_exist"] is True
            codes = []
            for _ in range(LOGIN_BURST + 1):
                r = await http.post("/api/login", json={"user": "ann", "password": "guess-1234"})
                codes.append(r.status_code)
            assert codes == [401] * LOGIN_BURST + [429]
            assert int(r.headers["Retry-After"]) >= 1
            assert_error_shape(r)
            # Even the right password waits: the limit is on attempts.
            r = await http.post("/api/login", json={"user": "ann", "password": PASSWORD})
            assert r.status_code == 429


def test_login_limiter_refills() -> None:
    now = [0.0]
    lim = LoginLimiter(clock=lambda: now[0])
    assert all(lim.take("a") == 0 for _ in range(LOGIN_BURST))
    assert lim.take("a") > 0
    assert lim.take("b") == 0  # per address
    lim.succeeded("b")  # only failures count
    assert all(lim.take("b") == 0 for _ in range(LOGIN_BURST))
    now[0] += 12.5  # 5 a minute: one attempt back after 12 s
    assert lim.take("a") == 0


# ---------------------------------------------------------------- OpenAPI, errors


async def test_openapi_describes_every_api_route(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        viewer = await create_token(rg.data_dir, "viewer")
        async with httpx.AsyncClient(base_url=rg.base) as http:
            assert (await http.get("/api/openapi.json")).status_code == 401
            doc = (await http.get("/api/openapi.json", headers=_bearer(viewer))).json()
            page = await http.get("/api/docs")
            assert page.status_code == 200 and "/hmi/docs.js" in page.text
        assert doc["openapi"].startswith("3.")
        assert rg.gateway.admin is not None
        app = rg.gateway.admin._runner.app  # type: ignore[union-attr]
        routes = [
            (r.method, r.resource.canonical, r.handler)  # type: ignore[union-attr]
            for r in app.router.routes()
            if r.method != "HEAD"
        ]
        api_routes = [r for r in routes if r[1].startswith("/api/")]
        assert len(api_routes) >= 20
        for method, path, handler in api_routes:
            op = doc["paths"].get(path, {}).get(method.lower())
            assert op is not None, f"{method} {path} is not in /api/openapi.json"
            assert op["summary"], f"{method} {path} has no docstring"
            access = declared_access(handler)
            assert op["x-role"] == ("public" if access == PUBLIC else access.label)  # type: ignore[union-attr]
            for name in re.findall(r"\{(\w+)\}", path):
                assert {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                } in op["parameters"]
        # Nothing described that does not exist.
        described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        assert described <= {(m, p) for m, p, _ in routes}
        assert build_openapi(app)["paths"].keys() == doc["paths"].keys()


async def test_errors_have_one_shape(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        admin = _bearer(await create_token(rg.data_dir, "admin"))
        async with httpx.AsyncClient(base_url=rg.base) as http:
            cases = [
                await http.get("/api/nothing-here", headers=admin),  # 404 from aiohttp
                await http.delete("/api/status", headers=admin),  # 405 from aiohttp
                await http.get("/api/nothing-here"),  # 401
                await http.get("/api/status", headers={**admin, "Host": "evil.example"}),  # 421
                await http.get("/hmi/%2e%2e%2fapi.py"),  # no path reaches the disk
                await http.get("/hmi/secrets.py"),
                await http.get("/api/live/devices/nope", headers=admin),
                await http.get("/api/live/devices?limit=x", headers=admin),
                await http.post("/api/login", content=b"not json"),
                await http.post("/api/config/validate", content=b"mqtt: [", headers=admin),
            ]
        for r in cases:
            assert r.status_code >= 400, r.text
            assert r.headers["content-type"].startswith("application/json"), r.text
            assert_error_shape(r)
        assert [r.status_code for r in cases] == [404, 405, 401, 421, 404, 404, 404, 400, 400, 400]
        assert cases[1].headers.get("Allow")
        assert cases[-1].json()["issues"]


# ---------------------------------------------------------------- endpoint x role


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_every_endpoint_for_every_role(tmp_path: Path) -> None:
    """Each route, called by nobody, a viewer, an operator, an engineer and an
    admin (bearer tokens), and by a viewer's and an operator's browser session:
    refused (401 / 403 insufficient_role) exactly when the route's role is
    above the caller's, and never refused for role when it is not."""
    async with running_gateway(tmp_path, TOKENS) as rg:
        callers: dict[str, tuple[Role | None, dict[str, str], httpx.AsyncClient]] = {}
        clients: list[httpx.AsyncClient] = []

        def client() -> httpx.AsyncClient:
            c = httpx.AsyncClient(base_url=rg.base, timeout=10)
            clients.append(c)
            return c

        callers["nobody"] = (None, {}, client())
        tokens = TokenStore(rg.data_dir / "tokens.db")  # what 'edgeway tokens create' does
        for role in Role:
            _, token = tokens.create(role.label, role)
            callers[role.label] = (role, _bearer(token), client())
        tokens.close()
        for role in (Role.VIEWER, Role.OPERATOR):
            await add_user(rg.data_dir, f"u-{role.label}", role.label)
            c = client()
            csrf = await login(c, f"u-{role.label}")
            callers[f"session-{role.label}"] = (role, {"X-CSRF-Token": csrf}, c)
        assert rg.gateway.admin is not None
        app = rg.gateway.admin._runner.app  # type: ignore[union-attr]
        routes = sorted(
            (r.method, r.resource.canonical, declared_access(r.handler))  # type: ignore[union-attr]
            for r in app.router.routes()
            if r.method != "HEAD"
        )
        checked = 0
        try:
            for method, path, needed in routes:
                if path in ("/api/logout", "/api/login", "/api/events"):
                    continue  # log-out ends the session; log-in is rate limited; SSE below
                url = path.replace("{device_id}", "pump-1").replace("{command_id}", "nope")
                url = url.replace("/hmi/{name}", "/hmi/style.css")
                url = re.sub(r"\{\w+\}", "x1", url)  # any other parameter (models, ...)
                for name, (role, headers, http) in callers.items():
                    body: Any = None
                    if url.startswith("/api/config") and method == "POST":
                        body = b"{not: [valid"  # refused as invalid, never applied
                    r = await http.request(method, url, headers=headers, content=body)
                    if needed == PUBLIC:
                        assert r.status_code not in (401, 403), (name, method, path, r.text)
                    elif role is None:
                        assert r.status_code == 401, (name, method, path)
                        assert_error_shape(r)
                    elif role < needed:  # type: ignore[operator]
                        assert r.status_code == 403, (name, method, path, r.text)
                        assert r.json()["error"] == "insufficient_role"
                    else:
                        assert r.status_code not in (401, 403), (name, method, path, r.text)
                    if r.status_code >= 400:
                        assert_error_shape(r)
                    checked += 1
        finally:
            for c in clients:
                await c.aclose()
        assert checked >= 20 * len(callers)


# ---------------------------------------------------------------- live channel


async def _first_events(lines: AsyncIterator[str], count: int) -> list[tuple[str, dict[str, Any]]]:
    import orjson

    out: list[tuple[str, dict[str, Any]]] = []
    event = ""
    async for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, orjson.loads(line[6:])))
            if len(out) >= count:
                break
    return out


async def test_live_channel_checks_the_caller_every_event(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        await add_user(rg.data_dir, "vic", "viewer")
        assert rg.gateway.ingest is not None
        await rg.gateway.ingest.submit(
            [Reading("pump-1", time.time(), {"temp": 21.5, "on": True}, Origin("mqtt"))]
        )
        async with httpx.AsyncClient(base_url=rg.base, timeout=10) as http:
            assert (await http.get("/api/events")).status_code == 401
            await login(http, "vic")
            async with http.stream("GET", "/api/events?device=pump-1") as resp:
                assert resp.headers["content-type"] == "text/event-stream"
                lines = resp.aiter_lines()
                events = await asyncio.wait_for(_first_events(lines, 2), 10)
                assert [e for e, _ in events] == ["overview", "device"]
                assert events[0][1]["devices_seen"] == 1
                assert events[1][1]["latest"] == {"temp": 21.5, "on": True}
                store = UserStore(rg.data_dir / "users.db")  # what 'edgeway users remove' does
                assert store.remove("vic")
                store.close()
                rest = await asyncio.wait_for(_first_events(lines, 10), 10)
                assert rest[-1][0] == "ended", rest
                assert len(rest) <= 3  # at most the tick in flight, then the end


# ---------------------------------------------------------------- recent values


def test_ring_keeps_the_last_points_in_order() -> None:
    ring = Ring(4)
    for i in range(10):
        ring.append(float(i), float(i * 10))
    ts, vs = ring.ordered()
    assert list(ts) == [6.0, 7.0, 8.0, 9.0] and list(vs) == [60.0, 70.0, 80.0, 90.0]


def test_min_max_downsample_keeps_spikes_and_bounds_points() -> None:
    n = 604_800
    ts = array("d", range(n))
    vs = array("d", bytes(8 * n))
    vs[123_457] = 99.0  # one spike in a week of flat data
    vs[500_001] = -5.0
    t, v = min_max_downsample(ts, vs, 0, float("inf"), 1000)
    assert len(t) <= 2000 and len(t) == len(v)
    assert 99.0 in v and -5.0 in v
    assert t[v.index(99.0)] == 123_457.0
    assert t == sorted(t)
    # A range with few points comes back whole.
    t, v = min_max_downsample(ts, vs, 10, 19, 1000)
    assert t == [float(i) for i in range(10, 20)]


@pytest.mark.parametrize("n", [2001, 604_800, 604_801, 99_999])
def test_numpy_downsampling_matches_the_plain_one(n: int) -> None:
    import random

    from edgeway.admin import recent

    assert recent._np is not None, "numpy is installed here: the fast path must be taken"
    rnd = random.Random(n)
    ts = array("d", (i * 1.0 for i in range(n)))
    vs = array("d", (rnd.gauss(0, 1) for _ in range(n)))
    since, until = 3.0, n - 7.0
    fast = min_max_downsample(ts, vs, since, until, 1000)
    lo, hi = 3, n - 6
    assert fast == recent._downsample_python(ts, vs, lo, hi, 1000)
    assert fast == recent._downsample_numpy(ts, vs, lo, hi, 1000)


def test_ring_snapshot_copied_while_appending_stays_in_order() -> None:
    ring = Ring(100)
    for i in range(150):
        ring.append(float(i), float(i))
    snap = ring.snapshot()
    for i in range(150, 160):  # the loop appends while a thread copies
        ring.append(float(i), float(i))
    ts, vs = snap.copy()
    assert list(ts) == sorted(ts) and list(ts) == list(vs)
    assert ts[-1] == 149.0 and len(ts) == 89  # 10 overwritten (+1 margin) dropped


def test_recent_values_without_trends() -> None:
    store = RecentValues(max_series=0)  # admin.trend_series: 0
    store.record([Reading("d1", 1.0, {"a": 1.0}, Origin("mqtt"))])
    assert store.devices["d1"].latest == {"a": 1.0} and store.trended("d1") == []


def test_recent_values_are_bounded() -> None:
    store = RecentValues(points_per_series=8, max_series=3, max_devices=2)
    for i in range(5):
        store.record([Reading(f"d{i}", float(i), {"a": i, "b": "text" * 100}, Origin("mqtt"))])
    assert list(store.devices) == ["d3", "d4"]  # the least recently seen went
    assert store.rings == 2  # the forgotten devices gave their rings back
    assert store.devices["d4"].latest["b"] == ("text" * 100)[:256]
    assert store.trended("d4") == ["a"]  # strings have no trend
    # Beyond max_series, the least recently seen device's ring is reused once
    # that device has been silent for RING_IDLE, not before.
    store.record([Reading("d3", 9.0, {"x": 1.0, "y": 2.0}, Origin("mqtt"))])
    assert store.rings == 3 and store.series_reused == 0 and store.series_refused == 1
    assert store.trended("d3") == ["a", "x"] and store.devices["d3"].latest["y"] == 2.0
    later = 4.0 + RING_IDLE
    store.record([Reading("d3", later, {"x": 1.0, "y": 2.0}, Origin("mqtt"))])
    assert store.rings == 3 and store.series_reused == 1
    assert store.trended("d4") == [] and store.devices["d4"].latest["a"] == 4
    assert store.trended("d3") == ["a", "x", "y"]
    ts, vs = store.ring("d3", "y").ordered()  # type: ignore[union-attr]
    assert list(ts) == [later] and list(vs) == [2.0]
    # Not finite: latest value kept, no trend point. The only device holding
    # rings does not give one up for its own new metric (z: latest only).
    store.record(
        [Reading("d3", 10.0, {"y": float("nan"), "z": True, "x": 10**400}, Origin("mqtt"))]
    )
    assert list(store.ring("d3", "y").ordered()[1]) == [2.0]  # type: ignore[union-attr]
    assert store.devices["d3"].latest["z"] is True and store.trended("d3") == ["a", "x", "y"]


def _recent_state(store: RecentValues) -> Any:
    devices = [
        (
            d.device_id, d.adapter, d.first_seen, d.last_seen, d.readings,
            list(d.latest.items()),
            [(name, list(r.ordered()[0]), list(r.ordered()[1]), r.head, r.count, r.appended)
             for name, r in d.rings.items()],
        )
        for d in store.devices.values()
    ]  # fmt: skip
    return (devices, list(store._holders), store.rings, store.series_reused, store.series_refused)


@pytest.mark.parametrize("seed", range(40))
def test_recent_values_by_runs_match_one_at_a_time(seed: int) -> None:
    """record()'s column-at-a-time path for runs of one device against the
    plain reading-at-a-time one, on random batches (numbers, bools, strings,
    NaN, inf, huge ints, new devices and metrics, rings wrapping, every bound
    reached), and the run path is actually taken."""
    import random

    rnd = random.Random(seed)
    values: list[Any] = [1.5, -3, True, False, 0, "on", float("nan"), float("inf"), 10**400, 2.25]
    plain_values = values[:2] + values[2:4] + [7.0, 9]
    kw = {"points_per_series": rnd.choice([12, 16, 3600]), "max_series": rnd.choice([4, 12, 2000]),
          "max_devices": rnd.choice([3, 50])}  # fmt: skip
    fast, plain = RecentValues(**kw), RecentValues(**kw)
    runs = 0
    record_run = fast._record_run

    def counting(readings: Any, i: int, j: int) -> bool:
        nonlocal runs
        took = record_run(readings, i, j)
        runs += took
        return took

    fast._record_run = counting  # type: ignore[method-assign]
    t = 1000.0
    origin = Origin("mqtt")
    for _ in range(60):
        batch = []
        for _ in range(rnd.randint(1, 40)):
            dev = (
                f"d{rnd.randint(0, 4)}"
                if rnd.random() < 0.05
                else (batch[-1].device_id if batch else "d0")
            )
            names = (
                rnd.sample(["a", "b", "c", "d", "e"], rnd.randint(1, 3))
                if rnd.random() < 0.05
                else ["a", "b", "c"]
            )
            pool = values if rnd.random() < 0.03 else plain_values
            t += rnd.choice([0.001, 1.0, RING_IDLE / 3])
            batch.append(Reading(dev, t, {n: rnd.choice(pool) for n in names}, origin))
        fast.record(batch)
        for r in batch:
            plain._record_one(r)
        assert repr(_recent_state(fast)) == repr(_recent_state(plain))
    assert runs > 0


async def test_recent_values_taken_on_a_loop_are_stored_by_device_soon_after() -> None:
    """On an event loop, record() keeps batches and stores them at most
    FLUSH_EVERY later (or at once past PENDING_MAX readings, or when the store
    is read), each device's readings together and in order: the same state
    per device as storing every reading at once, one at a time."""
    import random

    from edgeway.admin import recent as recent_mod

    rnd = random.Random(7)
    origin = Origin("mqtt")
    deferred, plain = RecentValues(points_per_series=50), RecentValues(points_per_series=50)
    t = 1000.0
    sent = 0
    for _ in range(300):
        batch = []
        dev = f"d{rnd.randint(0, 9)}"
        for _ in range(rnd.randint(1, 4)):
            t += 0.001
            # Now and then other names (as many, or fewer): no run of one device's
            # readings is then stored a column at a time.
            names = rnd.choice([("a", "b")] * 30 + [("a", "c"), ("b",)])
            batch.append(Reading(dev, t, {n: rnd.random() for n in names}, origin))
        deferred.record(batch)
        for r in batch:
            plain._record_one(r)
        sent += len(batch)
    # Kept, not stored yet: what a reader sees is stored first.
    assert deferred._devices == {} and deferred._pending_n == sent
    await asyncio.sleep(recent_mod.FLUSH_EVERY * 3)
    assert deferred._pending_n == 0 and len(deferred._devices) == 10

    def per_device(store: RecentValues) -> Any:
        return sorted(_recent_state(store)[0])

    assert repr(per_device(deferred)) == repr(per_device(plain))
    # A reader stores what waits before it reads.
    deferred.record([Reading("d0", t + 1, {"a": 5.0}, origin)])
    assert deferred.devices["d0"].latest["a"] == 5.0
    assert list(deferred.ring("d0", "a").ordered()[1])[-1] == 5.0  # type: ignore[union-attr]
    # Bounded: past PENDING_MAX readings waiting, they are stored at once.
    many = [
        Reading("d1", t + 2 + i / 1e6, {"a": 1.0}, origin) for i in range(recent_mod.PENDING_MAX)
    ]
    deferred.record(many)
    assert deferred._pending_n == 0 and deferred._devices["d1"].latest["a"] == 1.0


async def test_devices_are_paged_searched_and_filtered_on_the_server(tmp_path: Path) -> None:
    admin = '{listen: "127.0.0.1:0", auth: tokens, trend_points: 120, trend_series: 2000}'
    async with running_gateway(tmp_path, admin) as rg:
        token = _bearer(await create_token(rg.data_dir, "viewer"))
        assert rg.gateway.admin is not None
        now = time.time()
        rg.gateway.admin.recent.record(
            [
                Reading(
                    f"dev-{i:05d}",
                    now - (1000 if i % 10 == 0 else 0),
                    {"v": i},
                    Origin("coap" if i % 2 else "mqtt"),
                )
                for i in range(10_000)
            ]
        )
        async with httpx.AsyncClient(base_url=rg.base, headers=token) as http:
            doc = (await http.get("/api/live/devices?limit=100&offset=200")).json()
            assert doc["total"] == 10_000 and len(doc["devices"]) == 100
            assert doc["devices"][0]["device_id"] == "dev-00200"
            doc = (await http.get("/api/live/devices?q=dev-0012")).json()
            assert doc["total"] == 10 and all("dev-0012" in d["device_id"] for d in doc["devices"])
            doc = (await http.get("/api/live/devices?status=stale&adapter=mqtt&limit=500")).json()
            assert doc["total"] == 1000 and not any(d["online"] for d in doc["devices"])
            assert len((await http.get("/api/live/devices?limit=100000")).json()["devices"]) == 500
            ring = rg.gateway.admin.recent.ring("dev-00001", "v")
            assert ring is not None and ring.capacity == 120  # admin.trend_points
            r = await http.get("/api/live/devices/dev-00001/trend?metric=v")
            assert r.json() == {"t": [pytest.approx(now)], "v": [1.0], "total": 1}
            # Trend rings are bounded (MAX_SERIES): first come, first served;
            # a device beyond that has its latest value without a trend.
            r = await http.get("/api/live/devices/dev-00042/trend?metric=v")
            assert r.status_code == 200
            r = await http.get("/api/live/devices/dev-09999")
            assert r.json()["latest"] == {"v": 9999} and r.json()["trended"] == []


# ---------------------------------------------------------------- HTTPS


async def test_admin_listener_serves_https_with_a_secure_cookie(tmp_path: Path) -> None:
    from certs import make_cert_files

    certs = make_cert_files(tmp_path / "certs")
    admin = (
        f'{{listen: "127.0.0.1:0", auth: tokens, '
        f'tls: {{cert: "{certs.server_cert}", key: "{certs.server_key}"}}}}'
    )
    async with running_gateway(tmp_path, admin) as rg:
        await add_user(rg.data_dir, "ann", "admin")
        base = rg.base.replace("http://", "https://")
        certs_context = ssl.create_default_context(cafile=str(certs.ca_cert))
        async with httpx.AsyncClient(base_url=base, verify=certs_context) as http:
            assert (await http.get("/readyz")).status_code == 200
            r = await http.post("/api/login", json={"user": "ann", "password": PASSWORD})
            assert r.status_code == 200
            cookie = r.headers["set-cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie
            assert (await http.get("/api/status")).status_code == 200
        async with httpx.AsyncClient(base_url=rg.base) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/readyz")  # plain HTTP to a TLS listener gets nowhere


async def test_a_configuration_change_names_the_user_in_the_history(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        await add_user(rg.data_dir, "eve", "engineer")
        async with httpx.AsyncClient(base_url=rg.base, timeout=30) as http:
            csrf = await login(http, "eve")
            text = rg.config_path.read_text() + "\n# changed from the HMI\n"
            r = await http.post("/api/config/validate", content=text.encode(),
                                headers={"X-CSRF-Token": csrf})  # fmt: skip
            assert r.json() == {"valid": True}
            r = await http.post(
                "/api/config", content=text.encode(), headers={"X-CSRF-Token": csrf}
            )
            assert r.status_code == 200, r.text
            history = (await http.get("/api/config/history")).json()["history"]
            assert history[0]["source"] == "user:eve"


async def test_without_auth_the_hmi_needs_no_log_in(tmp_path: Path) -> None:
    """admin.auth: none (loopback only): the page gets role admin, no log-in."""
    async with running_gateway(tmp_path) as rg:
        async with httpx.AsyncClient(base_url=rg.base) as http:
            assert (await http.get("/api/session")).json() == {
                "user": None, "role": "admin", "csrf": None, "login": False,
            }  # fmt: skip
            r = await http.post("/api/login", json={"user": "a", "password": "b" * 8})
            assert r.status_code == 400 and r.json()["error"] == "no_login"
            page = await http.get("/")
            assert page.status_code == 200 and "/hmi/app.js" in page.text
            assert "default-src 'self'" in page.headers["Content-Security-Policy"]


def test_every_hmi_asset_ships_in_the_package() -> None:
    """The files the HMI serves are exactly those in hmi_assets/, and the
    package data ships them (no CDN, no build step: what is here is served)."""
    import tomllib

    from edgeway.admin.hmi import ASSETS

    root = Path(__file__).resolve().parents[2]
    folder = root / "src" / "edgeway" / "admin" / "hmi_assets"
    assert set(ASSETS) == {p.name for p in folder.iterdir()}
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "admin/hmi_assets/*" in project["tool"]["setuptools"]["package-data"]["edgeway"]
    for name in ASSETS:
        text = (folder / name).read_text()
        assert "http://" not in text and "https://" not in text, name  # nothing from outside
        for ref in re.findall(r'"/hmi/([\w.]+)"', text):
            assert ref in ASSETS, (name, ref)
