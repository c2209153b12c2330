"""The gateway assembled in-process: broker -> outbox -> file sink, admin API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.config import parse_config
from edgeway.gateway import Gateway


def _config(tmp_path: Path) -> str:
    return f"""
gateway: {{id: gw-test, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
admin: {{listen: "127.0.0.1:0"}}
"""


def _publish(port: int, n: int) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [
            client.publish(
                "devices/dev-1/telemetry", orjson.dumps({"temp": i, "ts": 1700000000 + i}), qos=1
            )
            for i in range(n)
        ]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.rc == 0
    finally:
        client.disconnect()
        client.loop_stop()


async def _wait_for(predicate, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + limit
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_mqtt_to_file_sink_with_status_and_metrics(tmp_path: Path) -> None:
    gw = Gateway(parse_config(_config(tmp_path), "test.yaml"))
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        port = gw.listeners[0].bound[1]
        await asyncio.to_thread(_publish, port, 50)
        out = tmp_path / "out"

        def delivered() -> bool:
            return gw.outbox is not None and gw.outbox.counters()["files"]["delivered"] == 50

        await _wait_for(delivered)
        lines = [
            orjson.loads(line)
            for f in sorted(out.glob("*.jsonl"))
            for line in f.read_bytes().splitlines()
        ]
        assert [r["metrics"]["temp"] for r in lines] == list(range(50))
        assert all(r["device_id"] == "dev-1" for r in lines)
        assert len({r["id"] for r in lines}) == 50
        assert all(r["id"].startswith("gw-test:") for r in lines)

        assert gw.admin is not None and gw.admin.bound is not None
        base = f"http://127.0.0.1:{gw.admin.bound[1]}"
        async with httpx.AsyncClient() as http:
            health = await http.get(f"{base}/healthz")
            assert health.status_code == 200
            status = (await http.get(f"{base}/api/status")).json()
            c = status["outbox"]["files"]
            assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"] == 50
            assert status["broker"]["readings_in"] == 50
            # Each sink reports its state: connected, last success, batch latency.
            st = status["sinks"]["files"]
            assert st["connected"] is True and st["last_error"] is None
            assert st["records_sent"] == 50 and st["batches_sent"] >= 1
            assert st["last_success_at"] is not None and st["last_batch_latency"] >= 0
            metrics = (await http.get(f"{base}/metrics")).text
            assert 'edgeway_outbox_delivered_total{sink="files"} 50.0' in metrics
            assert 'edgeway_sink_connected{sink="files"} 1.0' in metrics
            assert "edgeway_pipeline_received_readings_total 50.0" in metrics
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)
    assert task.exception() is None


async def test_decode_errors_per_reason_and_device_in_status_and_metrics(tmp_path: Path) -> None:
    text = _config(tmp_path) + 'http_ingest: {listen: "127.0.0.1:0", allow_anonymous: true}\n'
    gw = Gateway(parse_config(text, "test.yaml"))
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        (adapter,) = gw.adapters
        ingest_url = f"http://127.0.0.1:{adapter.port}/devices"  # type: ignore[attr-defined]
        assert gw.admin is not None and gw.admin.bound is not None
        base = f"http://127.0.0.1:{gw.admin.bound[1]}"
        async with httpx.AsyncClient() as http:
            for device, body in [("bad-1", b"{"), ("bad-1", b"{"), ("bad-2", b"{}")]:
                r = await http.post(
                    f"{ingest_url}/{device}/telemetry",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                assert r.status_code == 400
            good = await http.post(f"{ingest_url}/ok-1/telemetry", json={"t": 1})
            assert good.status_code == 200
            status = (await http.get(f"{base}/api/status")).json()
            metrics = (await http.get(f"{base}/metrics")).text
        a = status["adapters"]["http_ingest:http"]
        assert (a["readings"], a["errors"]) == (1, 3)
        assert a["decode_errors"] == {"invalid_json": 2, "no_metrics": 1}
        assert a["decode_errors_by_device"] == [
            {"device_id": "bad-1", "reason": "invalid_json", "count": 2},
            {"device_id": "bad-2", "reason": "no_metrics", "count": 1},
        ]
        assert (
            'edgeway_adapter_decode_errors_total{adapter="http_ingest:http",'
            'reason="invalid_json"} 2.0'
        ) in metrics
        assert 'edgeway_adapter_errors_total{adapter="http_ingest:http"} 3.0' in metrics
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)
    assert task.exception() is None


async def test_healthz_reports_a_coap_listener_that_stopped_serving(tmp_path: Path) -> None:
    """A device listener that stops answering turns /healthz to 503 "degraded"
    naming it, until its restarted listener answers again."""
    text = _config(tmp_path) + 'coap: {listen: "127.0.0.1:0", probe_interval: 0.3}\n'
    gw = Gateway(parse_config(text, "test.yaml"))
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        (coap,) = gw.adapters
        assert gw.admin is not None and gw.admin.bound is not None
        base = f"http://127.0.0.1:{gw.admin.bound[1]}"
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/healthz")).json() == {"status": "ok"}
            await _wait_for(lambda: coap.probe_answered)  # type: ignore[attr-defined]
            # The listener's socket is no longer read (what uvloop did to it
            # after an ICMP error): nothing fails, nothing is logged by itself.
            sock = coap.listener_socket()  # type: ignore[attr-defined]
            asyncio.get_running_loop().remove_reader(sock.fileno())
            seen: list[tuple[int, dict[str, object]]] = []

            async def health() -> tuple[int, dict[str, object]]:
                r = await http.get(f"{base}/healthz")
                seen.append((r.status_code, r.json()))
                return seen[-1]

            async def until(status: int) -> None:
                deadline = asyncio.get_running_loop().time() + 15
                while (await health())[0] != status:
                    assert asyncio.get_running_loop().time() < deadline, seen[-3:]
                    await asyncio.sleep(0.02)

            await until(503)
            assert seen[-1][1] == {"status": "degraded", "problems": ["coap:coap is not serving"]}
            await until(200)
            assert coap.listener_restarts == 1  # type: ignore[attr-defined]
            status = (await http.get(f"{base}/api/status")).json()
            assert status["adapters"]["coap:coap"]["listening"] is True
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)
    assert task.exception() is None
