"""Receipts to devices behind an external broker (MQTT client mode): a real
Mosquitto on a free port, a real HTTP cloud, the whole gateway without its
embedded broker, and paho devices that publish telemetry and wait for their
receipt on the external broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from test_mqtt_client import TIMEOUT, Mosquitto, broker  # noqa: F401  (fixture)
from test_mqtt_client_commands import Device

from edgeway.config import MqttClientSubscription, parse_config
from edgeway.gateway import Gateway
from edgeway.south.mqtt_client import MqttClientAdapter
from sim_gateway import running


@pytest.fixture
async def cloud() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    records: list[dict[str, Any]] = []

    async def ingest(request: web.Request) -> web.Response:
        records.extend(orjson.loads(await request.read())["records"])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/ingest", ingest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, records
    finally:
        await runner.cleanup()


async def test_devices_behind_mqtt_client_mode_get_their_receipts(
    tmp_path: Path,
    broker: Mosquitto,  # noqa: F811
    cloud: tuple[int, list[dict[str, Any]]],
) -> None:
    cloud_port, records = cloud
    cfg = parse_config(
        f"""
gateway: {{id: gw-c, data_dir: "{tmp_path / "data"}"}}
mqtt: {{enabled: false}}
mqtt_client:
  - name: ext
    url: mqtt://127.0.0.1:{broker.port}
    subscriptions:
      - {{topic: "site/{{device_id}}/telemetry"}}
      - {{topic: "plant/{{device_id}}/data", receipt_topic: "plant/{{device_id}}/ack"}}
sinks:
  - {{name: cloud, url: "http://127.0.0.1:{cloud_port}/ingest", options: {{max_wait: 0.01}}}}
receipts: {{enabled: true}}
""",
        "t.yaml",
    )
    async with running(Gateway(cfg)) as gw:
        (adapter,) = gw.adapters
        assert isinstance(adapter, MqttClientAdapter)
        async with asyncio.timeout(TIMEOUT):
            await adapter.wait_for(lambda: adapter.state.connected)
        async with (
            Device(broker.port, "devices/dev-a/receipts", client_id="dev-a") as a,
            Device(broker.port, "plant/dev-b/ack", client_id="dev-b") as b,
        ):
            a.publish("site/dev-a/telemetry", b'{"t": 1, "msg_id": "a-1"}')
            a.publish("site/dev-a/telemetry", b'{"t": 2, "msg_id": "a-2"}')
            b.publish("plant/dev-b/data", b'{"p": 7, "msg_id": "b-1"}')

            # Default topic, the same shape as the embedded broker's.
            got: list[dict[str, Any]] = []
            while sum(len(r["msg_ids"]) for r in got) < 2:
                topic, payload = await a.next()
                assert topic == "devices/dev-a/receipts"
                got.append(orjson.loads(payload))
            assert sorted(m for r in got for m in r["msg_ids"]) == ["a-1", "a-2"]
            a_ids = sorted(i for r in got for i in r["ids"])
            # The subscription's own receipt topic.
            topic, payload = await b.next()
            body = orjson.loads(payload)
            assert topic == "plant/dev-b/ack" and body["msg_ids"] == ["b-1"]
            # Receipts name exactly what the cloud confirmed.
            cloud_ids: dict[str, list[str]] = {r["device_id"]: [] for r in records}
            for r in records:
                cloud_ids[r["device_id"]].append(r["id"])
            assert a_ids == sorted(cloud_ids["dev-a"]) and body["ids"] == cloud_ids["dev-b"]
            # Each payload has a msg_id, so the record ids are the message's
            # (edgeway.record_ids: a UUID), and no longer carry the sequence.
            assert all(uuid.UUID(i).version == 8 for i in body["ids"]), body
            assert isinstance(body["confirmed_seq"], int) and body["confirmed_seq"] >= 1
            assert b.messages.empty()
        stats = gw.status()["receipts"]
        assert stats["sent"].get("mqtt_client", 0) >= 2 and "mqtt" not in stats["sent"]


def test_receipt_topic_is_checked() -> None:
    for bad, why in [
        ("plant/acks", "needs {device_id}"),
        ("plant/{device_id}/+", "no wildcards"),
        ("plant/{device_id}/{name}", "unknown placeholder"),
    ]:
        with pytest.raises(ValueError, match=why):
            MqttClientSubscription(topic="plant/{device_id}", receipt_topic=bad)
