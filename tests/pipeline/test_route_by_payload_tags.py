"""Devices on the embedded broker carry tags in their payload; routes match them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.config import parse_config
from edgeway.gateway import Gateway


def _publish(port: int, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tagger", protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for p in payloads:
            client.publish("devices/b1/telemetry", p, qos=1).wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


async def test_route_matches_tags_sent_in_the_payload(tmp_path: Path) -> None:
    cfg = parse_config(
        f"""
gateway: {{id: gw-t, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: north, url: "file://{tmp_path / "north"}"}}
  - {{name: rest, url: "file://{tmp_path / "rest"}"}}
routes:
  - name: boilers-north
    match: {{tags: {{site: north}}, device_types: [boiler]}}
    sinks: [north]
pipeline: {{default_sinks: [rest]}}
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        await asyncio.to_thread(
            _publish,
            gw.listeners[0].bound[1],
            [
                b'{"t": 1, "tags": {"site": "north", "type": "boiler"}}',
                b'{"t": 2, "tags": {"site": "south", "type": "boiler"}}',
                b'{"t": 3}',
            ],
        )
        deadline = asyncio.get_running_loop().time() + 10
        assert gw.outbox is not None
        while sum(c["delivered"] for c in gw.outbox.counters().values()) < 3:
            assert asyncio.get_running_loop().time() < deadline, gw.outbox.counters()
            await asyncio.sleep(0.05)

        def metrics(name: str) -> list[dict[str, object]]:
            return [
                orjson.loads(line)
                for f in sorted((tmp_path / name).glob("*.jsonl"))
                for line in f.read_bytes().splitlines()
            ]

        north = metrics("north")
        assert [r["metrics"]["t"] for r in north] == [1]
        assert north[0]["tags"] == {"site": "north", "type": "boiler"}
        assert [r["metrics"]["t"] for r in metrics("rest")] == [2, 3]
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)
