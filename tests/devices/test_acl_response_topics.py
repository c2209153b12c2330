"""ACL bypass through MQTT 5 response topics: a device may not make the
gateway publish, on its behalf, where the ACL does not let it publish.

The gateway answers twin requests on the request's response topic. Before
this check, dev-1 could ask for its twin with a response topic in dev-2's
namespace (``devices/dev-2/commands/reboot``) and the gateway delivered the
answer there: a publish dev-1's own ACL refuses. Real peers: paho MQTT 5."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeway.config import parse_config
from edgeway.devices.credentials import CredentialStore
from edgeway.gateway import Gateway

TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, dict[str, str]]]:
    data = tmp_path / "data"
    store = CredentialStore.open(data)
    secrets = {d: store.issue(d, "mqtt") for d in ("dev-1", "dev-2")}
    store.close()
    text = f"""
gateway: {{id: gw-rt, data_dir: "{data}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0"}}]
  acl:
    - {{device: "*", topic: "devices/{{device_id}}/#"}}
twins: {{enabled: true}}
"""
    gw = Gateway(parse_config(text, "t.yaml"))
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        yield gw, secrets
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)


class Client:
    def __init__(self, port: int, device: str, secret: str) -> None:
        self.device = device
        self.got: list[paho.MQTTMessage] = []
        self.event = threading.Event()
        self.subscribed = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
        self.c.username_pw_set(device, secret)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        connected = threading.Event()
        self.c.on_connect = lambda *a: connected.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert connected.wait(TIMEOUT)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.got.append(msg)
        self.event.set()

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.c.subscribe(topic, 1)
        assert self.subscribed.wait(TIMEOUT)

    def twin_get(self, response_topic: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = b"c-1"
        self.c.publish(f"devices/{self.device}/twin/get", b"{}", 1, properties=props)

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


async def test_a_response_topic_the_requester_may_not_publish_is_not_used(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (gw, secrets):
        port = gw.listeners[0].bound[1]
        victim = await asyncio.to_thread(Client, port, "dev-2", secrets["dev-2"])
        attacker = await asyncio.to_thread(Client, port, "dev-1", secrets["dev-1"])
        try:
            await asyncio.to_thread(victim.subscribe, "devices/dev-2/#")
            await asyncio.to_thread(attacker.subscribe, "devices/dev-1/twin/get/response")
            await asyncio.to_thread(attacker.subscribe, "devices/dev-1/replies/#")
            # Into another device's command topic: refused; the answer goes to
            # the requester's own default topic instead.
            attacker.event.clear()
            attacker.twin_get("devices/dev-2/commands/reboot")
            assert await asyncio.to_thread(attacker.event.wait, TIMEOUT)
            assert attacker.got[-1].topic == "devices/dev-1/twin/get/response"
            await asyncio.sleep(0.3)
            # (dev-2 gets its own twin delta on subscribing; nothing else.)
            topics = [m.topic for m in victim.got]
            assert "devices/dev-2/commands/reboot" not in topics, topics
            # A response topic it may publish to (its own namespace) is used.
            attacker.event.clear()
            attacker.twin_get("devices/dev-1/replies/7")
            assert await asyncio.to_thread(attacker.event.wait, TIMEOUT)
            msg = attacker.got[-1]
            assert msg.topic == "devices/dev-1/replies/7"
            assert msg.properties.CorrelationData == b"c-1"
            assert "desired" in orjson.loads(msg.payload)
        finally:
            await asyncio.to_thread(attacker.stop)
            await asyncio.to_thread(victim.stop)
