"""Admin API access: probes, the Host check (DNS rebinding), bearer tokens and
roles, all against a running admin listener with a real HTTP client."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
from admin_harness import create_token, edgeway_cli, running_gateway
from aiohttp import web

from edgeway.admin.access import (
    PRINCIPAL,
    REFUSALS_LOGGED,
    AccessControl,
    HostPolicy,
    RefusalLog,
    escape_for_log,
    public,
    requires,
)
from edgeway.admin.api import AdminServer
from edgeway.admin.tokens import Role, TokenStore
from edgeway.config import ConfigError, parse_config

TOKENS = '{listen: "127.0.0.1:0", auth: tokens}'


# -- probes ---------------------------------------------------------------


async def test_probes_answer_without_a_token_and_status_needs_one(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        for path, body in [
            ("/livez", {"status": "alive"}),
            ("/readyz", {"status": "ready"}),
            ("/healthz", {"status": "ok"}),
        ]:
            r = await http.get(path)
            assert (r.status_code, r.json()) == (200, body), path
        r = await http.get("/api/status")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await http.get("/metrics")).status_code == 401


async def test_readyz_is_503_while_starting_and_stopping() -> None:
    state = {"ready": False, "stopping": False}
    server = AdminServer(
        "127.0.0.1",
        0,
        dict,
        lambda: state["ready"],
        access=AccessControl(HostPolicy("127.0.0.1"), None),
        stopping=lambda: state["stopping"],
    )
    await server.start()
    assert server.bound is not None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.bound[1]}") as http:
            r = await http.get("/readyz")
            assert (r.status_code, r.json()["status"]) == (503, "starting")
            assert (await http.get("/livez")).status_code == 200
            state["ready"] = True
            assert (await http.get("/readyz")).status_code == 200
            state["stopping"] = True
            r = await http.get("/readyz")
            assert (r.status_code, r.json()["status"]) == (503, "stopping")
            assert (await http.get("/livez")).status_code == 200
    finally:
        await server.close()


# -- Host check -----------------------------------------------------------


async def test_forged_host_header_is_refused_with_421(tmp_path: Path) -> None:
    admin = '{listen: "127.0.0.1:0", allowed_hosts: [gw1.example.net, .plant.example]}'
    async with running_gateway(tmp_path, admin) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        port = rg.admin_port
        # A DNS-rebinding page: the browser sends the attacker's name.
        for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "example"]:
            for path in ["/api/status", "/healthz", "/metrics"]:
                r = await http.get(path, headers={"Host": host})
                assert r.status_code == 421, (host, path)
                assert "allowed_hosts" in r.json()["message"]
        for host in [
            f"127.0.0.1:{port}",
            "127.0.0.1",
            "localhost",
            f"LOCALHOST:{port}",
            "grafana.localhost",
            "[::1]:80",
            "gw1.example.net",
            "GW1.example.net.:9180",
            "plant.example",
            "hmi.plant.example",
        ]:
            r = await http.get("/api/status", headers={"Host": host})
            assert r.status_code == 200, host


async def test_cross_site_requests_are_refused(tmp_path: Path) -> None:
    """A page of another site can send a form POST or a fetch to the loopback
    API with a correct Host; its browser names the page in Origin."""
    async with running_gateway(tmp_path) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        for origin in ["http://evil.example", "https://evil.example:9180", "null", "file://"]:
            r = await http.get("/api/status", headers={"Origin": origin})
            assert (r.status_code, r.json()["error"]) == (403, "cross_origin"), origin
            r = await http.post("/api/status", headers={"Origin": origin}, content=b"x=1")
            assert r.status_code == 403, origin
        for origin in [rg.base, "http://localhost:3000", "http://[::1]:8080"]:
            r = await http.get("/api/status", headers={"Origin": origin})
            assert r.status_code == 200, origin


async def test_host_check_on_a_wildcard_listener(tmp_path: Path) -> None:
    # Any address of the machine is fine (it cannot be re-pointed); names are not.
    policy = HostPolicy("0.0.0.0", ("gw1.example.net",))
    assert policy.allows("192.168.7.20:9180") and policy.allows("[fe80::1]")
    assert policy.allows("gw1.example.net") and policy.allows(None)
    assert not policy.allows("evil.example") and not policy.allows("192.168.7.20.nip.io")
    fixed = HostPolicy("10.1.2.3")
    assert fixed.allows("10.1.2.3:9180") and not fixed.allows("10.1.2.4")


# -- tokens and roles -----------------------------------------------------


async def test_token_from_the_cli_works_at_once_and_revoke_takes_effect(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        # Created while the gateway runs, by another process.
        token = await create_token(rg.data_dir, "viewer", "prometheus")
        auth = {"Authorization": f"Bearer {token}"}
        r = await http.get("/api/status", headers=auth)
        assert r.status_code == 200 and r.json()["gateway_id"] == "gw-admin"
        assert (await http.get("/metrics", headers=auth)).status_code == 200
        # Same id, another secret: refused.
        forged = token[: token.rindex("_") + 1] + "A" * 43
        r = await http.get("/api/status", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_token"
        for bad in ["Bearer nonsense", "Basic dXNlcjpwYXNz", f"Bearer {token}x", "Bearer", "ewt"]:
            assert (
                await http.get("/api/status", headers={"Authorization": bad})
            ).status_code == 401

        token_id = token.split("_")[1]
        listed = await edgeway_cli("tokens", "list", "--data-dir", str(rg.data_dir))
        assert token_id in listed.stdout and "viewer" in listed.stdout
        assert token.split("_", 2)[2] not in listed.stdout  # never the secret
        revoked = await edgeway_cli("tokens", "revoke", token_id, "--data-dir", str(rg.data_dir))
        assert revoked.code == 0, revoked.stderr
        # The very next request sees the revoke.
        r = await http.get("/api/status", headers=auth)
        assert r.status_code == 401
        again = await edgeway_cli("tokens", "revoke", token_id, "--data-dir", str(rg.data_dir))
        assert again.code == 1 and "no active token" in again.stderr


async def test_unknown_path_needs_a_token_before_its_404(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        assert (await http.get("/api/secret-thing")).status_code == 401
        token = await create_token(rg.data_dir, "viewer")
        r = await http.get("/api/secret-thing", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404


async def test_metrics_public_opens_metrics_only(tmp_path: Path) -> None:
    admin = '{listen: "127.0.0.1:0", auth: tokens, metrics_public: true}'
    async with running_gateway(tmp_path, admin) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        r = await http.get("/metrics")
        assert r.status_code == 200 and "edgeway_build_info" in r.text
        assert (await http.get("/api/status")).status_code == 401


async def test_roles_are_ordered_and_checked_per_route(tmp_path: Path) -> None:
    """A route declaring ``engineer`` takes engineer and admin tokens, refuses
    viewer and operator with 403; an undeclared route is refused to all."""

    @requires(Role.ENGINEER)
    async def engineer_only(request: web.Request) -> web.Response:
        return web.json_response({"role": request[PRINCIPAL].role.label})

    @public
    async def open_route(request: web.Request) -> web.Response:
        return web.json_response({})

    async def undeclared(request: web.Request) -> web.Response:
        return web.json_response({"leak": True})

    store = TokenStore(tmp_path / "tokens.db")
    tokens = {role: store.create(role.label, role)[1] for role in Role}
    access = AccessControl(
        HostPolicy("127.0.0.1"), TokenStore(tmp_path / "tokens.db", busy_timeout=0)
    )
    app = web.Application(middlewares=[access.middleware])
    app.router.add_post("/engineer", engineer_only)
    app.router.add_get("/open", open_route)
    app.router.add_get("/undeclared", undeclared)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            codes = {}
            for role, token in tokens.items():
                r = await http.post("/engineer", headers={"Authorization": f"Bearer {token}"})
                codes[role] = r.status_code
                if r.status_code == 200:
                    assert r.json() == {"role": role.label}
                else:
                    assert r.json()["error"] == "insufficient_role"
            assert codes == {
                Role.VIEWER: 403,
                Role.OPERATOR: 403,
                Role.ENGINEER: 200,
                Role.ADMIN: 200,
            }
            assert (await http.get("/open")).status_code == 200
            admin_auth = {"Authorization": f"Bearer {tokens[Role.ADMIN]}"}
            r = await http.get("/undeclared", headers=admin_auth)
            assert r.status_code == 403 and "leak" not in r.text
    finally:
        await runner.cleanup()
        store.close()
        assert access.tokens is not None
        access.tokens.close()


def test_every_admin_route_declares_its_access() -> None:
    from edgeway.admin.access import PUBLIC, declared_access

    server = AdminServer(
        "127.0.0.1", 0, dict, lambda: True, access=AccessControl(HostPolicy("127.0.0.1"), None)
    )
    declared = {
        (route.method, route.resource.canonical): declared_access(route.handler)  # type: ignore[union-attr]
        for route in server._app().router.routes()
        if route.method != "HEAD"
    }
    assert declared == {
        ("GET", "/livez"): PUBLIC,
        ("GET", "/readyz"): PUBLIC,
        ("GET", "/healthz"): PUBLIC,
        ("GET", "/api/status"): Role.VIEWER,
        ("GET", "/api/audit"): Role.OPERATOR,
        ("GET", "/metrics"): Role.VIEWER,
        ("GET", "/api/devices"): Role.VIEWER,
        ("POST", "/api/devices"): Role.OPERATOR,
        ("POST", "/api/devices/import"): Role.OPERATOR,
        ("GET", "/api/devices/{device_id}"): Role.VIEWER,
        ("PATCH", "/api/devices/{device_id}"): Role.OPERATOR,
        ("DELETE", "/api/devices/{device_id}"): Role.OPERATOR,
        ("POST", "/api/devices/{device_id}/disable"): Role.OPERATOR,
        ("POST", "/api/devices/{device_id}/enable"): Role.OPERATOR,
        ("GET", "/api/provisioning/keys"): Role.ENGINEER,
        ("POST", "/api/provisioning/keys"): Role.ENGINEER,
        ("POST", "/api/provisioning/keys/{key_id}/rotate"): Role.ENGINEER,
        ("POST", "/api/provisioning/keys/{key_id}/revoke"): Role.ENGINEER,
        ("POST", "/api/devices/{device_id}/commands"): Role.OPERATOR,
        ("GET", "/api/devices/{device_id}/commands"): Role.VIEWER,
        ("GET", "/api/commands"): Role.VIEWER,
        ("GET", "/api/commands/{command_id}"): Role.VIEWER,
        ("POST", "/api/commands/{command_id}/cancel"): Role.OPERATOR,
        ("GET", "/api/config"): Role.ENGINEER,
        ("POST", "/api/config"): Role.ENGINEER,
        ("POST", "/api/config/reload"): Role.ENGINEER,
        ("GET", "/api/config/history"): Role.VIEWER,
        ("POST", "/api/config/rollback"): Role.ENGINEER,
        ("GET", "/api/models"): Role.VIEWER,
        ("GET", "/api/models/{name}"): Role.VIEWER,
        ("PUT", "/api/models/{name}/versions/{version}"): Role.ENGINEER,
        ("DELETE", "/api/models/{name}/versions/{version}"): Role.ENGINEER,
        ("POST", "/api/models/{name}/activate"): Role.ENGINEER,
        ("POST", "/api/models/{name}/candidate"): Role.ENGINEER,
        ("DELETE", "/api/models/{name}/candidate"): Role.ENGINEER,
        ("POST", "/api/models/{name}/promote"): Role.ENGINEER,
        ("POST", "/api/models/{name}/rollback"): Role.ENGINEER,
        ("GET", "/api/devices/{device_id}/twin"): Role.VIEWER,
        ("PATCH", "/api/devices/{device_id}/twin/desired"): Role.OPERATOR,
        ("GET", "/api/twins"): Role.VIEWER,
        ("GET", "/api/alarms"): Role.VIEWER,
        ("GET", "/api/alarms/{source}/{type}"): Role.VIEWER,
        ("GET", "/api/alarms/{source}/{type}/history"): Role.VIEWER,
        ("POST", "/api/alarms/{source}/{type}/{action}"): Role.OPERATOR,
        ("GET", "/api/firmware/images"): Role.VIEWER,
        ("PUT", "/api/firmware/images"): Role.ENGINEER,
        ("GET", "/api/firmware/campaigns"): Role.VIEWER,
        ("POST", "/api/firmware/campaigns"): Role.ENGINEER,
        ("GET", "/api/firmware/campaigns/{id}"): Role.VIEWER,
        ("POST", "/api/firmware/campaigns/{id}/pause"): Role.ENGINEER,
        ("POST", "/api/firmware/campaigns/{id}/resume"): Role.ENGINEER,
        ("POST", "/api/firmware/campaigns/{id}/abort"): Role.ENGINEER,
        ("POST", "/api/config/validate"): Role.ENGINEER,
        ("GET", "/api/openapi.json"): Role.VIEWER,
        # The HMI (edgeway.admin.hmi): pages and assets are public, data is not.
        ("GET", "/"): PUBLIC,
        ("GET", "/hmi/{name}"): PUBLIC,
        ("GET", "/api/docs"): PUBLIC,
        ("POST", "/api/login"): PUBLIC,
        ("POST", "/api/logout"): Role.VIEWER,
        ("GET", "/api/session"): PUBLIC,
        ("GET", "/api/overview"): Role.VIEWER,
        ("GET", "/api/live/devices"): Role.VIEWER,
        ("GET", "/api/live/devices/{device_id}"): Role.VIEWER,
        ("GET", "/api/live/devices/{device_id}/trend"): Role.VIEWER,
        ("GET", "/api/events"): Role.VIEWER,
        ("GET", "/api/logs"): Role.OPERATOR,
        ("GET", "/api/deadletters"): Role.VIEWER,
        ("POST", "/api/deadletters/replay"): Role.OPERATOR,
        ("GET", "/api/rules"): Role.VIEWER,
    }


async def test_last_used_is_recorded(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.db")
    record, token = store.create("grafana", Role.VIEWER)
    gateway_side = TokenStore(tmp_path / "tokens.db", busy_timeout=0)
    assert gateway_side.verify(token) == record
    gateway_side.close()  # flushes
    (listed,) = store.list()
    assert listed.last_used is not None and listed.last_used >= record.created
    store.close()


# -- configuration ----------------------------------------------------------


def test_auth_none_off_loopback_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    text = 'admin:\n  listen: "0.0.0.0:9180"\n  auth: none\n'
    with pytest.raises(ConfigError) as e:
        parse_config(text, "gw.yaml")
    (issue,) = e.value.issues
    assert (issue.key, issue.line) == ("admin.auth", 3)
    assert "loopback" in issue.message


async def test_edgeway_check_and_run_refuse_auth_none_off_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text('admin:\n  listen: "0.0.0.0:9180"\n  auth: none\n')
    r = await edgeway_cli("check", str(cfg))
    assert r.code == 2 and "admin.auth" in r.stderr
    # A loopback config made public with --admin-listen keeps its auth: none and is refused.
    cfg.write_text(f'gateway: {{data_dir: "{tmp_path / "d"}"}}\nadmin: {{auth: none}}\n')
    r = await edgeway_cli("run", "-c", str(cfg), "--admin-listen", "0.0.0.0:0")
    assert r.code == 2 and "loopback" in r.stderr


async def test_non_loopback_listener_requires_tokens_by_default(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, '{listen: "0.0.0.0:0"}') as rg:
        async with httpx.AsyncClient(base_url=rg.base) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/api/status")).status_code == 401


async def test_loopback_default_allows_no_token_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgeway.admin")
    async with running_gateway(tmp_path) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        assert (await http.get("/api/status")).status_code == 200
    assert any("no tokens needed on loopback" in r.getMessage() for r in caplog.records)


# -- refusal log ------------------------------------------------------------


async def test_refusals_are_logged_rate_limited_and_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "edgeway.admin")
    async with running_gateway(tmp_path, TOKENS) as rg:
        now = [0.0]
        assert rg.gateway.admin is not None
        rg.gateway.admin.access.refusals = RefusalLog(clock=lambda: now[0])
        # A raw request whose Host carries what a terminal would render.
        # (aiohttp's parser already refuses control characters in headers.)
        reader, writer = await asyncio.open_connection("127.0.0.1", rg.admin_port)
        writer.write(
            b"GET /api/status HTTP/1.1\r\nHost: evil\t\xc3\xa9\xe2\x80\xae.example\r\n\r\n"
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 421")
        writer.close()
        async with httpx.AsyncClient(base_url=rg.base) as http:
            for _ in range(REFUSALS_LOGGED + 5):
                await http.get("/api/status", headers={"Authorization": "Bearer ewt_x"})
            now[0] += 61.0
            await http.get("/api/status")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == REFUSALS_LOGGED + 2  # 10 in the window, the count, the next one
    assert "evil\\x09\\xe9\\u202e.example" in lines[0] and "421" in lines[0]
    assert lines[0].isascii() and lines[0].isprintable()
    assert "6 more refused requests not logged" in lines[REFUSALS_LOGGED]
    assert all("\n" not in line for line in lines)


def test_escape_for_log() -> None:
    assert escape_for_log("a\nb\x1b[31mé") == "a\\x0ab\\x1b[31m\\xe9"
    assert escape_for_log("x" * 200).endswith("...") and len(escape_for_log("x" * 200)) == 83


def test_allowed_hosts_are_names_or_addresses_without_port() -> None:
    cfg = parse_config("admin: {allowed_hosts: [GW1.Example.com., .plant.example, '[fe80::1]']}")
    assert cfg.admin is not None
    assert cfg.admin.allowed_hosts == ["gw1.example.com", ".plant.example", "fe80::1"]
    for bad in ["http://gw1", "gw1:9180", "*.example", "gw 1", ""]:
        with pytest.raises(ConfigError) as e:
            parse_config(f"admin: {{allowed_hosts: ['{bad}']}}")
        assert e.value.issues[0].key == "admin.allowed_hosts"
