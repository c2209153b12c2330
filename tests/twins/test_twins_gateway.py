"""Twins end to end in a running gateway: a paho MQTT device, an HTTP device
(httpx), the admin API, the CLI and a cloud request through the command queue."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.commands.model import CommandState
from edgeway.config import parse_config
from edgeway.gateway import Gateway

SRC = str(Path(__file__).resolve().parents[2] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, gw: Gateway, mqtt_port: int, http_port: int, admin: str) -> None:
        self.gw, self.mqtt_port, self.http_port, self.admin = gw, mqtt_port, http_port, admin


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    mport, hport = free_port(), free_port()
    text = f"""
gateway: {{id: gw-t, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{mport}", allow_anonymous: true}}]
http_ingest:
  listen: "127.0.0.1:{hport}"
  tokens: {{pump-2: secret-of-pump-2-xyz}}
admin: {{listen: "127.0.0.1:0"}}
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
twins: {{max_bytes: 4KiB}}
"""
    gw = Gateway(parse_config(text, "t.yaml"), config_text=text)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 15)
    assert gw.admin is not None and gw.admin.bound is not None
    try:
        yield Running(gw, mport, hport, f"http://127.0.0.1:{gw.admin.bound[1]}")
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)


class Device:
    """A paho MQTT 5 device that follows its twin's delta."""

    def __init__(self, port: int, device_id: str, clean: bool = True) -> None:
        self.id = device_id
        self.deltas: list[dict[str, Any]] = []
        self.answers: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.port, self.clean = port, clean
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def connect(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if self.clean else 3600
        self.subscribed.clear()
        self.client.connect("127.0.0.1", self.port, clean_start=self.clean, properties=props)
        self.client.loop_start()
        self.client.subscribe(
            [
                (f"devices/{self.id}/twin/desired/delta", 1),
                (f"devices/{self.id}/twin/reported/+", 1),
                (f"devices/{self.id}/twin/get/+", 1),
            ]
        )
        assert self.subscribed.wait(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        with self.cond:
            if msg.topic.endswith("/desired/delta"):
                self.deltas.append(doc)
            else:
                self.answers.append((msg.topic, doc))
            self.cond.notify_all()

    def wait(self, what: str, n: int, timeout: float = 5.0) -> list[Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(getattr(self, what)) >= n, timeout), (
                what,
                getattr(self, what),
            )
            return list(getattr(self, what))

    def publish(self, topic: str, body: Any) -> None:
        self.client.publish(topic, orjson.dumps(body), qos=1).wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_mqtt_device_follows_desired_and_reports(running: Running) -> None:
    assert running.gw.twins is not None
    await running.gw.twins.patch("pump-1", "desired", {"setpoint": 42, "mode": "auto"}, by="t")
    dev = Device(running.mqtt_port, "pump-1")
    other = Device(running.mqtt_port, "intruder")
    try:
        await asyncio.to_thread(dev.connect)
        (first,) = await asyncio.to_thread(dev.wait, "deltas", 1)
        assert first == {
            "version": 1,
            "reported_version": 0,
            "delta": {"setpoint": 42, "mode": "auto"},
        }
        # The operator changes desired through the admin API: the delta follows.
        async with httpx.AsyncClient(base_url=running.admin, timeout=10) as api:
            r = await api.patch("/api/devices/pump-1/twin/desired", json={"setpoint": 45})
            assert r.status_code == 200 and r.json()["twin"]["desired_version"] == 2
            r = await api.patch(
                "/api/devices/pump-1/twin/desired", json={"x": 1}, headers={"If-Match": "1"}
            )
            assert r.status_code == 409 and r.json()["version"] == 2
        deltas = await asyncio.to_thread(dev.wait, "deltas", 2)
        assert deltas[1]["version"] == 2 and deltas[1]["delta"]["setpoint"] == 45
        # The device reports what it did; the delta empties.
        await asyncio.to_thread(
            dev.publish, "devices/pump-1/twin/reported", {"setpoint": 45, "mode": "auto"}
        )
        answers = await asyncio.to_thread(dev.wait, "answers", 1)
        assert answers[0] == ("devices/pump-1/twin/reported/accepted", {"version": 1})
        deltas = await asyncio.to_thread(dev.wait, "deltas", 3)
        assert deltas[2]["delta"] == {}
        # get
        await asyncio.to_thread(dev.publish, "devices/pump-1/twin/get", {})
        answers = await asyncio.to_thread(dev.wait, "answers", 2)
        topic, twin = answers[1]
        assert topic == "devices/pump-1/twin/get/response"
        assert twin["reported"] == {"setpoint": 45, "mode": "auto"} and twin["delta"] == {}
        # A client cannot report for another device.
        await asyncio.to_thread(other.connect)
        await asyncio.to_thread(other.publish, "devices/pump-1/twin/reported", {"setpoint": 0})
        await asyncio.sleep(0.3)
        assert (await running.gw.twins.get("pump-1")).reported["setpoint"] == 45
        # A report over the limits is rejected, with the reason.
        await asyncio.to_thread(dev.publish, "devices/pump-1/twin/reported", {"big": "x" * 5000})
        answers = await asyncio.to_thread(dev.wait, "answers", 3)
        assert answers[2][0] == "devices/pump-1/twin/reported/rejected"
        assert answers[2][1]["error"] == "too_large"
    finally:
        await asyncio.to_thread(dev.stop)
        await asyncio.to_thread(other.stop)


async def test_offline_device_gets_one_consolidated_delta(running: Running) -> None:
    assert running.gw.twins is not None
    dev = Device(running.mqtt_port, "pump-9", clean=False)
    await asyncio.to_thread(dev.connect)
    await asyncio.to_thread(dev.wait, "deltas", 1)
    await asyncio.to_thread(dev.stop)
    await asyncio.sleep(0.2)
    for i in range(1000):
        await running.gw.twins.patch("pump-9", "desired", {"setpoint": i, f"k{i % 7}": i}, by="t")
    dev2 = Device(running.mqtt_port, "pump-9", clean=False)
    try:
        await asyncio.to_thread(dev2.connect)
        deltas = await asyncio.to_thread(dev2.wait, "deltas", 1)
        await asyncio.sleep(0.5)  # nothing more comes
        assert len(dev2.deltas) == 1, dev2.deltas[:3]
        assert deltas[0]["version"] == 1000 and deltas[0]["delta"]["setpoint"] == 999
    finally:
        await asyncio.to_thread(dev2.stop)


async def test_http_device_long_polls_and_reports(running: Running) -> None:
    assert running.gw.twins is not None
    base = f"http://127.0.0.1:{running.http_port}"
    auth = {"Authorization": "Bearer secret-of-pump-2-xyz"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        r = await http.get("/devices/pump-2/twin")
        assert r.status_code == 401  # a twin needs the device's token
        r = await http.get("/devices/pump-2/twin", headers=auth)
        assert r.status_code == 200 and r.headers["ETag"] == '"0.0"'
        poll = asyncio.create_task(
            http.get("/devices/pump-2/twin?wait=5", headers={**auth, "If-None-Match": '"0.0"'})
        )
        await asyncio.sleep(0.2)
        assert not poll.done()
        await running.gw.twins.patch("pump-2", "desired", {"valve": "open"}, by="t")
        r = await asyncio.wait_for(poll, 5)
        assert r.status_code == 200 and r.json()["delta"] == {"valve": "open"}
        etag = r.headers["ETag"]
        r = await http.get("/devices/pump-2/twin?wait=0.2", headers={**auth, "If-None-Match": etag})
        assert r.status_code == 304
        r = await http.patch(
            "/devices/pump-2/twin/reported", content=b'{"valve": "open"}', headers=auth
        )
        assert r.status_code == 200 and r.json() == {"version": 1}
        r = await http.patch(
            "/devices/pump-2/twin/reported",
            content=b'{"valve": "shut"}',
            headers={**auth, "If-Match": "0"},
        )
        assert r.status_code == 409 and r.json()["version"] == 1
        r = await http.patch("/devices/pump-2/twin/reported", content=b"[1]", headers=auth)
        assert r.status_code == 400


async def test_cloud_request_and_records_and_cli(running: Running, tmp_path: Path) -> None:
    from edgeway.commands.cloud import accept

    gw = running.gw
    assert gw.commands is not None and gw.twins is not None
    answer = await accept(
        gw.commands,
        orjson.dumps(
            {
                "id": "t-1",
                "device_id": "pump-3",
                "name": "twin.desired",
                "params": {"patch": {"rpm": 900}},
            }
        ),
        "cloud:test",
    )
    cmd = await gw.commands.wait(answer["id"], 5)
    assert cmd.state is CommandState.SUCCEEDED and cmd.result == {"version": 1}
    # A stale cloud version is a conflict, reported as the command's failure.
    answer = await accept(
        gw.commands,
        orjson.dumps(
            {"id": "t-2", "device_id": "pump-3", "name": "twin.desired",
             "params": {"patch": {"rpm": 1}, "version": 0}}
        ),
        "cloud:test",
    )  # fmt: skip
    cmd = await gw.commands.wait(answer["id"], 5)
    assert cmd.state is CommandState.FAILED and cmd.result["error"] == "conflict"
    # The CLI sets one key.
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeway", "twin", "set", "pump-3", "schedule.start", '"06:00"',
        "--admin", running.admin, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert orjson.loads(out)["desired"] == {"rpm": 900, "schedule": {"start": "06:00"}}
    # Every change went up through the outbox as a twin record.
    recs: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(recs) < 2:
            await asyncio.sleep(0.1)
            recs = [
                orjson.loads(line)
                for f in (tmp_path / "out").glob("*.jsonl")
                for line in f.read_bytes().splitlines()
                if b'"twin"' in line
            ]
    assert {(r["device_id"], r["metrics"]["version"]) for r in recs} >= {
        ("pump-3", 1),
        ("pump-3", 2),
    }


async def test_a_client_id_alone_does_not_make_a_device(tmp_path: Path) -> None:
    """A client that logged in as device pump-1 but calls itself pump-2 cannot
    report pump-2's twin: the client id is only a claim."""
    from argon2 import PasswordHasher

    h = PasswordHasher().hash("pw-of-pump-1")
    port = free_port()
    text = f"""
gateway: {{id: gw-t2, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{port}", allow_anonymous: false}}]
  users: [{{username: pump-1, password_hash: "{h}"}}]
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
"""
    gw = Gateway(parse_config(text, "t.yaml"), config_text=text)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 15)
    assert gw.twins is not None
    liar = Device(port, "pump-2")
    honest = Device(port, "pump-1")
    try:
        for dev in (liar, honest):
            dev.client.username_pw_set("pump-1", "pw-of-pump-1")
            await asyncio.to_thread(dev.connect)
        await asyncio.to_thread(liar.publish, "devices/pump-2/twin/reported", {"rpm": 1})
        await asyncio.to_thread(honest.publish, "devices/pump-1/twin/reported", {"rpm": 2})
        answers = await asyncio.to_thread(honest.wait, "answers", 1)
        assert answers[0][0] == "devices/pump-1/twin/reported/accepted"
        assert (await gw.twins.get("pump-2")).reported_version == 0
        assert (await gw.twins.get("pump-1")).reported == {"rpm": 2}
    finally:
        await asyncio.to_thread(liar.stop)
        await asyncio.to_thread(honest.stop)
        gw.request_stop()
        await asyncio.wait_for(task, 15)
