"""Provisioning keys through the admin API (a running gateway, httpx): made,
listed, rotated and revoked by an engineer, refused to an operator, audited
without the secret, and the key made here enrols a device over HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx
from admin_harness import create_token, running_gateway

from edgeway.audit import read_offline

TOKENS = '{listen: "127.0.0.1:0", auth: tokens}'
HTTP = 'http_ingest: {listen: "127.0.0.1:0"}'


async def test_engineer_manages_keys_operator_cannot(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS, HTTP) as rg:
        engineer = await create_token(rg.data_dir, "engineer", "eng")
        operator = await create_token(rg.data_dir, "operator", "op")
        async with httpx.AsyncClient(base_url=rg.base, timeout=10) as api:
            h_op = {"Authorization": f"Bearer {operator}"}
            r = await api.post("/api/provisioning/keys", json={"id": "k1"}, headers=h_op)
            assert r.status_code == 403
            h = {"Authorization": f"Bearer {engineer}"}
            body = {
                "id": "k1",
                "groups": ["site-a"],
                "template": {"type": "pump", "kinds": ["http"]},
                "id_pattern": "pump-*",
                "rate_per_minute": 10,
                "expires_in": 3600,
                "max_uses": 3,
            }
            r = await api.post("/api/provisioning/keys", json=body, headers=h)
            assert r.status_code == 201, r.text
            assert r.headers["Cache-Control"] == "no-store"
            secret = r.json()["secret"]
            assert secret.startswith("k1:") and r.json()["key"]["state"] == "active"
            r = await api.post("/api/provisioning/keys", json=body, headers=h)
            assert r.status_code == 409
            r = await api.post("/api/provisioning/keys", json={"id": "k2", "x": 1}, headers=h)
            assert r.status_code == 400 and r.json()["error"] == "invalid"
            for bad in (
                {"template": {"kinds": [{}]}},
                {"template": {"kinds": "ftp"}},
                {"template": {"colour": "red"}},
                {"groups": [1]},
                {"groups": "a"},
                {"rate_per_minute": 0},
                {"rate_per_minute": True},
                {"max_uses": 0},
                {"expires_in": -1},
                {"expires_in": 1e300},
                {"max_uses": 2**70},
                {"id_pattern": ""},
            ):
                r = await api.post("/api/provisioning/keys", json={"id": "k3", **bad}, headers=h)
                assert r.status_code == 400, (bad, r.text)
            r = await api.post("/api/provisioning/keys", json={"id": "bad:id"}, headers=h)
            assert r.status_code == 400
            listed = (await api.get("/api/provisioning/keys", headers=h)).json()["keys"]
            assert [k["id"] for k in listed] == ["k1"] and secret.split(":")[1] not in str(listed)

            # The key enrols a device on the HTTP ingest listener.
            port = next(a for a in rg.gateway.adapters if a.section == "http_ingest").port  # type: ignore[attr-defined]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as dev:
                r = await dev.post(
                    "/provision", json={"device_id": "pump-1"},
                    headers={"Authorization": f"Bearer {secret}"},
                )  # fmt: skip
                assert r.status_code == 201, r.text
                rotated = (
                    await api.post("/api/provisioning/keys/k1/rotate", json={"grace": 0}, headers=h)
                ).json()["secret"]
                r = await dev.post(
                    "/provision", json={"device_id": "pump-2"},
                    headers={"Authorization": f"Bearer {secret}"},
                )  # fmt: skip
                assert r.status_code == 401
                r = await api.post("/api/provisioning/keys/k1/revoke", headers=h)
                assert r.status_code == 200 and r.json()["key"]["state"] == "revoked"
                r = await dev.post(
                    "/provision", json={"device_id": "pump-2"},
                    headers={"Authorization": f"Bearer {rotated}"},
                )  # fmt: skip
                assert r.status_code == 403
            r = await api.post("/api/provisioning/keys/nope/revoke", headers=h)
            assert r.status_code == 404
        entries = read_offline(rg.data_dir, limit=50)
        text = str([e.to_json_obj() for e in entries])
        assert secret.split(":")[1] not in text and rotated.split(":")[1] not in text
        assert any("/api/provisioning/keys" in e.action for e in entries)
        assert any(e.action == "device provision" and e.target == "pump-1" for e in entries)
