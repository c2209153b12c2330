"""Alarms through the admin API and the ``edgeway alarms`` CLI: roles, who
and why recorded, illegal transitions refused with the reason, shelving that
ends by itself, the health metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from admin_harness import create_token, edgeway_cli, running_gateway

TOKENS = '{listen: "127.0.0.1:0", auth: tokens}'


async def test_cli_and_api_act_on_alarms_with_user_and_comment(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        svc = rg.gateway.alarms
        assert svc is not None
        operator = await create_token(rg.data_dir, "operator", "ann")
        viewer = await create_token(rg.data_dir, "viewer", "vic")
        admin = ["--admin", rg.base]
        op, view = {"EDGEWAY_TOKEN": operator}, {"EDGEWAY_TOKEN": viewer}
        await svc.raise_alarm("boiler-1", "overheat", severity=900, message="92 C", by="rule:hot")
        await svc.raise_alarm("pump-3", "low_flow", severity=300, message="slow", by="rule:flow")

        r = await edgeway_cli("alarms", "list", *admin, env=view)
        assert r.code == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("boiler-1  overheat  900 (high)  ACTIVE")
        assert "UNACKED" in lines[0] and "92 C" in lines[0]

        # A viewer may look, not act.
        r = await edgeway_cli("alarms", "ack", "boiler-1", "overheat", *admin, env=view)
        assert r.code == 1 and "403" in r.stderr

        r = await edgeway_cli(
            "alarms", "ack", "boiler-1", "overheat", "-m", "crew on the way", *admin, env=op
        )
        assert r.code == 0, r.stderr
        assert "acked" in r.stdout and "UNACKED" not in r.stdout
        # Twice: refused, saying why.
        r = await edgeway_cli("alarms", "ack", "boiler-1", "overheat", *admin, env=op)
        assert r.code == 1
        assert "409" in r.stderr and "cannot acknowledge" in r.stderr, r.stderr

        r = await edgeway_cli(
            "alarms", "shelve", "pump-3", "low_flow", "--for", "10m", "-m", "known", *admin, env=op
        )
        assert r.code == 0, r.stderr
        assert "shelved until" in r.stdout
        r = await edgeway_cli("alarms", "list", *admin, env=view)
        assert [ln.split()[0] for ln in r.stdout.strip().splitlines()] == ["boiler-1"]
        r = await edgeway_cli("alarms", "list", "--state", "shelved", *admin, env=view)
        assert r.stdout.startswith("pump-3  low_flow")

        r = await edgeway_cli("alarms", "history", "boiler-1", "overheat", *admin, env=view)
        assert r.code == 0
        hist = r.stdout.strip().splitlines()
        assert "ack  by ann" in hist[0] and '"crew on the way"' in hist[0]
        assert "raise  by rule:hot" in hist[1]

        async with httpx.AsyncClient(base_url=rg.base) as http:
            auth = {"Authorization": f"Bearer {operator}"}
            r2 = await http.post("/api/alarms/boiler-1/overheat/explode", headers=auth)
            assert r2.status_code == 404
            r2 = await http.post(
                "/api/alarms/pump-3/low_flow/shelve", headers=auth, json={"duration": "forever"}
            )
            assert r2.status_code == 400 and "duration" in r2.json()["message"]
            r2 = await http.post(
                "/api/alarms/pump-3/low_flow/ack", headers=auth, json={"comment": 5}
            )
            assert r2.status_code == 400
            r2 = await http.post("/api/alarms/pump-3/low_flow/ack", json={})
            assert r2.status_code == 401
            # The token names who acted, whatever the body says.
            r2 = await http.post(
                "/api/alarms/pump-3/low_flow/ack",
                headers=auth,
                json={"user": "mallory", "comment": "seen"},
            )
            assert r2.status_code == 200 and r2.json()["alarm"]["acked_by"] == "ann"
            r2 = await http.get("/api/alarms/nobody/none", headers=auth)
            assert r2.status_code == 404

            # Shelved again for 1 s: it ends by itself, the alarm is listed again.
            r2 = await http.post(
                "/api/alarms/pump-3/low_flow/shelve", headers=auth, json={"duration": "1s"}
            )
            assert r2.status_code == 200 and r2.json()["alarm"]["shelved"]["by"] == "ann"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while True:
                r2 = await http.get("/api/alarms", headers=auth)
                if len(r2.json()["alarms"]) == 2:
                    break
                assert loop.time() < deadline, "shelving did not end"
                await asyncio.sleep(0.1)

            text = (await http.get("/metrics", headers=auth)).text
        samples = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("edgeway_alarms")
        )
        assert samples["edgeway_alarms_active"] == "2.0"
        assert samples["edgeway_alarms_unacknowledged"] == "0.0"
        assert samples["edgeway_alarms_rate_10m"] == "2.0"
        assert samples['edgeway_alarms_most_frequent{source="boiler-1",type="overheat"}'] == "1.0"
        assert float(samples["edgeway_alarms_transitions_total"]) >= 6


async def test_loopback_api_without_tokens_records_the_given_user(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as rg:
        svc = rg.gateway.alarms
        assert svc is not None
        await svc.raise_alarm("tank-1", "level", severity=500, message="", by="rule:lvl")
        r = await edgeway_cli(
            "alarms", "ack", "tank-1", "level", "--user", "night shift", "-m", "ok",
            "--admin", rg.base,
        )  # fmt: skip
        assert r.code == 0, r.stderr
        (last, *_) = await svc.history("tank-1", "level")
        assert (last.action, last.by, last.comment) == ("ack", "night shift", "ok")
        r = await edgeway_cli(
            "alarms", "raise", "tank-2", "level", "--severity", "high", "-m", "too high",
            "--user", "scada", "--admin", rg.base,
        )  # fmt: skip
        assert r.code == 0, r.stderr
        a = svc.get("tank-2", "level")
        assert a is not None and (a.severity, a.message, a.active) == (801, "too high", True)
        r = await edgeway_cli(
            "alarms", "raise", "tank-2", "level", "--severity", "urgent", "--admin", rg.base
        )
        assert r.code == 1 and "severity must be 1-1000 or one of" in r.stderr


async def test_a_comment_is_journaled_and_a_session_acts_under_its_own_name(
    tmp_path: Path,
) -> None:
    """``comment`` (OPC UA AddComment) journals a note and changes nothing; it
    needs text and a kept alarm. A logged-in HMI user is the one recorded,
    whatever the body's ``user`` claims."""
    from edgeway.admin.tokens import Role
    from edgeway.admin.users import UserStore

    async with running_gateway(tmp_path, TOKENS) as rg:
        svc = rg.gateway.alarms
        assert svc is not None
        await svc.raise_alarm("boiler-1", "overheat", severity=900, message="92 C", by="rule:hot")
        users = UserStore(rg.data_dir / "users.db")  # 'edgeway users add' is tested elsewhere
        users.add("olga", Role.OPERATOR, "a long enough password")
        users.close()
        async with httpx.AsyncClient(base_url=rg.base, timeout=10) as http:
            login = await http.post(
                "/api/login", json={"user": "olga", "password": "a long enough password"}
            )
            assert login.status_code == 200, login.text
            h = {"X-CSRF-Token": login.json()["csrf"]}
            url = "/api/alarms/boiler-1/overheat"
            r = await http.post(f"{url}/comment", json={"comment": "fitter called"}, headers=h)
            assert r.status_code == 200 and r.json()["alarm"]["acked"] is False
            r = await http.post(f"{url}/comment", json={}, headers=h)
            assert r.status_code == 400 and "comment" in r.json()["message"]
            r = await http.post("/api/alarms/pump-9/none/comment", json={"comment": "x"}, headers=h)
            assert r.status_code == 404  # normal: nothing kept to comment on
            r = await http.post(f"{url}/ack", json={"user": "someone-else"}, headers=h)
            assert r.status_code == 200 and r.json()["alarm"]["acked_by"] == "olga"
            hist = (await http.get(f"{url}/history")).json()["transitions"]
        assert [(t["action"], t["by"], t["comment"]) for t in hist[:2]] == [
            ("ack", "olga", ""),
            ("comment", "olga", "fitter called"),
        ]
