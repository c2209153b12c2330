"""The audit log: admin API changes and CLI changes recorded (who, what, when,
from where), read back with GET /api/audit and ``edgeway audit``; append-only;
no secret in it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from admin_harness import create_token, edgeway_cli, running_gateway

from edgeway.audit import DB_NAME, read_offline

TOKENS = '{listen: "127.0.0.1:0", auth: tokens}'


async def test_changes_through_the_api_and_the_cli_are_recorded(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        operator = await create_token(rg.data_dir, "operator", "ops-desk")
        viewer = await create_token(rg.data_dir, "viewer", "wall")
        r = await edgeway_cli(
            "credentials", "issue", "boiler-1", "--kind", "http", "--data-dir", str(rg.data_dir)
        )
        assert r.code == 0, r.stderr
        secret = r.stdout.strip()
        before = time.time()
        async with httpx.AsyncClient(base_url=rg.base, timeout=10) as http:
            op = {"Authorization": f"Bearer {operator}"}
            r = await http.post("/api/devices/boiler-1/commands", json={"name": "stop"}, headers=op)
            assert r.status_code == 202
            bad = await http.post("/api/devices/boiler-1/commands", json={}, headers=op)
            assert bad.status_code == 400
            # Reads are not changes; refused requests change nothing.
            await http.get("/api/status", headers=op)
            refused = await http.post(
                "/api/devices/boiler-1/commands",
                json={"name": "stop"},
                headers={"Authorization": f"Bearer {viewer}"},
            )
            assert refused.status_code == 403
            r = await http.get("/api/audit", headers=op)
            assert r.status_code == 200
            entries = r.json()["entries"]
            assert (await http.get("/api/audit", headers={"Authorization": f"Bearer {viewer}"})
                    ).status_code == 403  # fmt: skip
        api = [e for e in entries if e["action"].startswith("POST")]
        assert [(e["action"], e["status"], e["target"]) for e in api] == [
            ("POST /api/devices/boiler-1/commands", 400, "boiler-1"),
            ("POST /api/devices/boiler-1/commands", 202, "boiler-1"),
        ]
        for e in api:
            assert e["who"].endswith("(ops-desk, operator)") and e["who"].startswith("token:")
            assert e["source"] == "127.0.0.1" and e["at"] >= before
        cli = {e["action"]: e for e in entries if not e["action"].startswith("POST")}
        assert cli["credentials issue"]["target"] == "boiler-1"
        assert cli["credentials issue"]["detail"] == {"kind": "http"}
        assert cli["credentials issue"]["who"].endswith("(cli)")
        assert cli["tokens create"]["detail"]["name"] in ("ops-desk", "wall")
        # edgeway audit (through the admin API) prints the same entries.
        r = await edgeway_cli("audit", "--admin", rg.base, env={"EDGEWAY_TOKEN": operator})
        assert r.code == 0, r.stderr
        assert "POST /api/devices/boiler-1/commands" in r.stdout and "credentials issue" in r.stdout
        raw = (rg.data_dir / DB_NAME).read_bytes()
        wal = rg.data_dir / (DB_NAME + "-wal")
        raw += wal.read_bytes() if wal.exists() else b""
        assert secret.encode() not in raw and operator.encode() not in raw


def test_the_log_is_append_only(tmp_path: Path) -> None:
    from edgeway.audit import record_offline

    record_offline(tmp_path, who="me (cli)", action="credentials disable", target="d1")
    conn = sqlite3.connect(tmp_path / DB_NAME)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit SET who = 'someone else'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit")
    conn.close()
    assert [e.who for e in read_offline(tmp_path)] == ["me (cli)"]


async def test_a_change_carries_its_reason_into_the_audit(tmp_path: Path) -> None:
    """X-Edgeway-Reason (percent-encoded UTF-8) is stored with the entry; one
    that is not UTF-8 or too long is refused before the route runs."""
    from urllib.parse import quote

    async with running_gateway(tmp_path, TOKENS) as rg:
        operator = await create_token(rg.data_dir, "operator", "ops-desk")
        op = {"Authorization": f"Bearer {operator}"}
        async with httpx.AsyncClient(base_url=rg.base, timeout=10) as http:
            why = "valve 3 leaks; ticket #42, Jörg\nsecond line"
            r = await http.post(
                "/api/devices/boiler-1/commands",
                json={"name": "stop"},
                headers={**op, "X-Edgeway-Reason": quote(why)},
            )
            assert r.status_code == 202
            for bad in ("%ff%fe", quote("x" * 501)):
                r = await http.post(
                    "/api/devices/boiler-2/commands",
                    json={"name": "stop"},
                    headers={**op, "X-Edgeway-Reason": bad},
                )
                assert r.status_code == 400 and "X-Edgeway-Reason" in r.json()["message"]
            r = await http.post("/api/devices/boiler-3/commands", json={"name": "go"}, headers=op)
            assert r.status_code == 202
            entries = (await http.get("/api/audit", headers=op)).json()["entries"]
            commands = (await http.get("/api/commands", headers=op)).json()["commands"]
        r = await edgeway_cli("audit", "--admin", rg.base, env={"EDGEWAY_TOKEN": operator})
        assert r.code == 0 and "\tvalve 3 leaks; ticket #42, Jörg\\nsecond line\n" in r.stdout
        assert {c["device_id"] for c in commands} == {"boiler-1", "boiler-3"}
        posts = [e for e in entries if e["action"].startswith("POST")]
        assert [(e["target"], e["reason"]) for e in posts] == [
            ("boiler-3", None),
            ("boiler-1", "valve 3 leaks; ticket #42, Jörg\\nsecond line"),
        ]
