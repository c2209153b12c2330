"""Commands through MQTT client mode: a real Mosquitto (started per test), the
real command queue, and paho clients acting as the devices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from ingest_doubles import RecordingIngest
from paho.mqtt.enums import CallbackAPIVersion
from test_mqtt_client import (  # noqa: F401  (fixtures)
    TIMEOUT,
    Mosquitto,
    ScriptedBroker,
    Start,
    broker,
    publish,
    start,
)

from edgeway.commands.model import Command, CommandState
from edgeway.commands.service import CommandService
from edgeway.config import CommandsSection, MqttClientSubscription
from edgeway.south.mqtt.codec import encode
from edgeway.south.mqtt.packets import MQTT_5, ConnAck, Properties, Publish
from edgeway.south.mqtt_client import MqttClientAdapter


class Device:
    """A paho client subscribed to command topics; messages land in an asyncio queue."""

    def __init__(self, port: int, *filters: str, client_id: str = "device") -> None:
        self.port = port
        self.filters = filters
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._subscribed = asyncio.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._loop.call_soon_threadsafe(self._subscribed.set)
        self.client.on_message = lambda _c, _u, m: self._loop.call_soon_threadsafe(
            self.messages.put_nowait, (m.topic, m.payload)
        )

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    async def __aenter__(self) -> Device:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        async with asyncio.timeout(TIMEOUT):
            await self._subscribed.wait()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def next(self) -> tuple[str, bytes]:
        async with asyncio.timeout(TIMEOUT):
            return await self.messages.get()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[CommandService]:
    svc = CommandService(tmp_path / "commands", CommandsSection())
    await svc.open()
    try:
        yield svc
    finally:
        await svc.close()


async def commandable(
    begin: Start, service: CommandService, port: int, **options: Any
) -> MqttClientAdapter:
    adapter: MqttClientAdapter = await begin(port, RecordingIngest(), **options)
    dl = adapter.downlink(service)
    assert dl is not None
    service.add_downlink(dl)
    return adapter


async def seen(adapter: MqttClientAdapter, port: int, topic: str, device_id: str) -> None:
    """The device publishes telemetry: the connection learns it serves it."""
    await publish(port, (topic, b'{"x": 1}'))
    async with asyncio.timeout(TIMEOUT):
        await adapter.wait_for(lambda: device_id in adapter.command_devices)


async def finished(service: CommandService, cmd: Command) -> Command:
    done = await service.wait(cmd.id, TIMEOUT)
    assert done.state.terminal, done
    return done


async def test_zigbee2mqtt_set(broker: Mosquitto, start: Start, service: CommandService) -> None:  # noqa: F811
    adapter = await commandable(start, service, broker.port, preset="zigbee2mqtt")
    async with Device(broker.port, "zigbee2mqtt/+/set") as device:
        # Not reachable before the connection heard from the lamp: stays queued.
        cmd, _ = await service.submit("lamp", "set", {"state": "ON", "brightness": 200})
        assert (await service.wait(cmd.id, 0.3)).state is CommandState.QUEUED
        await seen(adapter, broker.port, "zigbee2mqtt/lamp", "lamp")
        topic, payload = await device.next()
        assert topic == "zigbee2mqtt/lamp/set"
        assert json.loads(payload) == {"state": "ON", "brightness": 200}
        done = await finished(service, cmd)
        assert done.state is CommandState.SUCCEEDED
        assert done.result == {"delivered_to": "broker", "topic": "zigbee2mqtt/lamp/set"}
        assert done.attempts == 1


async def test_tasmota_cmnd(broker: Mosquitto, start: Start, service: CommandService) -> None:  # noqa: F811
    adapter = await commandable(start, service, broker.port, preset="tasmota")
    await seen(adapter, broker.port, "tele/plug-1/SENSOR", "plug-1")
    async with Device(broker.port, "cmnd/#") as device:
        power, _ = await service.submit("plug-1", "Power", {"value": "ON"})
        assert await device.next() == ("cmnd/plug-1/Power", b"ON")
        dimmer, _ = await service.submit("plug-1", "Dimmer", {"value": 40})
        assert await device.next() == ("cmnd/plug-1/Dimmer", b"40")
        status, _ = await service.submit("plug-1", "Status")
        assert await device.next() == ("cmnd/plug-1/Status", b"")
        for cmd in (power, dimmer, status):
            assert (await finished(service, cmd)).state is CommandState.SUCCEEDED
    # Another device id was never heard of on this connection: not reachable.
    other, _ = await service.submit("plug-2", "Power", {"value": "ON"})
    assert (await service.wait(other.id, 0.3)).state is CommandState.QUEUED


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_custom_template(
    broker: Mosquitto,  # noqa: F811
    start: Start,  # noqa: F811
    service: CommandService,
    protocol: str,
) -> None:
    adapter = await commandable(
        start,
        service,
        broker.port,
        protocol=protocol,
        subscriptions=[
            {"topic": "plant/{device_id}/data", "command_topic": "plant/{device_id}/cmd/{name}"}
        ],
    )
    await seen(adapter, broker.port, "plant/pump-3/data", "pump-3")
    async with Device(broker.port, "plant/+/cmd/+") as device:
        cmd, _ = await service.submit("pump-3", "speed", {"rpm": 1200})
        topic, payload = await device.next()
        assert topic == "plant/pump-3/cmd/speed" and json.loads(payload) == {"rpm": 1200}
        assert (await finished(service, cmd)).state is CommandState.SUCCEEDED


async def test_shelly_rpc_result(broker: Mosquitto, start: Start, service: CommandService) -> None:  # noqa: F811
    adapter = await commandable(start, service, broker.port, preset="shelly")
    dev_id = "shellyplus1pm-441793a3f0c4"
    await seen(adapter, broker.port, f"{dev_id}/status/switch:0", dev_id)
    async with Device(broker.port, f"{dev_id}/rpc") as device:
        cmd, _ = await service.submit(dev_id, "Switch.Set", {"id": 0, "on": True})
        topic, payload = await device.next()
        req = json.loads(payload)
        assert topic == f"{dev_id}/rpc"
        assert req == {
            "id": cmd.id,
            "src": adapter.client_id,
            "method": "Switch.Set",
            "params": {"id": 0, "on": True},
        }
        # Delivered to the broker only: the result is the device's answer.
        assert (await service.wait(cmd.id, 0.3)).state is CommandState.DELIVERED
        answer = {"id": cmd.id, "src": dev_id, "dst": req["src"], "result": {"was_on": False}}
        device.publish(f"{req['src']}/rpc", json.dumps(answer).encode())
        done = await finished(service, cmd)
        assert done.state is CommandState.SUCCEEDED and done.result == {"was_on": False}
        bad, _ = await service.submit(dev_id, "Switch.Explode", {})
        req = json.loads((await device.next())[1])
        error = {"code": 404, "message": "No handler for Switch.Explode"}
        device.publish(
            f"{req['src']}/rpc", json.dumps({"id": bad.id, "src": dev_id, "error": error}).encode()
        )
        done = await finished(service, bad)
        assert done.state is CommandState.FAILED and "No handler" in (done.error or "")


async def test_queued_while_down(broker: Mosquitto, start: Start, service: CommandService) -> None:  # noqa: F811
    adapter = await commandable(start, service, broker.port, preset="zigbee2mqtt")
    await seen(adapter, broker.port, "zigbee2mqtt/lamp", "lamp")
    broker.stop()
    async with asyncio.timeout(TIMEOUT):
        await adapter.wait_for(lambda: not adapter.state.connected)
    cmd, _ = await service.submit("lamp", "set", {"state": "OFF"})
    assert (await service.wait(cmd.id, 0.3)).state is CommandState.QUEUED
    broker.start()
    async with Device(broker.port, "zigbee2mqtt/+/set") as device:
        async with asyncio.timeout(TIMEOUT * 2):
            await adapter.wait_for(lambda: adapter.connections == 2)
        assert await device.next() == ("zigbee2mqtt/lamp/set", b'{"state":"OFF"}')
        assert (await finished(service, cmd)).state is CommandState.SUCCEEDED


async def test_refused_by_broker(tmp_path: Path, start: Start, service: CommandService) -> None:  # noqa: F811
    acl = tmp_path / "acl"
    acl.write_text("topic read zigbee2mqtt/#\n")  # may not write the /set topics
    refusing = Mosquitto(tmp_path, f"allow_anonymous true\nacl_file {acl}")
    refusing.start()
    try:
        adapter = await commandable(start, service, refusing.port, preset="zigbee2mqtt")
        adapter.command_devices["lamp"] = adapter.routes[0]
        cmd, _ = await service.submit("lamp", "set", {"state": "ON"})
        done = await finished(service, cmd)
        assert done.state is CommandState.FAILED and "0x87" in (done.error or ""), done
    finally:
        refusing.stop()


def test_command_topic_is_checked() -> None:
    with pytest.raises(ValueError, match="device_id"):
        MqttClientSubscription(topic="a/{device_id}", command_topic="a/cmd")
    with pytest.raises(ValueError, match="wildcards"):
        MqttClientSubscription(topic="a/{device_id}", command_topic="a/{device_id}/+")
    with pytest.raises(ValueError, match="placeholder"):
        MqttClientSubscription(topic="a/{device_id}", command_topic="a/{device_id}/{x}")


async def test_no_command_topic(broker: Mosquitto, start: Start, service: CommandService) -> None:  # noqa: F811
    adapter = await start(broker.port, subscriptions=[{"topic": "d/{device_id}"}])
    assert adapter.downlink(service) is None


async def test_in_flight_bounded_by_receive_maximum(start: Start, service: CommandService) -> None:  # noqa: F811
    # A broker that allows 2 unacknowledged PUBLISHes of ours (MQTT 5 Receive
    # Maximum) and never PUBACKs: a third command waits in the queue, since
    # sending it would break the protocol and get us disconnected.
    telemetry = b"".join(encode(Publish(f"d/{d}", b'{"x": 1}'), MQTT_5) for d in "abc")
    scripted = ScriptedBroker(ConnAck(properties=Properties(receive_maximum=2)), telemetry)
    port = await scripted.start()
    try:
        adapter = await commandable(
            start,
            service,
            port,
            subscriptions=[{"topic": "d/{device_id}", "command_topic": "d/{device_id}/set"}],
        )
        async with asyncio.timeout(TIMEOUT):
            await adapter.wait_for(lambda: len(adapter.command_devices) == 3)
        cmds = [(await service.submit(d, "set", {"on": True}))[0] for d in "abc"]
        sent = lambda: [p.topic for p in scripted.packets if isinstance(p, Publish)]  # noqa: E731
        await scripted.wait_for(lambda: len(sent()) == 2)
        # Several command-timer ticks (0.25 s): still two, and the third is queued.
        states = [(await service.wait(c.id, 0.6)).state for c in cmds]
        assert len(sent()) == 2 and states.count(CommandState.QUEUED) == 1, (sent(), states)
        assert adapter.state.connected and adapter.connections == 1
    finally:
        await scripted.close()


async def test_unacked_sent_again(start: Start, service: CommandService) -> None:  # noqa: F811
    # The broker never PUBACKs: when the connection goes, the command is not
    # DELIVERED and goes out again on the next connection, as a redelivery.
    scripted = ScriptedBroker(ConnAck(), encode(Publish("d/a", b'{"x": 1}'), MQTT_5))
    port = await scripted.start()
    try:
        adapter = await commandable(
            start,
            service,
            port,
            subscriptions=[{"topic": "d/{device_id}", "command_topic": "d/{device_id}/set"}],
        )
        async with asyncio.timeout(TIMEOUT):
            await adapter.wait_for(lambda: "a" in adapter.command_devices)
        cmd, _ = await service.submit("a", "set", {"on": True})
        sent = lambda: [p for p in scripted.packets if isinstance(p, Publish)]  # noqa: E731
        await scripted.wait_for(lambda: len(sent()) == 1)
        adapter.request_reconnect()
        await scripted.wait_for(lambda: len(sent()) == 2)
        assert adapter.connections == 2
        assert [p.topic for p in sent()] == ["d/a/set", "d/a/set"]
        again = await service.get(cmd.id)
        assert again is not None and again.attempts == 2 and again.state is CommandState.SENT
    finally:
        await scripted.close()
