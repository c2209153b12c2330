"""Commands over the embedded broker with real paho-mqtt devices (v5 and 3.1.1)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeway.commands.model import CommandState
from edgeway.config import parse_config
from edgeway.gateway import Gateway
from sim_gateway import wait_until


class Device:
    """A paho-mqtt device that subscribes to its commands and answers them."""

    def __init__(
        self,
        port: int,
        device_id: str,
        *,
        v5: bool = True,
        answer: bool = True,
        client_id: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.v5 = v5
        self.answer = answer
        self.received: list[tuple[str, dict[str, Any], Any]] = []
        self.subscribed = threading.Event()
        self.got = threading.Event()
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or device_id, protocol=proto
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = self._on_connect
        self.port = port

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe(f"devices/{self.device_id}/commands/+", qos=1)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        props = getattr(msg, "properties", None)
        self.received.append((msg.topic, doc, props))
        self.got.set()
        if not self.answer:
            return
        result = {"status": "ok", "result": {"done": doc["name"]}}
        if self.v5 and props is not None and getattr(props, "ResponseTopic", None):
            out = Properties(PacketTypes.PUBLISH)
            out.CorrelationData = props.CorrelationData
            client.publish(props.ResponseTopic, orjson.dumps(result), qos=1, properties=out)
        else:
            result["id"] = doc["id"]
            client.publish(msg.topic + "/result", orjson.dumps(result), qos=1)

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    cfg = parse_config(
        f"""
gateway: {{id: gw-c, data_dir: "{tmp_path}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    yield gw
    gw.request_stop()
    await asyncio.wait_for(task, 10)


def port_of(gw: Gateway) -> int:
    return gw.listeners[0].bound[1]


@pytest.mark.parametrize("v5", [True, False], ids=["v5", "v311"])
async def test_command_round_trip(gateway: Gateway, v5: bool) -> None:
    assert gateway.commands is not None
    dev = Device(port_of(gateway), "pump-1", v5=v5)
    await asyncio.to_thread(dev.start)
    try:
        cmd, _ = await gateway.commands.submit("pump-1", "stop", {"reason": "test"})
        done = await gateway.commands.wait(cmd.id, 10)
        assert done.state is CommandState.SUCCEEDED, done
        assert done.result == {"done": "stop"}
        topic, doc, props = dev.received[0]
        assert topic == "devices/pump-1/commands/stop"
        assert doc["id"] == cmd.id and doc["params"] == {"reason": "test"}
        if v5:
            assert props.CorrelationData == cmd.id.encode()
            assert props.ResponseTopic == "devices/pump-1/commands/stop/result"
            assert 0 < props.MessageExpiryInterval <= 3600
    finally:
        await asyncio.to_thread(dev.stop)


async def test_offline_device_gets_commands_when_it_subscribes(gateway: Gateway) -> None:
    assert gateway.commands is not None
    cmds = [(await gateway.commands.submit("valve-2", f"step{i}"))[0] for i in range(5)]
    await asyncio.sleep(0.2)
    assert all(c.state is CommandState.QUEUED for c in cmds)
    dev = Device(port_of(gateway), "valve-2")
    await asyncio.to_thread(dev.start)
    try:
        for c in cmds:
            assert (await gateway.commands.wait(c.id, 10)).state is CommandState.SUCCEEDED
        assert [d["id"] for _, d, _ in dev.received] == [c.id for c in cmds]
    finally:
        await asyncio.to_thread(dev.stop)


async def test_another_client_cannot_answer_or_confirm(gateway: Gateway) -> None:
    """A client that is not the device sees the command (no ACL configured
    here) but neither its PUBACK nor its answer counts."""
    assert gateway.commands is not None
    spy = Device(port_of(gateway), "pump-9", client_id="intruder")
    await asyncio.to_thread(spy.start)
    try:
        cmd, _ = await gateway.commands.submit("pump-9", "open")
        await asyncio.sleep(0.3)
        # The device itself is not connected: nothing was sent to anyone.
        assert cmd.state is CommandState.QUEUED and spy.received == []
        # The intruder answers on the device's result topic anyway.
        spy.client.publish(
            "devices/pump-9/commands/open/result",
            orjson.dumps({"id": cmd.id, "status": "ok"}),
            qos=1,
        )
        await asyncio.sleep(0.3)
        assert cmd.state is CommandState.QUEUED
        dev = Device(port_of(gateway), "pump-9")
        await asyncio.to_thread(dev.start)
        try:
            assert (await gateway.commands.wait(cmd.id, 10)).state is CommandState.SUCCEEDED
        finally:
            await asyncio.to_thread(dev.stop)
    finally:
        await asyncio.to_thread(spy.stop)


async def test_device_that_does_not_answer_times_out(gateway: Gateway) -> None:
    assert gateway.commands is not None
    dev = Device(port_of(gateway), "mute-1", answer=False)
    await asyncio.to_thread(dev.start)
    try:
        cmd, _ = await gateway.commands.submit("mute-1", "ping", result_timeout=0.5)
        done = await gateway.commands.wait(cmd.id, 10)
        assert done.state is CommandState.TIMED_OUT
        assert done.delivered_at is not None  # the device's PUBACK came
    finally:
        await asyncio.to_thread(dev.stop)


async def test_command_records_go_up_through_the_outbox(gateway: Gateway) -> None:
    assert gateway.commands is not None and gateway.outbox is not None
    dev = Device(port_of(gateway), "pump-3")
    await asyncio.to_thread(dev.start)
    try:
        cmd, _ = await gateway.commands.submit("pump-3", "stop")
        await gateway.commands.wait(cmd.id, 10)
    finally:
        await asyncio.to_thread(dev.stop)
    # No sink is configured: the records wait in the outbox for the first one.
    await asyncio.sleep(0.1)
    conn_rows = await asyncio.to_thread(_outbox_texts, Path(gateway.config.gateway.data_dir))
    states = [r["metrics"]["state"] for r in conn_rows if r["metrics"].get("command_id") == cmd.id]
    assert states == ["queued", "sent", "delivered", "succeeded"]


def _outbox_texts(data_dir: Path) -> list[dict[str, Any]]:
    import sqlite3

    conn = sqlite3.connect(data_dir / "outbox.db")
    out: list[dict[str, Any]] = []
    for (data,) in conn.execute("SELECT data FROM chunks ORDER BY seq_first"):
        for line in bytes(data).split(b"\n"):
            if line.strip():
                out.append(orjson.loads(line))
    conn.close()
    return out


async def test_next_command_goes_out_before_the_device_acknowledges_the_first(
    gateway: Gateway,
) -> None:
    """A device that has not sent the PUBACK of one command yet already gets
    the next (QoS 1 on one connection keeps them in order); each counts as
    delivered only with its own PUBACK."""
    from edgeway.south.mqtt.codec import MqttReader, encode
    from edgeway.south.mqtt.packets import (
        ConnAck,
        Connect,
        PubAck,
        Publish,
        SubAck,
        Subscribe,
        Subscription,
    )

    assert gateway.commands is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway))
    decoder = MqttReader(protocol_level=5)
    inbox: list[Any] = []

    async def recv() -> Any:
        async with asyncio.timeout(5):
            while not inbox:
                data = await reader.read(65536)
                assert data, "connection closed by the gateway"
                inbox.extend(decoder.feed(data))
        return inbox.pop(0)

    try:
        writer.write(encode(Connect(5, "valve-9"), 5))
        assert isinstance(await recv(), ConnAck)
        writer.write(encode(Subscribe(1, [Subscription("devices/valve-9/commands/+", 1)]), 5))
        assert isinstance(await recv(), SubAck)
        first, _ = await gateway.commands.submit("valve-9", "open")
        second, _ = await gateway.commands.submit("valve-9", "close")
        got = [await recv(), await recv()]  # both, no PUBACK sent yet
        assert all(isinstance(p, Publish) and p.qos == 1 for p in got)
        assert [orjson.loads(p.payload)["id"] for p in got] == [first.id, second.id]
        await asyncio.sleep(0.1)
        assert first.state is second.state is CommandState.SENT
        writer.write(encode(PubAck(got[0].packet_id), 5))
        await wait_until(lambda: first.state is CommandState.DELIVERED, 5)
        assert second.state is CommandState.SENT
        writer.write(encode(PubAck(got[1].packet_id), 5))
        await wait_until(lambda: second.state is CommandState.DELIVERED, 5)
    finally:
        writer.close()
