"""Commands from the cloud through the MQTT sink's downlink: a real Mosquitto
started by each test, paho-mqtt (MQTT 5) playing the cloud, a whole gateway."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import test_mqtt_sink
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_mqtt_sink import TIMEOUT, Mosquitto

from edgeway.config import SinkConfig, parse_config
from edgeway.gateway import Gateway
from edgeway.sinks.base import SinkOptionsError, create_sink
from edgeway.sinks.mqtt import MqttCommandSource, MqttSink

mosquitto = test_mqtt_sink.mosquitto
"""The ``mosquitto`` fixture: a Mosquitto of this test's own."""


class Cloud:
    """A paho-mqtt MQTT 5 client: publishes requests, collects answers."""

    def __init__(self, port: int, *filters: str) -> None:
        self.answers: queue.Queue[tuple[str, dict[str, Any], bytes | None]] = queue.Queue()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"cloud-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        subscribed = threading.Event()

        def on_message(_c: Any, _u: Any, m: paho.MQTTMessage) -> None:
            corr = getattr(m.properties, "CorrelationData", None)
            self.answers.put((m.topic, orjson.loads(m.payload), corr))

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe([(f, 1) for f in filters])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(TIMEOUT):
            self.close()
            raise TimeoutError("no SUBACK")

    def request(
        self,
        topic: str,
        body: Any,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(TIMEOUT)

    def answer(self) -> tuple[str, dict[str, Any], bytes | None]:
        return self.answers.get(timeout=TIMEOUT)

    def assert_quiet(self) -> None:
        assert self.answers.empty(), f"unexpected answer {self.answers.get_nowait()}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sources(monkeypatch: pytest.MonkeyPatch) -> list[MqttCommandSource]:
    """The downlinks the gateway starts (to wait for their SUBACK)."""
    made: list[MqttCommandSource] = []
    original = MqttSink.command_source

    def record(self: MqttSink, service: Any) -> Any:
        source = original(self, service)
        if isinstance(source, MqttCommandSource):
            made.append(source)
        return source

    monkeypatch.setattr(MqttSink, "command_source", record)
    return made


def config(tmp_path: Path, port: int, protocol: str = "5") -> str:
    return f"""
gateway: {{id: gw1, data_dir: "{tmp_path / "data"}"}}
mqtt: {{enabled: false}}
sinks:
  - name: cloud
    url: mqtt://127.0.0.1:{port}
    options: {{commands: true, protocol: "{protocol}"}}
"""


async def start(text: str, sources: list[MqttCommandSource]) -> tuple[Gateway, asyncio.Task[None]]:
    gw = Gateway(parse_config(text, "t.yaml"))
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), TIMEOUT)
    await asyncio.wait_for(sources[-1].subscribed.wait(), TIMEOUT)
    return gw, task


async def stop(gw: Gateway, task: asyncio.Task[None]) -> None:
    gw.request_stop()
    await asyncio.wait_for(task, TIMEOUT)


ANSWERS = "edgeway/gw1/commands/answers"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_request_is_queued_once_and_answered(
    tmp_path: Path, mosquitto: Mosquitto, sources: list[MqttCommandSource], protocol: str
) -> None:
    cloud = Cloud(mosquitto.port, ANSWERS, "replies/#")
    gw, task = await start(config(tmp_path, mosquitto.port, protocol), sources)
    try:
        assert gw.commands is not None
        # Device and name from the topic; answer to the MQTT 5 response topic.
        await asyncio.to_thread(
            cloud.request,
            "edgeway/gw1/commands/pump-1/stop",
            {"id": "c-1", "params": {"reason": "maintenance"}, "ttl": "5m"},
            "replies/x",
            b"corr-1",
        )
        topic, answer, corr = await asyncio.to_thread(cloud.answer)
        # (MQTT 3.1.1 has no response topic: the broker drops it, and the
        # answer goes to the answers topic.)
        v5 = protocol == "5"
        assert (topic, corr) == (("replies/x", b"corr-1") if v5 else (ANSWERS, None))
        assert answer["request_id"] == "c-1" and answer["state"] == "queued"
        cmd = await gw.commands.get(answer["id"])
        assert cmd is not None
        assert (cmd.device_id, cmd.name, cmd.source) == ("pump-1", "stop", "cloud:cloud")
        assert cmd.params == {"reason": "maintenance"}
        # Sent again (the cloud missed the answer), fields in the body, no
        # response topic: the same command, answered on the answers topic.
        await asyncio.to_thread(
            cloud.request,
            "edgeway/gw1/commands",
            {"id": "c-1", "device_id": "pump-1", "name": "stop"},
        )
        topic, again, _ = await asyncio.to_thread(cloud.answer)
        assert topic == ANSWERS and again["id"] == answer["id"]
        # Invalid requests are answered with an error, and not queued.
        for t, body in [
            ("edgeway/gw1/commands/p/x", b"not json"),
            ("edgeway/gw1/commands/p/x", {"device_id": "p"}),  # no id
            ("edgeway/gw1/commands/p/bad name", {"id": "c-2"}),
            ("edgeway/gw1/commands/a/b/c", {"id": "c-3"}),  # too many levels
        ]:
            await asyncio.to_thread(cloud.request, t, body)
            topic, err, _ = await asyncio.to_thread(cloud.answer)
            assert topic == ANSWERS and err["error"] == "invalid", err
        assert len(await gw.commands.list()) == 1
        # Our own answers on the answers topic were not taken as requests:
        # the broker queued each echo to us before the cloud even had the
        # answer, so before this last request, and only requests count.
        await asyncio.to_thread(cloud.request, "edgeway/gw1/commands/p/y", {"id": "c-9"})
        _topic, last, _ = await asyncio.to_thread(cloud.answer)
        assert last["request_id"] == "c-9"
        assert sources[-1].requests == 7
        cloud.assert_quiet()
    finally:
        await stop(gw, task)
        cloud.close()


async def test_requests_sent_while_the_gateway_is_down_are_taken_on_return(
    tmp_path: Path, mosquitto: Mosquitto, sources: list[MqttCommandSource]
) -> None:
    cloud = Cloud(mosquitto.port, ANSWERS)
    text = config(tmp_path, mosquitto.port)
    gw, task = await start(text, sources)  # makes the persistent session
    await stop(gw, task)
    try:
        for i in range(3):
            await asyncio.to_thread(
                cloud.request, f"edgeway/gw1/commands/dev{i}/reboot", {"id": f"off-{i}"}
            )
        gw, task = await start(text, sources)
        try:
            answers = [(await asyncio.to_thread(cloud.answer))[1] for _ in range(3)]
            assert sorted(a["request_id"] for a in answers) == ["off-0", "off-1", "off-2"]
            assert gw.commands is not None
            cmds = await gw.commands.list()
            assert sorted(c.device_id for c in cmds) == ["dev0", "dev1", "dev2"]
        finally:
            await stop(gw, task)
    finally:
        cloud.close()


async def test_a_request_not_stored_is_not_acknowledged_and_comes_again(
    tmp_path: Path, mosquitto: Mosquitto, sources: list[MqttCommandSource]
) -> None:
    from edgeway.commands.service import CommandError

    cloud = Cloud(mosquitto.port, ANSWERS)
    gw, task = await start(config(tmp_path, mosquitto.port), sources)
    try:
        assert gw.commands is not None
        service = gw.commands
        real_submit = service.submit
        calls = 0

        async def failing_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:  # the queue cannot store it (as when stopping)
                raise CommandError("disabled", "command queue is not running")
            return await real_submit(*args, **kwargs)

        service.submit = failing_once  # type: ignore[method-assign]
        await asyncio.to_thread(cloud.request, "edgeway/gw1/commands/p1/stop", {"id": "r-1"})
        # No PUBACK, so the broker delivers it again on the next connection.
        _topic, answer, _ = await asyncio.to_thread(cloud.answer)
        assert answer["request_id"] == "r-1" and answer["state"] == "queued"
        assert calls == 2
        assert len(await service.list()) == 1
    finally:
        await stop(gw, task)
        cloud.close()


def test_commands_options_are_checked() -> None:
    def sink(**options: Any) -> MqttSink:
        s = create_sink(SinkConfig(name="c", url="mqtt://127.0.0.1:1", options=options), "gw1")
        assert isinstance(s, MqttSink)
        return s

    assert sink().command_source(object()) is None  # type: ignore[arg-type]
    s = sink(commands=True)
    assert s.commands_topic == "edgeway/gw1/commands/#"
    assert s.commands_answers_topic == ANSWERS
    for key, bad in [
        ("commands_topic", "a/#/b"),
        ("commands_topic", "a/{nope}"),
        ("commands_answers_topic", "a/+/answers"),
    ]:
        with pytest.raises(SinkOptionsError) as e:
            sink(commands=True, **{key: bad})
        assert e.value.problems[0][0] == ("options", key)
