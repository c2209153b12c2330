"""Edge ML through the admin API and `edgeway models`: a signed model uploaded
with the CLI, activated, fed by a real paho-mqtt device through the embedded
broker, its outputs stored for the sink; roles enforced."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
from admin_harness import create_token, edgeway_cli, running_gateway
from paho.mqtt.enums import CallbackAPIVersion

import edgeway

TOKENS = '{listen: "127.0.0.1:0", auth: tokens}'
SHIPPED = Path(edgeway.__file__).parent / "ml" / "models" / "pump_health.onnx"
ROUTE = """
routes:
  - name: health
    match: {devices: ["pump-*"]}
    steps:
      - model:
          name: pump-health
          features: [vibration, bearing_temp, current]
          outputs:
            failure_probability: {output: probabilities, column: 1}
"""


def publish(port: int, device: str, readings: list[dict[str, Any]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for r in readings:
            c.publish(f"devices/{device}/telemetry", orjson.dumps(r), qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def sink_records(out: Path) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    for f in sorted(out.glob("*.jsonl")):
        recs += [orjson.loads(line) for line in f.read_bytes().splitlines() if line]
    return recs


async def test_signed_model_uploaded_activated_and_scoring(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    r = await edgeway_cli("models", "keygen", "--key", str(key))
    assert r.code == 0, r.stderr
    public = r.stdout.strip()
    extra = ROUTE + f"models: {{require_signature: true, keys: {{release: '{public}'}}}}\n"
    async with running_gateway(tmp_path, TOKENS, extra=extra) as rg:
        engineer = await create_token(rg.data_dir, "engineer", "eng")
        operator = await create_token(rg.data_dir, "operator", "op")
        admin = ["--admin", rg.base]
        r = await edgeway_cli("models", "sign", str(SHIPPED), "--key", str(key))
        assert r.code == 0, r.stderr
        signature = r.stdout.strip()
        # An operator may not change models; an unsigned upload is refused.
        r = await edgeway_cli(
            "models", "upload", "pump-health", "1", str(SHIPPED), "--signature", signature,
            *admin, env={"EDGEWAY_TOKEN": operator},
        )  # fmt: skip
        assert r.code == 1 and "403" in r.stderr
        r = await edgeway_cli(
            "models", "upload", "pump-health", "1", str(SHIPPED), *admin,
            env={"EDGEWAY_TOKEN": engineer},
        )  # fmt: skip
        assert r.code == 1 and "signature" in r.stderr
        r = await edgeway_cli(
            "models", "upload", "pump-health", "1", str(SHIPPED), "--signature", signature,
            "--activate", *admin, env={"EDGEWAY_TOKEN": engineer},
        )  # fmt: skip
        assert r.code == 0, r.stderr
        assert '"active": "1"' in r.stdout
        port = int(rg.gateway.listeners[0].bound[1])  # type: ignore[index]
        healthy = {"vibration": 2.0, "bearing_temp": 55.0, "current": 9.0}
        failing = {"vibration": 11.0, "bearing_temp": 95.0, "current": 12.0}
        await asyncio.to_thread(publish, port, "pump-1", [healthy, failing])
        out = tmp_path / "out"
        scored: list[dict[str, Any]] = []
        async with asyncio.timeout(15):
            while len(scored) < 2:
                await asyncio.sleep(0.1)
                recs = await asyncio.to_thread(sink_records, out)
                scored = [x for x in recs if "failure_probability" in x["metrics"]]
        by_ts = sorted(scored, key=lambda x: x["ts"])
        assert by_ts[0]["metrics"]["failure_probability"] < 0.1
        assert by_ts[1]["metrics"]["failure_probability"] > 0.9
        assert all(x["device_id"] == "pump-1" for x in scored)
        assert all(x["tags"]["model"] == "pump-health@1" for x in scored)
        # The readings themselves went on too.
        assert sum("vibration" in x["metrics"] for x in recs) == 2
        viewer = await create_token(rg.data_dir, "viewer", "view")
        async with httpx.AsyncClient(
            base_url=rg.base, headers={"Authorization": f"Bearer {viewer}"}, timeout=10
        ) as http:
            st = (await http.get("/api/models/pump-health")).json()
            assert st["slots"]["active"] == "1" and st["slots"]["active_stats"]["rows"] >= 2
            assert st["versions"][0]["signed_by"] == "release"
            assert [e["what"] for e in st["events"]][:2] == ["activated", "uploaded"]
            resp = await http.post("/api/models/pump-health/rollback", json={})
            assert resp.status_code == 403
            status = (await http.get("/api/status")).json()
            assert status["models"]["models"]["pump-health"]["active"] == "1"


async def test_upload_limits_and_errors_over_http(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS, extra="models: {max_size: 4KiB}\n") as rg:
        engineer = await create_token(rg.data_dir, "engineer", "eng")
        headers = {"Authorization": f"Bearer {engineer}"}
        async with httpx.AsyncClient(base_url=rg.base, headers=headers, timeout=10) as http:
            big = b"\0" * 10_000
            resp = await http.put("/api/models/m/versions/1", content=big)
            assert resp.status_code == 413 and resp.json()["error"] == "too_large"
            resp = await http.put("/api/models/..%2Fx/versions/1", content=b"x")
            assert resp.status_code in (400, 404)
            resp = await http.put("/api/models/m/versions/1", content=b"not onnx")
            assert resp.status_code == 201
            resp = await http.post("/api/models/m/activate", json={"version": "1"})
            assert resp.status_code == 422 and resp.json()["error"] == "load_failed"
            resp = await http.post("/api/models/m/promote", json={})
            assert resp.status_code == 400
            resp = await http.post("/api/models/m/activate", content=b"[")
            assert resp.status_code == 400 and resp.json()["error"] == "invalid"
