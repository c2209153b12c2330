"""Device status from real peers on a running gateway: paho devices on the
embedded broker (connect, clean disconnect, will, keep-alive expiry, revoked
by disable), an HTTP client, an aiocoap client and a pymodbus server (poll
success, then failure), read back through the admin API; lifecycle events
arriving at the sink; the unregistered policy per listener."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
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

from edgeway.config import parse_config
from edgeway.gateway import Gateway

TIMEOUT = 10.0


class Device:
    """A paho MQTT 5 device driven from a thread; no automatic reconnect."""

    def __init__(
        self, port: int, client_id: str, *, keepalive: int = 30, will: bool = False
    ) -> None:
        self.port = port
        self.keepalive = keepalive
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        if will:
            self.client.will_set(f"devices/{client_id}/status", b"gone", 1)
        self.connack: Any = None
        self.disconnect_rc: Any = None
        self.answered = threading.Event()
        self.gone = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack = rc
        self.answered.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.disconnect_rc = rc
        self.gone.set()
        self.answered.set()

    def connect(self) -> int:
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        assert self.answered.wait(TIMEOUT), "no CONNACK"
        return int(self.connack.value) if self.connack is not None else -1

    def publish(self, payload: dict[str, Any]) -> None:
        cid = self.client._client_id.decode()
        info = self.client.publish(f"devices/{cid}/telemetry", orjson.dumps(payload), qos=1)
        info.wait_for_publish(TIMEOUT)

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (a device losing power)."""
        sock = self.client.socket()
        self.client.loop_stop()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def go_silent(self) -> None:
        """Stop the network loop with the socket open: no PINGREQ any more."""
        self.client.loop_stop()


@dataclass
class Running:
    gw: Gateway
    api: httpx.AsyncClient
    out: Path

    @property
    def mqtt_port(self) -> int:
        return self.gw.listeners[0].bound[1]

    async def device(self, device_id: str) -> dict[str, Any]:
        r = await self.api.get(f"/api/devices/{device_id}")
        assert r.status_code == 200, r.text
        return dict(r.json()["device"])

    async def until(
        self, device_id: str, check: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """The device's record once ``check`` holds (bounded wait, polling the API)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        last: dict[str, Any] = {}
        while loop.time() < deadline:
            r = await self.api.get(f"/api/devices/{device_id}")
            if r.status_code == 200:
                last = r.json()["device"]
                if check(last):
                    return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"{device_id}: condition not met; last record {last}")

    def events(self) -> list[dict[str, Any]]:
        return device_events(self.out)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, extra: str = "", listener: str = "") -> AsyncIterator[Running]:
    text = f"""
gateway: {{id: gw-dev, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true{listener}}}]
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
admin: {{listen: "127.0.0.1:0"}}
devices: {{flush_interval: 0.05s, events: true}}
{extra}"""
    gw = Gateway(parse_config(text, "test.yaml"))
    task = asyncio.create_task(gw.run())
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    assert gw.admin is not None and gw.admin.bound is not None
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.admin.bound[1]}", timeout=TIMEOUT
        ) as api:
            yield Running(gw, api, tmp_path / "out")
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, TIMEOUT)


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


async def test_mqtt_connect_disconnect_reasons_and_events(tmp_path: Path) -> None:
    async with gateway(tmp_path) as run:
        r = await run.api.post("/api/devices", json={"id": "m-1", "type": "meter"})
        assert r.status_code == 201, r.text

        dev = Device(run.mqtt_port, "m-1")
        assert await in_thread(dev.connect) == 0
        await in_thread(lambda: dev.publish({"t": 1, "firmware_version": "2.1.0"}))
        rec = await run.until("m-1", lambda d: d["status"] == "online" and d["firmware"])
        assert rec["protocols"] == ["mqtt"] and rec["firmware"] == "2.1.0"
        assert rec["last_connect"] is not None and rec["last_seen"] is not None
        await in_thread(dev.disconnect)
        rec = await run.until("m-1", lambda d: d["status"] == "offline")
        assert rec["disconnect_reason"] == "clean" and rec["last_disconnect"] is not None

        # Connection lost without DISCONNECT, with a will: reason "will".
        dev = Device(run.mqtt_port, "m-1", will=True)
        assert await in_thread(dev.connect) == 0
        await run.until("m-1", lambda d: d["online"])
        await in_thread(dev.abort)
        rec = await run.until("m-1", lambda d: not d["online"])
        assert rec["disconnect_reason"] == "will"

        # Silent past 1.5 x keep alive: reason "keepalive".
        dev = Device(run.mqtt_port, "m-1", keepalive=1)
        assert await in_thread(dev.connect) == 0
        await run.until("m-1", lambda d: d["online"])
        await in_thread(dev.go_silent)
        rec = await run.until("m-1", lambda d: not d["online"])
        assert rec["disconnect_reason"] == "keepalive"
        await in_thread(dev.abort)

        # An unregistered client is listed as unregistered (policy allow).
        other = Device(run.mqtt_port, "stranger-1")
        assert await in_thread(other.connect) == 0
        rec = await run.until("stranger-1", lambda d: d["online"])
        assert rec["status"] == "unregistered" and rec["registered"] is False
        await in_thread(other.disconnect)

        def kinds() -> list[tuple[str, str, str | None]]:
            return [
                (e["device_id"], e["metrics"]["event"], e["metrics"].get("reason"))
                for e in run.events()
            ]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while ("stranger-1", "disconnected", "clean") not in kinds():
            assert loop.time() < deadline, kinds()
            await asyncio.sleep(0.05)
        mine = [k for k in kinds() if k[0] == "m-1"]
        assert mine == [
            ("m-1", "registered", "added"),
            ("m-1", "connected", None),
            ("m-1", "disconnected", "clean"),
            ("m-1", "connected", None),
            ("m-1", "disconnected", "will"),
            ("m-1", "connected", None),
            ("m-1", "disconnected", "keepalive"),
        ]


async def test_disable_revokes_a_connected_device_and_refuses_it_after(tmp_path: Path) -> None:
    async with gateway(tmp_path) as run:
        assert (await run.api.post("/api/devices", json={"id": "v-1"})).status_code == 201
        dev = Device(run.mqtt_port, "v-1", will=True)
        assert await in_thread(dev.connect) == 0
        await run.until("v-1", lambda d: d["online"])
        watcher = Device(run.mqtt_port, "watcher")
        assert await in_thread(watcher.connect) == 0
        wills: list[bytes] = []
        watcher.client.on_message = lambda _c, _u, m: wills.append(m.payload)
        watcher.client.subscribe("devices/v-1/status", qos=1)

        r = await run.api.post("/api/devices/v-1/disable")
        assert r.status_code == 200 and r.json()["device"]["status"] == "disabled"
        assert await in_thread(lambda: dev.gone.wait(2.0)), "not disconnected within 2 s"
        assert int(dev.disconnect_rc.value) == 0x98  # administrative action
        rec = await run.until("v-1", lambda d: not d["online"])
        assert rec["disconnect_reason"] == "revoked"

        again = Device(run.mqtt_port, "v-1")
        assert await in_thread(again.connect) == 0x8A  # banned
        await in_thread(again.go_silent)
        # Enabled again: accepted.
        assert (await run.api.post("/api/devices/v-1/enable")).status_code == 200
        third = Device(run.mqtt_port, "v-1")
        assert await in_thread(third.connect) == 0
        await in_thread(third.disconnect)
        await in_thread(watcher.disconnect)
        assert wills == []  # a revoked device's will is not sent
        # The events are records: stored by the outbox's group commit, which
        # may land a moment after the last step above (seen on a loaded CI).
        want = {("v-1", "revoked"), ("v-1", "auth_failed")}
        events: list[tuple[str, str]] = []
        for _ in range(100):
            events = [(e["device_id"], e["metrics"]["event"]) for e in run.events()]
            if want <= set(events):
                break
            await asyncio.sleep(0.05)
        assert want <= set(events), events


async def test_mqtt_listener_refusing_unregistered_devices(tmp_path: Path) -> None:
    async with gateway(tmp_path, listener=", unregistered: refuse") as run:
        stranger = Device(run.mqtt_port, "nobody")
        assert await in_thread(stranger.connect) == 0x87
        await in_thread(stranger.go_silent)
        assert (await run.api.post("/api/devices", json={"id": "known"})).status_code == 201
        known = Device(run.mqtt_port, "known")
        assert await in_thread(known.connect) == 0
        await in_thread(known.disconnect)
        assert (await run.api.get("/api/devices/nobody")).status_code == 404


async def test_http_and_coap_requests_and_the_http_refuse_policy(tmp_path: Path) -> None:
    import aiocoap

    extra = """
http_ingest: {listen: "127.0.0.1:0", allow_anonymous: true, unregistered: refuse}
coap: {listen: "127.0.0.1:0", probe_interval: 0}
"""
    async with gateway(tmp_path, extra) as run:
        coap, http = sorted(run.gw.adapters, key=lambda a: a.section)
        assert http.section == "http_ingest" and coap.section == "coap"
        base = f"http://127.0.0.1:{http.port}"  # type: ignore[attr-defined]
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as client:
            r = await client.post("/devices/h-1/telemetry", json={"t": 1})
            assert r.status_code == 403 and r.json()["error"] == "device_refused"
            rec = await run.until("h-1", lambda d: d["status"] == "unregistered")
            assert rec["protocols"] == ["http"]
            assert (await run.api.post("/api/devices", json={"id": "h-1"})).status_code == 201
            r = await client.post("/devices/h-1/telemetry", json={"t": 2})
            assert r.status_code == 200, r.text
            rec = await run.until("h-1", lambda d: d["status"] == "online")
            await run.api.post("/api/devices/h-1/disable")
            r = await client.post("/devices/h-1/telemetry", json={"t": 3})
            # Disabled in the credential store too: its check answers first (401).
            assert r.status_code == 401

        ctx = await aiocoap.Context.create_client_context()
        try:
            msg = aiocoap.Message(
                code=aiocoap.POST,
                uri=f"coap://127.0.0.1:{coap.port}/devices/c-1/telemetry",  # type: ignore[attr-defined]
                payload=b'{"t": 1}',
            )
            resp = await asyncio.wait_for(ctx.request(msg).response, TIMEOUT)
            assert resp.code == aiocoap.CHANGED  # CoAP allows unregistered devices here
            rec = await run.until("c-1", lambda d: d["online"])
            assert rec["status"] == "unregistered" and rec["protocols"] == ["coap"]
            assert (await run.api.post("/api/devices", json={"id": "c-1"})).status_code == 201
            await run.api.post("/api/devices/c-1/disable")
            resp = await asyncio.wait_for(ctx.request(msg).response, TIMEOUT)
            assert resp.code == aiocoap.UNAUTHORIZED  # the credential store's check, first
        finally:
            await ctx.shutdown()


async def test_modbus_poll_success_then_failure(tmp_path: Path) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
    regs = [SimData(0, values=[215, 0], datatype=DataType.REGISTERS)]
    device = SimDevice(id=1, simdata=(bits, bits, regs, regs))
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]
    extra = f"""
modbus:
  - name: plc
    device_id: plc-1
    host: 127.0.0.1
    port: {port}
    timeout: 0.5
    groups:
      - function: holding_registers
        interval: 0.05
        points: [{{metric: temperature, address: 0, scale: 0.1}}]
"""
    stopped = False
    try:
        async with gateway(tmp_path, extra) as run:
            rec = await run.until("plc-1", lambda d: d["online"])
            assert rec["protocols"] == ["modbus"] and rec["last_seen"] is not None
            await server.shutdown()
            stopped = True
            rec = await run.until("plc-1", lambda d: not d["online"])
            assert rec["disconnect_reason"] == "error" and rec["last_error"]
    finally:
        if not stopped:
            await server.shutdown()


async def test_status_writes_are_batched_not_per_reading(tmp_path: Path) -> None:
    """600 readings from three devices cost one commit per flush, not one per reading."""
    async with gateway(tmp_path) as run:
        devs = [Device(run.mqtt_port, f"b-{i}") for i in range(3)]
        for d in devs:
            assert await in_thread(d.connect) == 0
        assert run.gw.devices is not None
        presence, db = run.gw.devices.presence, run.gw.devices.registry.db
        await presence.flush()
        commits, flushes = db.commits, presence.stats.flushes

        def burst() -> None:
            for i in range(200):
                for d in devs:
                    d.publish({"i": i})

        await in_thread(burst)
        await presence.flush()
        # Each flush: one transaction for the status, one for the idle sweep.
        assert db.commits - commits <= 2 * (presence.stats.flushes - flushes)
        assert presence.stats.flushes - flushes < 100
        for d in devs:
            rec = await run.device(d.client._client_id.decode())
            assert rec["online"] and rec["last_seen"] is not None
            await in_thread(d.disconnect)


async def test_reload_keeps_the_registry_checks_and_applies_new_policies(tmp_path: Path) -> None:
    from edgeway.runtime.reload import ReloadError

    def text(users: str, policy: str, flush: str = "0.05s") -> str:
        return f"""
gateway: {{id: gw-dev, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
  users: {users}
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
admin: {{listen: "127.0.0.1:0"}}
devices: {{flush_interval: {flush}, events: true}}
http_ingest: {{listen: "127.0.0.1:0", allow_anonymous: true, unregistered: {policy}}}
"""

    gw = Gateway(parse_config(text("[]", "allow"), "test.yaml"))
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), TIMEOUT)
    try:
        assert gw.devices is not None and gw.broker is not None
        await gw.devices.registry.add({"id": "off"})
        await gw.devices.registry.disable("off")
        port = gw.listeners[0].bound[1]
        assert await in_thread(lambda: Device(port, "off").connect()) == 0x8A
        (http,) = gw.adapters
        url = f"http://127.0.0.1:{http.port}/devices/new-1/telemetry"  # type: ignore[attr-defined]
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            assert (await client.post(url, json={"t": 1})).status_code == 200

            # mqtt.users changes: the broker gets a new authenticator, still
            # behind the registry; the HTTP listener now refuses strangers.
            from edgeway.devices.config_auth import hash_password

            hashed = f'[{{username: someone, password_hash: "{hash_password("pw-123456")}"}}]'
            changes = await gw.apply_text(text(hashed, "refuse"), "test")
            assert changes
            port = gw.listeners[0].bound[1]
            peer = Device(port, "off")
            assert await in_thread(peer.connect) == 0x8A
            await in_thread(peer.go_silent)
            (http,) = gw.adapters
            url = f"http://127.0.0.1:{http.port}/devices/new-2/telemetry"  # type: ignore[attr-defined]
            assert (await client.post(url, json={"t": 1})).status_code == 403

        # The devices section itself needs a restart: refused, not ignored.
        with pytest.raises(ReloadError, match="restart"):
            await gw.apply_text(text(hashed, "refuse", flush="1s"), "test")
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, TIMEOUT)


async def test_a_device_that_only_polls_its_commands_is_seen(tmp_path: Path) -> None:
    extra = (
        'http_ingest: {listen: "127.0.0.1:0", allow_anonymous: true, '
        "commands_allow_anonymous: true}\n"
    )
    async with gateway(tmp_path, extra) as run:
        (http,) = run.gw.adapters
        url = f"http://127.0.0.1:{http.port}/devices/poller-1/commands?wait=0"  # type: ignore[attr-defined]
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            r = await client.get(url)
            assert r.status_code in (200, 204), r.text
        rec = await run.until("poller-1", lambda d: d["last_seen"] is not None)
        assert rec["protocols"] == ["http"] and rec["status"] == "unregistered"


async def test_disable_and_enable_reach_the_credential_store(tmp_path: Path) -> None:
    """A device with its own credential (the store of issue 15 section 2):
    disabled in the registry, it is disabled in the store too (refused by the
    credential check, even after a restart); enabled, it connects again."""
    async with gateway(tmp_path) as run:
        assert run.gw.access is not None
        secret = run.gw.access.store.issue("cred-1", "mqtt")
        assert (await run.api.post("/api/devices", json={"id": "cred-1"})).status_code == 201

        def login() -> int:
            d = Device(run.mqtt_port, "cred-1")
            d.client.username_pw_set("cred-1", secret)
            rc = d.connect()
            d.go_silent()
            return rc

        assert await in_thread(login) == 0
        assert (await run.api.post("/api/devices/cred-1/disable")).status_code == 200
        assert run.gw.access.store.is_disabled("cred-1")
        assert await in_thread(login) != 0
        assert (await run.api.post("/api/devices/cred-1/enable")).status_code == 200
        assert not run.gw.access.store.is_disabled("cred-1")
        assert await in_thread(login) == 0
