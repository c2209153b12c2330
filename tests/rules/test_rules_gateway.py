"""Rules in a running gateway: a paho device's reading sets a rule, whose
actions come back to the device (a command over its own MQTT downlink), to an
MQTT subscriber (publish), to a real HTTP server (webhook), to the sinks
(event record) and to the gateway's alarm service (edgeway.alarms), which
journals the alarm and sends its transitions to the sinks."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.alarms.model import Transition
from edgeway.commands.model import CommandState
from edgeway.config import parse_config
from edgeway.gateway import Gateway


class AlarmLog:
    """The transitions of the gateway's alarm service, once journaled."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def __call__(self, t: Transition) -> None:
        self.transitions.append(t)


class Device:
    """A paho device: sends telemetry, receives and answers its commands,
    and listens on an alert topic."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.port = port
        self.commands: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._subs = 0

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe([(f"devices/{self.device_id}/commands/+", 1), ("alerts/#", 1)])

    def _on_subscribe(self, *_a: Any) -> None:
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        with self.lock:
            (self.alerts if msg.topic.startswith("alerts/") else self.commands).append(doc)
        if not msg.topic.startswith("alerts/"):
            client.publish(
                msg.topic + "/result", orjson.dumps({"id": doc["id"], "status": "ok"}), qos=1
            )

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def send(self, **metrics: Any) -> None:
        info = self.client.publish(
            f"devices/{self.device_id}/telemetry", orjson.dumps(metrics), qos=1
        )
        info.wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def hook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []
    fails = {"n": 1}

    async def receive(request: web.Request) -> web.Response:
        if fails["n"]:  # the first call fails: the runner must retry
            fails["n"] -= 1
            return web.Response(status=503)
        doc = await request.json()
        doc["header_id"] = request.headers.get("edgeway-transition-id")
        got.append(doc)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", got
    await runner.cleanup()


async def until(pred: Any, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


async def test_device_reading_to_rule_to_command_and_every_action(
    tmp_path: Path, hook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, hooked = hook
    out_file = tmp_path / "out.jsonl"
    cfg = parse_config(
        f"""
gateway: {{id: gw-r, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: file, url: "file://{out_file}"}}
rules:
  - name: hot
    match: {{devices: ["boiler-*"]}}
    when: "temperature > 80"
    clear: "temperature < 70"
    on_set:
      - command: {{name: fan, params: {{speed: 100}}}}
      - publish: {{topic: "alerts/{{device_id}}/{{rule}}"}}
      - webhook: {{url: "{url}", timeout: 2s, retries: 2}}
      - alarm: {{type: overheat, severity: 700, message: "{{device_id}} is hot"}}
      - event: {{}}
    on_clear:
      - command: {{name: fan, params: {{speed: 0}}}}
      - alarm: {{type: overheat}}
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    alarms = AlarmLog()
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    assert gw.alarms is not None
    gw.alarms.add_listener(alarms)
    dev = Device(gw.listeners[0].bound[1], "boiler-1")
    await asyncio.to_thread(dev.start)
    try:
        await asyncio.to_thread(dev.send, temperature=75)
        await asyncio.to_thread(dev.send, temperature=85)
        await until(
            lambda: len(dev.commands) == 1 and len(hooked) == 1 and len(alarms.transitions) == 1
        )
        cmd = dev.commands[0]
        assert cmd["name"] == "fan" and cmd["params"] == {"speed": 100}
        await until(lambda: len(dev.alerts) == 1)
        assert dev.alerts[0]["state"] == "set" and dev.alerts[0]["id"] == "hot:boiler-1:1"
        assert hooked[0]["id"] == hooked[0]["header_id"] == "hot:boiler-1:1"
        raised = alarms.transitions[0]
        assert (raised.action.value, raised.alarm.source, raised.alarm.type) == (
            "raise",
            "boiler-1",
            "overheat",
        )
        assert (raised.alarm.severity, raised.alarm.message, raised.by) == (
            700,
            "boiler-1 is hot",
            "rule:hot",
        )
        assert gw.alarms.get("boiler-1", "overheat") == raised.alarm
        assert gw.commands is not None
        stored = await gw.commands.get(cmd["id"])
        assert stored is not None and stored.source == "rule:hot"
        done = await gw.commands.wait(cmd["id"], 10)
        assert done.state is CommandState.SUCCEEDED

        # Hysteresis: 75 is between the two thresholds, nothing happens.
        await asyncio.to_thread(dev.send, temperature=75)
        await asyncio.sleep(0.3)
        assert len(dev.commands) == 1
        await asyncio.to_thread(dev.send, temperature=65)
        await until(lambda: len(dev.commands) == 2 and len(alarms.transitions) == 2)
        assert dev.commands[1]["params"] == {"speed": 0}
        cleared = alarms.transitions[1]
        assert (cleared.action.value, cleared.by, cleared.alarm.active) == (
            "clear",
            "rule:hot",
            False,
        )
        assert cleared.alarm.id == raised.alarm.id  # one alarm, raised then cleared

        # The event record reached the sink, in the priority lane, tagged.
        def events() -> list[dict[str, Any]]:
            if not out_file.exists():
                return []
            rows = [json.loads(x) for x in out_file.read_text().splitlines() if x]
            return [r for r in rows if r.get("tags", {}).get("record_type") == "rule"]

        await until(lambda: len(events()) == 1)
        assert events()[0]["metrics"]["state"] == "set"

        # The alarm's transitions reached the sink too, tagged, in the priority lane.
        def alarm_records() -> list[dict[str, Any]]:
            rows = [json.loads(x) for x in out_file.read_text().splitlines() if x]
            return [r for r in rows if r.get("tags", {}).get("record_type") == "alarm"]

        await until(lambda: len(alarm_records()) == 2)
        assert [r["metrics"]["event"] for r in alarm_records()] == ["raise", "clear"]
        assert all(r["priority"] == 4 for r in alarm_records())  # 700: medium_high
        status = gw.status()["rules"]
        assert status["engine"]["transitions"] == 2
        assert status["actions"]["failed"] == {}
    finally:
        await asyncio.to_thread(dev.stop)
        gw.request_stop()
        await asyncio.wait_for(task, 10)


async def test_reload_changes_rules_and_keeps_their_state(tmp_path: Path) -> None:
    from edgeway.reading import Origin, Reading

    def text(threshold: int) -> str:
        return f"""
gateway: {{id: gw-r, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
rules:
  - {{name: hot, when: "t > {threshold}"}}
"""

    gw = Gateway(parse_config(text(80), "t.yaml"))
    gw.reload_grace = 0.1
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)

    async def send(t: float) -> None:
        assert gw.ingest is not None
        await gw.ingest.submit([Reading("d1", 0.0, {"t": t}, Origin("test"))])

    def transitions() -> int:
        assert gw.pipeline is not None and gw.pipeline.rules is not None
        assert gw.pipeline.rules.engine is not None
        return gw.pipeline.rules.engine.stats.transitions

    try:
        await send(90)
        assert transitions() == 1
        changes = await gw.apply_text(text(50), "test")
        assert changes
        assert gw.pipeline is not None and gw.pipeline.rules is not None
        engine = gw.pipeline.rules.engine
        assert engine is not None and engine.rules["hot"].when.text == "t > 50"
        await send(60)  # still set: the state survived the reload, no second set
        assert engine.stats.transitions == 0
        await send(40)
        assert engine.stats.transitions == 1
        ((_, _, st),) = [(r, d, s) for (r, d), s in engine.states.items()]
        assert st.seq == 2 and not st.active
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)


async def test_rules_step_sees_the_route_s_transformed_readings(tmp_path: Path) -> None:
    """A rule named by a route's ``rules`` step sees the metrics the route's
    transform made; the device is acknowledged after the rule state commit."""
    from edgeway.reading import Origin, Reading

    cfg = parse_config(
        f"""
gateway: {{id: gw-r, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
rules:
  - {{name: hot-f, when: "fahrenheit > 176"}}
  - {{name: raw, when: "fahrenheit > 0"}}
routes:
  - name: convert
    steps:
      - transform: {{fahrenheit: {{expr: "celsius * 1.8 + 32"}}}}
      - rules: {{names: [hot-f]}}
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        assert gw.ingest is not None and gw.pipeline is not None and gw.pipeline.rules is not None
        status = await gw.ingest.submit([Reading("d1", 0.0, {"celsius": 85.0}, Origin("test"))])
        assert status.value == "accepted"
        engine = gw.pipeline.rules.engine
        assert engine is not None
        # hot-f saw the transformed metric; raw (at the front) never sees it.
        assert set(engine.states) == {("hot-f", "d1")} and engine.states[("hot-f", "d1")].active
        rows = await gw.pipeline.rules.store.transitions()
        assert [(r["rule"], r["state"]) for r in rows] == [("hot-f", "set")]  # on disk already
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)


async def test_rules_and_twins_in_the_gateway(tmp_path: Path) -> None:
    """A condition on the twin's desired state and a twin action, wired by
    the gateway to its twin service."""
    from edgeway.reading import Origin, Reading

    cfg = parse_config(
        f"""
gateway: {{id: gw-r, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
rules:
  - name: over-limit
    when: "t > desired(limit)"
    on_set: [{{twin: {{desired: {{fan: 1}}}}}}]
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    try:
        assert gw.twins is not None and gw.ingest is not None
        await gw.twins.patch("d1", "desired", {"limit": 50}, by="test")
        await gw.ingest.submit([Reading("d1", 0.0, {"t": 60.0}, Origin("test"))])
        await until(lambda: gw.twins is not None and gw.twins.patches == 2)
        twin = await gw.twins.get("d1")
        assert twin.desired == {"limit": 50, "fan": 1}
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)
