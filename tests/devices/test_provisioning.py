"""Auto-provisioning on a running gateway, with real peers: httpx posting to
``POST /provision`` on the HTTP ingest listener, paho-mqtt (MQTT 5 and
3.1.1) enrolling on the embedded broker; then each device uses the
credentials it received. Keys are made with the CLI's code, offline, and
changed while the gateway runs (rotate, revoke), as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from device_events import device_events
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeway.audit import read_offline
from edgeway.config import parse_config
from edgeway.devices.provisioning import ProvisioningKeys
from edgeway.devices.provisioning_cli import provisioning_main
from edgeway.gateway import Gateway

TIMEOUT = 10.0


@dataclass
class Running:
    gw: Gateway
    data: Path
    out: Path
    http: httpx.AsyncClient
    api: httpx.AsyncClient

    @property
    def mqtt_port(self) -> int:
        return self.gw.listeners[0].bound[1]

    async def provision(
        self, key: str, body: dict[str, Any] | None = None, *, raw: bytes | None = None
    ) -> httpx.Response:
        return await self.http.post(
            "/provision",
            content=raw if raw is not None else orjson.dumps(body or {}),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )

    def events(self) -> list[dict[str, Any]]:
        return device_events(self.out)


def add_key(data: Path, key_id: str, **kw: Any) -> str:
    keys = ProvisioningKeys.open(data)
    try:
        return f"{key_id}:{keys.add(key_id, **kw)}"
    finally:
        keys.close()


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, *, listener: str = "") -> AsyncIterator[Running]:
    data = tmp_path / "data"
    text = f"""
gateway: {{id: gw-prov, data_dir: "{data}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0"{listener}}}]
  acl:
    - {{device: "*", topic: "devices/{{device_id}}/#"}}
    - {{username: spy, topic: "$edgeway/#", access: subscribe}}
    - {{username: spy, topic: "#", access: subscribe}}
http_ingest: {{listen: "127.0.0.1:0"}}
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
admin: {{listen: "127.0.0.1:0"}}
devices: {{flush_interval: 0.05s, events: true}}
"""
    gw = Gateway(parse_config(text, "test.yaml"))
    task = asyncio.create_task(gw.run())
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    http_port = next(a for a in gw.adapters if a.section == "http_ingest").port  # type: ignore[attr-defined]
    assert gw.admin is not None and gw.admin.bound is not None
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=TIMEOUT) as http,
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{gw.admin.bound[1]}", timeout=TIMEOUT
            ) as api,
        ):
            yield Running(gw, data, tmp_path / "out", http, api)
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, TIMEOUT)


async def until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------
# HTTP


async def test_http_enrolment_gives_working_credentials_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = add_key(
        data, "site-a", groups=["site-a"], template={"type": "pump", "kinds": ["http", "mqtt"]},
        id_pattern="pump-*",
    )  # fmt: skip
    async with gateway(tmp_path) as run:
        r = await run.provision(key, {"device_id": "pump-1"})
        assert r.status_code == 201, r.text
        assert r.headers["Cache-Control"] == "no-store"
        doc = r.json()
        assert doc["device_id"] == "pump-1" and doc["groups"] == ["site-a"]
        assert set(doc["credentials"]) == {"http", "mqtt"}
        token = doc["credentials"]["http"]
        # The device uses its own token (and a wrong one is still refused).
        ok = await run.http.post(
            "/devices/pump-1/telemetry", json={"t": 1}, headers={"Authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200, ok.text
        bad = await run.http.post(
            "/devices/pump-1/telemetry", json={"t": 1}, headers={"Authorization": "Bearer x" * 1}
        )
        assert bad.status_code == 401
        # Registered with the key's group and template, audited, an event.
        dev = (await run.api.get("/api/devices/pump-1")).json()["device"]
        assert dev["registered"] and dev["type"] == "pump" and dev["groups"] == ["site-a"]
        assert dev["metadata"]["provisioned_by"] == "site-a"
        assert run.gw.access is not None
        assert run.gw.access.store.groups("pump-1") == {"site-a"}
        entries = [e for e in read_offline(data) if e.action == "device provision"]
        assert [(e.who, e.target) for e in entries] == [("provisioning-key:site-a", "pump-1")]
        assert "credentials" not in str(entries[0].detail) and token not in str(entries[0].detail)
        events = await until(
            lambda: [e for e in run.events() if e["metrics"]["event"] == "registered"],
            "the registered event",
        )
        assert events[0]["device_id"] == "pump-1"
        # The same id again: refused (the key does not allow re-provisioning).
        again = await run.provision(key, {"device_id": "pump-1"})
        assert again.status_code == 409 and again.json()["error"] == "exists"
        status = (await run.api.get("/api/status")).json()["devices"]["provisioning"]
        assert status == {"enrolled": 1, "refused": {"exists": 1}}
        # The old token keeps working (nothing was replaced).
        ok = await run.http.post(
            "/devices/pump-1/telemetry", json={"t": 2}, headers={"Authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "device_id",
    ["pump-a/b", "pump-+", "pump-#", "pump-\n", "pump- x", "", "p" * 200, 7, "pump-\x00"],
)
async def test_http_ids_that_are_not_one_topic_level_are_refused(
    tmp_path: Path, device_id: object
) -> None:
    key = add_key(tmp_path / "data", "k", id_pattern="pump-*")
    async with gateway(tmp_path) as run:
        r = await run.provision(key, {"device_id": device_id})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid"
        # Nothing was registered or issued.
        assert run.gw.access is not None and run.gw.access.store.devices() == []
        # The key's use was not spent: a good id still enrols.
        assert (await run.provision(key, {"device_id": "pump-ok"})).status_code == 201


async def test_http_pattern_expiry_uses_rate_and_bad_bodies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pattern = add_key(data, "pat", id_pattern="pump-*")
    expired = add_key(data, "old", expires=time.time() - 1)
    two = add_key(data, "two", max_uses=2)
    slow = add_key(data, "slow", rate_per_minute=2)
    async with gateway(tmp_path) as run:
        r = await run.provision(pattern, {"device_id": "valve-1"})
        assert r.status_code == 403 and "pattern" in r.json()["detail"]
        assert (await run.provision(expired, {"device_id": "a-1"})).status_code == 403
        assert (await run.provision(two, {"device_id": "b-1"})).status_code == 201
        assert (await run.provision(two, {"device_id": "b-2"})).status_code == 201
        r = await run.provision(two, {"device_id": "b-3"})
        assert r.status_code == 403 and "used up" in r.json()["detail"]
        assert (await run.provision(slow, {"device_id": "c-1"})).status_code == 201
        assert (await run.provision(slow, {"device_id": "c-2"})).status_code == 201
        r = await run.provision(slow, {"device_id": "c-3"})
        assert r.status_code == 429 and r.json()["error"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        # Bodies: not JSON, not an object, unknown fields, too large.
        assert (await run.provision(pattern, raw=b"{nope")).status_code == 400
        assert (await run.provision(pattern, raw=b"[1]")).status_code == 400
        r = await run.provision(pattern, {"device_id": "pump-9", "admin": True})
        assert r.status_code == 400
        for kinds in ([{}], "mqtt", [], ["ftp"], [["mqtt"]]):
            r = await run.provision(pattern, {"device_id": "pump-9", "kinds": kinds})
            assert r.status_code == 400, (kinds, r.text)
        r = await run.provision(pattern, raw=b'{"device_id": "' + b"x" * 5000 + b'"}')
        assert r.status_code == 413
        # No key, a malformed one, a device token where a key belongs.
        r = await run.http.post("/provision", json={})
        assert r.status_code == 401
        assert (await run.provision("no-colon", {})).status_code == 400
        # An id left out is made up for the device.
        r = await run.provision(pattern, {})
        assert r.status_code == 403  # dev-... does not match pump-*
        free = add_key(data, "free")
        r = await run.provision(free, {})
        assert r.status_code == 201 and r.json()["device_id"].startswith("dev-")


async def test_http_key_brute_force_is_locked_out(tmp_path: Path) -> None:
    key = add_key(tmp_path / "data", "k")
    key_id = key.split(":")[0]
    async with gateway(tmp_path) as run:
        for i in range(5):
            r = await run.provision(f"{key_id}:wrong-{i}", {"device_id": f"x-{i}"})
            assert r.status_code == 401, r.text
        # Locked now: even the right secret waits (nothing is checked).
        r = await run.provision(key, {"device_id": "x-9"})
        assert r.status_code == 429 and r.json()["error"] == "locked"
        assert run.gw.access is not None and run.gw.access.store.devices() == []
        prov = run.gw.access.provisioner
        assert prov is not None and prov.stats.refused["unauthorized"] == 5
        # Made-up key ids (long, with control characters) are refused without
        # a per-key entry: the table only ever holds well-formed ids.
        for bad in ("x" * 5000, "k<script>", "$provision", ""):
            r = await run.provision(f"{bad}:secret", {})
            assert r.status_code in (400, 401, 429), r.text
        assert all(len(k) <= 64 for k in prov.by_key._entries)


async def test_rotate_with_grace_and_revoke_while_running(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = add_key(data, "k")
    async with gateway(tmp_path) as run:
        new = await _cli_secret(data, "rotate", "k", "--grace", "1h")
        assert (await run.provision(old, {"device_id": "d-1"})).status_code == 201
        assert (await run.provision(new, {"device_id": "d-2"})).status_code == 201
        newer = await _cli_secret(data, "rotate", "k", "--grace", "0")
        for stale in (old, new):
            assert (await run.provision(stale, {"device_id": "d-3"})).status_code == 401
        assert (await run.provision(newer, {"device_id": "d-3"})).status_code == 201
        assert provisioning_main(["revoke", "k"], data) == 0
        r = await run.provision(newer, {"device_id": "d-4"})
        assert r.status_code == 403 and "revoked" in r.json()["detail"]
        # Devices it enrolled keep their credentials.
        assert run.gw.access is not None and run.gw.access.store.has("mqtt", "d-1")
        actions = [e.action for e in read_offline(data)]
        assert actions.count("provisioning rotate") == 2 and "provisioning revoke" in actions


async def _cli_secret(data: Path, *argv: str) -> str:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert provisioning_main(list(argv), data) == 0
    return buf.getvalue().strip()


async def test_reprovisioning_replaces_credentials_only_when_the_key_allows(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    again = add_key(data, "again", reprovision=True, template={"kinds": ["http"]})
    async with gateway(tmp_path) as run:
        first = (await run.provision(again, {"device_id": "r-1"})).json()["credentials"]["http"]
        r = await run.provision(again, {"device_id": "r-1"})
        assert r.status_code == 201 and r.json()["reprovisioned"] is True
        second = r.json()["credentials"]["http"]
        h = {"Authorization": f"Bearer {first}"}
        assert (
            await run.http.post("/devices/r-1/telemetry", json={"t": 1}, headers=h)
        ).status_code == 401
        h = {"Authorization": f"Bearer {second}"}
        assert (
            await run.http.post("/devices/r-1/telemetry", json={"t": 1}, headers=h)
        ).status_code == 200
        # A disabled device never re-enrols (that would enable it again).
        assert (await run.api.post("/api/devices/r-1/disable")).status_code == 200
        r = await run.provision(again, {"device_id": "r-1"})
        assert r.status_code == 403 and "disabled" in r.json()["detail"]


# ---------------------------------------------------------------------------
# MQTT


class ProvisioningClient:
    """A paho client enrolling over MQTT (v5 or 3.1.1), driven from a thread."""

    def __init__(self, port: int, key: str, client_id: str, *, v5: bool = True) -> None:
        key_id, _, secret = key.partition(":")
        self.v5 = v5
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(f"$provision:{key_id}", secret)
        self.port = port
        self.ns = f"$edgeway/provision/{client_id}/"
        self.connack: Any = None
        self.messages: list[paho.MQTTMessage] = []
        self.subacks: list[Any] = []
        self.pubacks: dict[int, Any] = {}
        self.got = threading.Event()
        self.answered = threading.Event()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack = rc
        self.answered.set()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.messages.append(msg)
        self.got.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        self.subacks.append(codes)
        self.subscribed.set()

    def connect(self) -> int:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.answered.wait(TIMEOUT), "no CONNACK"
        return int(self.connack.value)

    def subscribe(self, topic: str) -> int:
        self.subscribed.clear()
        self.client.subscribe(topic, 1)
        assert self.subscribed.wait(TIMEOUT)
        return int(self.subacks[-1][0].value)

    def request(self, body: dict[str, Any], *, response_topic: str | None = None) -> dict[str, Any]:
        self.got.clear()
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            props.CorrelationData = b"corr-1"
        self.client.publish(self.ns + "request", orjson.dumps(body), 1, properties=props)
        assert self.got.wait(TIMEOUT), "no answer"
        return dict(orjson.loads(self.messages[-1].payload))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_device_connects(port: int, device_id: str, password: str) -> int:
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv5,
        reconnect_on_failure=False,
    )  # fmt: skip
    c.username_pw_set(device_id, password)
    done = threading.Event()
    out: list[int] = []
    c.on_connect = lambda _c, _u, _f, rc, _p: (out.append(int(rc.value)), done.set())
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(TIMEOUT)
        if out[0] == 0:
            info = c.publish(f"devices/{device_id}/telemetry", b'{"t": 1}', 1)
            info.wait_for_publish(TIMEOUT)
        return out[0]
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
async def test_mqtt_enrolment_then_connect_as_the_device(tmp_path: Path, v5: bool) -> None:
    key = add_key(tmp_path / "data", "line-1", groups=["line-1"], id_pattern="sensor-*")
    async with gateway(tmp_path) as run:
        pc = ProvisioningClient(run.mqtt_port, key, "factory-77", v5=v5)
        assert await asyncio.to_thread(pc.connect) == 0
        assert await asyncio.to_thread(pc.subscribe, pc.ns + "+") in (0, 1)
        bad = await asyncio.to_thread(pc.request, {"device_id": "sensor/1"})
        assert bad["error"] == "invalid"
        assert pc.messages[-1].topic == pc.ns + "rejected"
        doc = await asyncio.to_thread(pc.request, {"device_id": "sensor-1"})
        assert pc.messages[-1].topic == pc.ns + "accepted"
        assert doc["device_id"] == "sensor-1" and set(doc["credentials"]) == {"mqtt"}
        await asyncio.to_thread(pc.stop)
        code = await asyncio.to_thread(
            mqtt_device_connects, run.mqtt_port, "sensor-1", doc["credentials"]["mqtt"]
        )
        assert code == 0
        dev = (await run.api.get("/api/devices/sensor-1")).json()["device"]
        assert dev["registered"] and dev["groups"] == ["line-1"]
        # The provisioning client itself left no device record behind.
        assert (await run.api.get("/api/devices/factory-77")).status_code == 404


async def test_mqtt_provisioning_client_may_do_nothing_else(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = add_key(data, "k")
    from edgeway.devices.credentials import CredentialStore

    store = CredentialStore.open(data)
    spy_secret = store.issue("spy", "mqtt")
    store.close()
    async with gateway(tmp_path) as run:
        # A client the ACL lets read $edgeway/# and # sees no answer (never routed).
        spy = ProvisioningClient(run.mqtt_port, "x:y", "spy")
        spy.client.username_pw_set("spy", spy_secret)
        assert await asyncio.to_thread(spy.connect) == 0
        assert await asyncio.to_thread(spy.subscribe, "$edgeway/#") in (0, 1)
        assert await asyncio.to_thread(spy.subscribe, "#") in (0, 1)

        pc = ProvisioningClient(run.mqtt_port, key, "p-1")
        assert await asyncio.to_thread(pc.connect) == 0
        # Reads outside its namespace are refused (SUBACK 0x87).
        assert await asyncio.to_thread(pc.subscribe, "#") == 0x87
        assert await asyncio.to_thread(pc.subscribe, "devices/#") == 0x87
        assert await asyncio.to_thread(pc.subscribe, "$share/g/$edgeway/provision/p-2/+") == 0x87
        assert await asyncio.to_thread(pc.subscribe, "$edgeway/provision/+/accepted") == 0x87
        # Publishing telemetry or another client's request: PUBACK 0x87, nothing stored.
        info = pc.client.publish("devices/p-1/telemetry", b'{"t": 1}', 1)
        await asyncio.to_thread(info.wait_for_publish, TIMEOUT)
        info2 = pc.client.publish("$edgeway/provision/p-2/request", b'{"device_id": "z-1"}', 1)
        await asyncio.to_thread(info2.wait_for_publish, TIMEOUT)
        await until(lambda: len(pc.pubacks) == 2, "two PUBACKs")
        assert [int(rc.value) for rc in pc.pubacks.values()] == [0x87, 0x87]
        # Its own request with an MQTT 5 response topic in its namespace.
        assert await asyncio.to_thread(pc.subscribe, pc.ns + "reply") in (0, 1)
        doc = await asyncio.to_thread(
            pc.request, {"device_id": "z-2"}, response_topic=pc.ns + "reply"
        )
        assert doc["device_id"] == "z-2"
        msg = pc.messages[-1]
        assert msg.topic == pc.ns + "reply" and msg.properties.CorrelationData == b"corr-1"
        await asyncio.sleep(0.3)
        assert spy.messages == [] or all(b"credentials" not in m.payload for m in spy.messages)
        assert run.gw.access is not None and run.gw.access.store.has("mqtt", "z-2")
        assert not run.gw.access.store.has("mqtt", "z-1")
        # A response topic outside its namespace is not used.
        doc = await asyncio.to_thread(
            pc.request, {"device_id": "z-3"}, response_topic="devices/z-3/x"
        )
        assert pc.messages[-1].topic == pc.ns + "accepted" and doc["device_id"] == "z-3"
        await asyncio.to_thread(pc.stop)
        await asyncio.to_thread(spy.stop)


async def test_mqtt_provisioning_wrong_key_client_id_and_session_are_refused(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    key = add_key(data, "k")
    from edgeway.devices.credentials import CredentialStore

    store = CredentialStore.open(data)
    dev_secret = store.issue("dev-1", "mqtt")
    store.close()
    async with gateway(tmp_path) as run:
        wrong = ProvisioningClient(run.mqtt_port, "k:wrong", "p-1")
        assert await asyncio.to_thread(wrong.connect) == 0x86
        unknown = ProvisioningClient(run.mqtt_port, "nokey:x", "p-2")
        assert await asyncio.to_thread(unknown.connect) == 0x86
        # A device online under its id: a provisioning client cannot take that id over.
        dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=paho.MQTTv5)
        dev.username_pw_set("dev-1", dev_secret)
        dev.connect("127.0.0.1", run.mqtt_port)
        dev.loop_start()
        await until(lambda: dev.is_connected(), "dev-1 connected")
        squat = ProvisioningClient(run.mqtt_port, key, "dev-1")
        assert await asyncio.to_thread(squat.connect) == 0x85
        assert dev.is_connected()
        dev.disconnect()
        dev.loop_stop()
        # A provisioning session is never kept, even when asked for.
        pc = ProvisioningClient(run.mqtt_port, key, "p-3")
        pc.client.connect("127.0.0.1", run.mqtt_port, clean_start=False,
                          properties=_expiry(3600))  # fmt: skip
        pc.client.loop_start()
        assert await asyncio.to_thread(pc.answered.wait, TIMEOUT)
        await asyncio.to_thread(pc.stop)
        await until(lambda: "p-3" not in run.gw.broker.sessions, "the session to go")  # type: ignore[union-attr]


def _expiry(seconds: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = seconds
    return props


def test_cli_through_the_main_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeway.cli import main

    data = str(tmp_path / "data")
    argv = ["provisioning", "add", "line-2", "--groups", "line-2", "--kinds", "mqtt,coap",
            "--pattern", "s-*", "--rate", "5", "--expires", "7d", "--max-uses", "9"]  # fmt: skip
    assert main([*argv, "--data-dir", data]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("line-2:") and "only time" in out.err
    assert main(["provisioning", "list", "--json", "--data-dir", data]) == 0
    (row,) = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["id"] == "line-2" and row["state"] == "active" and row["max_uses"] == 9
    assert row["template"]["kinds"] == ["coap", "mqtt"] and row["id_pattern"] == "s-*"
    assert 6.9 * 86400 < row["expires"] - time.time() <= 7 * 86400
    assert main(["provisioning", "add", "line-2", "--data-dir", data]) == 1  # exists
    assert main(["provisioning", "add", "bad:id", "--data-dir", data]) == 1
    assert main(["provisioning", "add", "k", "--kinds", "ftp", "--data-dir", data]) == 1
    assert main(["provisioning", "revoke", "nope", "--data-dir", data]) == 1
    assert main(["provisioning", "revoke", "line-2", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["provisioning", "list", "--data-dir", data]) == 0
    assert "\trevoked\t" in capsys.readouterr().out
