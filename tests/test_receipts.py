"""Receipts: the seed's "Gateway -> Device: Confirm Data Receipt".

A device publishes telemetry with its own message ids; once the cloud (a real
HTTP server) has confirmed the records, the gateway publishes a receipt on
devices/{device_id}/receipts naming those ids and the highest confirmed
sequence, so the device can free its buffer.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeway.config import parse_config
from edgeway.gateway import Gateway


class Cloud:
    """A real HTTP endpoint that can be told to refuse (503) for a while."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.refuse = True

    async def ingest(self, request: web.Request) -> web.Response:
        if self.refuse:
            return web.Response(status=503, headers={"Retry-After": "0"})
        body = orjson.loads(await request.read())
        self.records.extend(body["records"])
        return web.Response(status=200)


async def test_receipts_follow_cloud_confirmation(tmp_path: Path) -> None:
    cloud = Cloud()
    app = web.Application()
    app.router.add_post("/ingest", cloud.ingest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    cloud_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    cfg = parse_config(
        f"""
gateway: {{id: gw-r, data_dir: "{tmp_path}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: cloud, url: "http://127.0.0.1:{cloud_port}/ingest", options: {{max_wait: 0.01}}}}
receipts: {{enabled: true}}
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    port = gw.listeners[0].bound[1]

    receipts: list[dict[str, Any]] = []
    got = threading.Event()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        receipts.append(orjson.loads(msg.payload))
        got.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-r", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe("devices/dev-r/receipts", qos=1)
        assert await asyncio.to_thread(subscribed.wait, 10)
        # Two readings with a msg_id in the payload, one with v5 correlation data.
        infos = [
            client.publish("devices/dev-r/telemetry", b'{"t": 1, "msg_id": "m-1"}', qos=1),
            client.publish("devices/dev-r/telemetry", b'{"t": 2, "msg_id": "m-2"}', qos=1),
        ]
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"corr-3"
        infos.append(
            client.publish("devices/dev-r/telemetry", b'{"t": 3}', qos=1, properties=props)
        )
        for info in infos:
            await asyncio.to_thread(info.wait_for_publish, 10)

        # Stored and acknowledged, but the cloud refuses: no receipt yet.
        await asyncio.sleep(0.5)
        assert receipts == []
        cloud.refuse = False
        assert await asyncio.to_thread(got.wait, 15)
        deadline = asyncio.get_running_loop().time() + 10
        while sum(len(r["msg_ids"]) for r in receipts) < 3:
            assert asyncio.get_running_loop().time() < deadline, receipts
            await asyncio.sleep(0.05)
        msg_ids = [m for r in receipts for m in r["msg_ids"]]
        assert sorted(msg_ids) == ["corr-3", "m-1", "m-2"]
        ids = [i for r in receipts for i in r["ids"]]
        assert sorted(ids) == sorted(r["id"] for r in cloud.records)
        assert max(r["confirmed_seq"] for r in receipts) == 3
    finally:
        client.disconnect()
        client.loop_stop()
        gw.request_stop()
        await asyncio.wait_for(task, 10)
        await runner.cleanup()
